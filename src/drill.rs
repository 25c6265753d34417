//! `runbook drill`: the procedure's restore drill, end to end, on a sandbox it builds
//! itself. The cycle is data: the bundled runbook [`CYCLE`] (start, backup, list,
//! validate, damage, detect, restore, verify, a forced failed restore that rolls back,
//! the scratch-instance drill, a retention dry-run, stop), run by the ordinary engine
//! (planned, journaled, resumable) in the sandbox's own state dir.
//!
//! The stages of the report are the sandbox (built here, by `runbook-testkit
//! atocore-sandbox`, because the cycle's vars come from it) and then the cycle's
//! top-level steps, by id and description. [`StageReport`] is an event consumer: it
//! takes each stage's result and duration from the run's events. Nothing outside the
//! sandbox directory is touched.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde::Serialize;
use serde_json::Value as Json;

use crate::actions::Outputs;
use crate::events::{Event, EventSink, RunStatus, Section, SinkError};
use crate::load::Runbook;

/// The bundled runbook that `runbook drill` runs.
pub const CYCLE: &str = "atocore/drill-cycle";

/// The cycle's outputs that the report names: the restore's duration and the
/// scratch-instance drill's own measure.
const RTO_OUTPUT: &str = "rto_seconds";
const SCRATCH_RTO_OUTPUT: &str = "scratch_rto_seconds";
/// The disaster stages: the recovery onto a new host, and the second (incremental) push.
const DR_RTO_OUTPUT: &str = "dr_rto_seconds";
const OFFSITE_SENT_OUTPUT: &str = "offsite_bytes_sent";
const OFFSITE_TOTAL_OUTPUT: &str = "offsite_bytes_total";

/// How the drill went, stage by stage.
#[derive(Debug, Serialize)]
pub struct DrillReport {
    pub sandbox: PathBuf,
    /// The cycle's run in the sandbox's journal (`RUNBOOK_STATE_DIR=SANDBOX/state`).
    pub run_id: Option<String>,
    pub stages: Vec<Stage>,
    pub ok: bool,
    /// Time to restore: the `restore` stage, from stopping the service to verify passing.
    pub rto_seconds: Option<f64>,
    /// The scratch-instance drill's own measure (copy, start, verify).
    pub drill_rto_seconds: Option<f64>,
    /// Disaster recovery: `atocore/recover` on a new host from the off-site copy alone
    /// (fetch, decrypt, validate, restore, start, verify). None when the disaster
    /// stages did not run.
    pub dr_rto_seconds: Option<f64>,
    /// The second push of an unchanged vector store: the bytes it sent, of the
    /// snapshot's bytes.
    pub offsite_bytes_sent: Option<f64>,
    pub offsite_bytes_total: Option<f64>,
    /// Why the disaster stages were skipped, when they were.
    pub offsite_skipped: Option<String>,
    pub seconds: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StageStatus {
    Ok,
    Failed,
    /// Its `when` was false.
    Skipped,
    /// The cycle stopped before it.
    NotRun,
}

#[derive(Debug, Serialize)]
pub struct Stage {
    pub name: String,
    /// What this stage shows (the step's description).
    pub purpose: String,
    pub status: StageStatus,
    pub ok: bool,
    pub seconds: f64,
    pub detail: String,
}

impl Stage {
    fn new(name: &str, purpose: &str) -> Self {
        Stage {
            name: name.to_string(),
            purpose: purpose.to_string(),
            status: StageStatus::NotRun,
            ok: false,
            seconds: 0.0,
            detail: String::new(),
        }
    }

    fn set(&mut self, status: StageStatus, seconds: f64, detail: String) {
        self.ok = matches!(status, StageStatus::Ok | StageStatus::Skipped);
        self.status = status;
        self.seconds = seconds;
        self.detail = detail;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    #[error("the drill's sandbox tools are missing: {0} (build them: cargo build --release)")]
    NoTestkit(PathBuf),
    #[error("no free port on 127.0.0.1: {0}")]
    NoPort(std::io::Error),
}

/// The report as the run goes: fed by the run's events; prints each stage as it ends
/// when `text`.
pub struct StageReport {
    started: Instant,
    text: bool,
    sandbox: PathBuf,
    run_id: Option<String>,
    stages: Vec<Stage>,
    outputs: Outputs,
    status: Option<RunStatus>,
    /// Stages printed so far.
    printed: usize,
    offsite_skipped: Option<String>,
}

impl StageReport {
    pub fn new(sandbox: &Path, text: bool) -> Self {
        StageReport {
            started: Instant::now(),
            text,
            sandbox: sandbox.to_path_buf(),
            run_id: None,
            stages: vec![Stage::new(
                "sandbox",
                "build an AtoCore deployment: database, registry, vector store",
            )],
            outputs: Outputs::new(),
            status: None,
            printed: 0,
            offsite_skipped: None,
        }
    }

    /// The disaster stages will be skipped, for this reason (printed at once).
    pub fn skip_offsite(&mut self, why: &str) {
        if self.text {
            println!("drill: {why}; they are skipped");
        }
        self.offsite_skipped = Some(why.to_string());
    }

    /// Builds the sandbox in `dir` (stage 1). False when that failed.
    pub fn build_sandbox(&mut self, testkit: &Path) -> bool {
        let t = Instant::now();
        let dir = self.sandbox.display().to_string();
        let built = Command::new(testkit)
            .args(["atocore-sandbox", &dir, "--port", "0", "--force"])
            .output();
        let (ok, detail) = match built {
            Err(e) => (false, format!("cannot run {}: {e}", testkit.display())),
            Ok(out) => {
                let stdout = String::from_utf8_lossy(&out.stdout);
                if out.status.success() {
                    (true, stdout.lines().next().unwrap_or("").to_string())
                } else {
                    let stderr = String::from_utf8_lossy(&out.stderr);
                    (false, format!("{}{}", stdout.trim(), stderr.trim()))
                }
            }
        };
        let status = if ok {
            StageStatus::Ok
        } else {
            StageStatus::Failed
        };
        self.stages[0].set(status, t.elapsed().as_secs_f64(), detail);
        self.print_done();
        ok
    }

    /// The cycle's stages: its top-level steps, in order.
    pub fn expect_cycle(&mut self, cycle: &Runbook) {
        for step in &cycle.steps {
            let purpose = step.description.as_deref().unwrap_or("");
            self.stages.push(Stage::new(&step.id, purpose));
        }
    }

    /// `run` refused the cycle: a stage would fail (the key of the step and why).
    pub fn refused(&mut self, key: &str, why: &str) {
        let top = key.split('/').next().unwrap_or(key);
        if let Some(stage) = self.stages.iter_mut().find(|s| s.name == top) {
            let detail = format!("would fail, so the cycle was not started: {why}");
            stage.set(StageStatus::Failed, 0.0, detail);
        }
    }

    fn stage(&mut self, key: &str, section: Section) -> Option<&mut Stage> {
        if section != Section::Main || key.contains('/') {
            return None;
        }
        self.stages.iter_mut().skip(1).find(|s| s.name == key)
    }

    /// Prints the stages that ended, in order, up to the first one still to come.
    fn print_done(&mut self) {
        while let Some(stage) = self.stages.get(self.printed) {
            if stage.status == StageStatus::NotRun {
                break;
            }
            if self.text {
                println!("{}", text_line(self.printed + 1, self.stages.len(), stage));
            }
            self.printed += 1;
        }
    }

    pub fn finish(mut self) -> DrillReport {
        self.stages.iter_mut().for_each(|s| {
            if s.status == StageStatus::NotRun {
                s.detail = "not run: the cycle stopped before it".into();
            }
        });
        if self.text {
            for (i, stage) in self.stages.iter().enumerate().skip(self.printed) {
                println!("{}", text_line(i + 1, self.stages.len(), stage));
            }
        }
        let number = |name: &str| {
            self.outputs.get(name).and_then(|v| match v {
                Json::Number(n) => n.as_f64(),
                Json::String(s) => s.parse().ok(),
                _ => None,
            })
        };
        let rto_seconds = number(RTO_OUTPUT);
        let drill_rto_seconds = number(SCRATCH_RTO_OUTPUT);
        let dr_rto_seconds = number(DR_RTO_OUTPUT);
        let offsite_bytes_sent = number(OFFSITE_SENT_OUTPUT);
        let offsite_bytes_total = number(OFFSITE_TOTAL_OUTPUT);
        let ok = self.stages.iter().all(|s| s.ok)
            && (self.stages.len() == 1 || self.status == Some(RunStatus::Succeeded));
        DrillReport {
            sandbox: self.sandbox,
            run_id: self.run_id,
            stages: self.stages,
            ok,
            rto_seconds,
            drill_rto_seconds,
            dr_rto_seconds,
            offsite_bytes_sent,
            offsite_bytes_total,
            offsite_skipped: self.offsite_skipped,
            seconds: self.started.elapsed().as_secs_f64(),
        }
    }
}

impl EventSink for StageReport {
    fn on_event(&mut self, event: &Event) -> Result<(), SinkError> {
        match event {
            Event::RunStarted(header) => {
                if self.text {
                    println!(
                        "drill: run {} of {} (journal: RUNBOOK_STATE_DIR={}/state)",
                        header.run_id,
                        header.runbook,
                        self.sandbox.display()
                    );
                }
                self.run_id = Some(header.run_id.clone());
            }
            Event::StepSucceeded {
                key,
                section,
                duration,
                outputs,
                ..
            } => {
                if let Some(stage) = self.stage(key, *section) {
                    stage.set(StageStatus::Ok, duration.as_secs_f64(), summary(outputs));
                }
            }
            Event::StepFailedAsExpected {
                key,
                section,
                duration,
                error,
            } => {
                if let Some(stage) = self.stage(key, *section) {
                    let detail = format!("failed as expected: {error}");
                    stage.set(StageStatus::Ok, duration.as_secs_f64(), detail);
                }
            }
            Event::StepFailed {
                key,
                section,
                duration,
                error,
                will_retry: false,
            } => {
                if let Some(stage) = self.stage(key, *section) {
                    stage.set(StageStatus::Failed, duration.as_secs_f64(), error.clone());
                }
            }
            Event::StepSkipped {
                key,
                section,
                reason,
            } => {
                if let Some(stage) = self.stage(key, *section) {
                    stage.set(StageStatus::Skipped, 0.0, reason.clone());
                }
            }
            Event::RunFinished {
                status, outputs, ..
            } => {
                self.status = Some(*status);
                self.outputs = outputs.clone();
            }
            _ => {}
        }
        self.print_done();
        Ok(())
    }
}

/// A stage's outputs in one short line: scalars as `name value`, lists by their length.
fn summary(outputs: &Outputs) -> String {
    let mut parts = Vec::new();
    for (name, value) in outputs {
        let shown = match value {
            Json::String(s) => s.lines().next().unwrap_or("").to_string(),
            Json::Array(items) => format!("{} item(s)", items.len()),
            Json::Object(_) => continue,
            other => other.to_string(),
        };
        if shown.is_empty() {
            continue;
        }
        let shown: String = if shown.chars().count() > 90 {
            shown.chars().take(89).chain(['…']).collect()
        } else {
            shown
        };
        parts.push(format!("{name} {shown}"));
    }
    parts.join(", ")
}

/// A free port on 127.0.0.1 for the scratch instance.
pub fn free_port() -> Result<u16, DrillError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(DrillError::NoPort)
}

pub fn text_line(n: usize, total: usize, s: &Stage) -> String {
    format!(
        "[{n:>2}/{total}] {:<22} {:<4} {:>7.2}s  {}{}",
        s.name,
        match s.status {
            StageStatus::Ok => "ok",
            StageStatus::Failed => "FAIL",
            StageStatus::Skipped => "skip",
            StageStatus::NotRun => "-",
        },
        s.seconds,
        s.purpose,
        if s.detail.is_empty() {
            String::new()
        } else {
            format!(" — {}", s.detail)
        }
    )
}

pub fn text_summary(r: &DrillReport) -> String {
    let count = |status| r.stages.iter().filter(|s| s.status == status).count();
    let not_run = count(StageStatus::NotRun);
    let mut s = format!(
        "drill {}: {} stages, {} failed{}, {:.1}s in all\n",
        if r.ok { "passed" } else { "FAILED" },
        r.stages.len(),
        count(StageStatus::Failed),
        if not_run > 0 {
            format!(", {not_run} not run")
        } else {
            String::new()
        },
        r.seconds
    );
    if let Some(stage) = r.stages.iter().find(|s| s.status == StageStatus::Failed) {
        s.push_str(&format!(
            "first failed stage: {} ({})\n",
            stage.name, stage.detail
        ));
    }
    if let Some(rto) = r.rto_seconds {
        s.push_str(&format!("time to restore (RTO): {rto:.2}s (restore run: stop, safety copy, restore, start, verify)\n"));
    }
    if let Some(rto) = r.drill_rto_seconds {
        s.push_str(&format!(
            "scratch drill RTO: {rto:.2}s (copy, start, verify)\n"
        ));
    }
    if let (Some(sent), Some(total)) = (r.offsite_bytes_sent, r.offsite_bytes_total) {
        s.push_str(&format!(
            "off-site second push: {} of {} bytes sent ({:.2}%: only what changed)\n",
            sent as u64,
            total as u64,
            100.0 * sent / total.max(1.0)
        ));
    }
    if let Some(rto) = r.dr_rto_seconds {
        s.push_str(&format!(
            "disaster recovery RTO: {rto:.2}s (new host from the off-site copy: fetch, decrypt, validate, restore, start, verify)\n"
        ));
    }
    if let Some(why) = &r.offsite_skipped {
        s.push_str(&format!("{why}: the disaster stages were skipped\n"));
    }
    s
}

/// Why this machine cannot start an off-site host for the disaster stages, if it
/// cannot: they need root (a network namespace), Debian's sshd, iproute2 and the ssh
/// client (the off-site format streams tar over ssh: no rsync).
pub fn offsite_unavailable() -> Option<String> {
    // Found as the engine finds a step's program (execvp's rules), on the real system.
    let runs = |program: &str| {
        crate::actions::process::find_program(program, &crate::world::World::default()).is_ok()
    };
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (a network namespace for the host)".to_string());
    }
    if !runs("/usr/sbin/sshd") {
        missing.push("/usr/sbin/sshd (apt-get install openssh-server)".to_string());
    }
    for (tool, package) in [("ip", "iproute2"), ("ssh", "openssh-client")] {
        if !runs(tool) {
            missing.push(format!("{tool} (apt-get install {package})"));
        }
    }
    (!missing.is_empty()).then(|| format!("off-site stages need {}", missing.join(", ")))
}

/// JUnit XML, for CI systems: one testcase per stage.
pub fn junit(r: &DrillReport) -> String {
    let esc = |t: &str| {
        t.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    };
    let failures = r
        .stages
        .iter()
        .filter(|s| s.status == StageStatus::Failed)
        .count();
    let mut x = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites name=\"runbook drill\" tests=\"{}\" failures=\"{failures}\" time=\"{:.3}\">\n  <testsuite name=\"atocore-drill\" tests=\"{}\" failures=\"{failures}\" time=\"{:.3}\">\n",
        r.stages.len(),
        r.seconds,
        r.stages.len(),
        r.seconds
    );
    for s in &r.stages {
        x.push_str(&format!(
            "    <testcase classname=\"atocore-drill\" name=\"{}\" time=\"{:.3}\">",
            esc(&s.name),
            s.seconds
        ));
        if s.ok {
            x.push_str(&format!(
                "<system-out>{}</system-out>",
                esc(&format!("{}: {}", s.purpose, s.detail))
            ));
        } else if s.status == StageStatus::NotRun {
            x.push_str(&format!("<skipped message=\"{}\"/>", esc(&s.detail)));
        } else {
            x.push_str(&format!(
                "<failure message=\"{}\">{}</failure>",
                esc(&s.detail),
                esc(&s.purpose)
            ));
        }
        x.push_str("</testcase>\n");
    }
    x.push_str("  </testsuite>\n</testsuites>\n");
    x
}

/// Where the sandbox tools are: next to this binary.
pub fn testkit_path() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("runbook-testkit")))
        .unwrap_or_else(|| PathBuf::from("runbook-testkit"))
}

pub fn default_dir() -> PathBuf {
    std::env::temp_dir().join(format!("runbook-drill-{}", std::process::id()))
}
