//! `runbook drill`: the procedure's quarterly restore drill, end to end, on a sandbox
//! it builds itself — backup (with the vector store) -> list -> validate -> damage the
//! live data -> restore -> verify -> a forced failed restore that rolls back -> the
//! scratch-instance drill runbook -> retention dry-run.
//!
//! Every stage is the real `runbook` binary running a bundled runbook in its own
//! process against real files, a real SQLite database and the stand-in service; the
//! sandbox, the stand-in and the damage come from `runbook-testkit`, which sits next
//! to this binary. Nothing outside the sandbox directory is touched.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde::Serialize;
use serde_json::Value as Json;

/// How the drill went, stage by stage.
#[derive(Debug, Serialize)]
pub struct DrillReport {
    pub sandbox: PathBuf,
    pub stages: Vec<Stage>,
    pub ok: bool,
    /// Time to restore: the restore run, from stopping the service to verify passing.
    pub rto_seconds: Option<f64>,
    /// The scratch-instance drill's own measure (copy, start, verify).
    pub drill_rto_seconds: Option<f64>,
    pub seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct Stage {
    pub name: &'static str,
    /// What this stage shows.
    pub purpose: &'static str,
    pub ok: bool,
    pub seconds: f64,
    pub detail: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    #[error("{0}")]
    Setup(String),
}

/// Receives each stage as it ends (its number and its result).
pub type StageSink = Box<dyn FnMut(usize, &Stage)>;

pub struct Drill {
    /// This binary.
    pub runbook: PathBuf,
    pub testkit: PathBuf,
    pub search_path: Vec<PathBuf>,
    pub dir: PathBuf,
    /// Called after each stage (the text renderer prints it).
    pub on_stage: StageSink,
}

/// The result of one `runbook` invocation.
struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
    /// The `run-finished` event (with `--format json`).
    finished: Option<Json>,
}

impl Ran {
    fn output(&self, name: &str) -> Option<&Json> {
        self.finished.as_ref()?.get("outputs")?.get(name)
    }

    fn status(&self) -> &str {
        self.finished
            .as_ref()
            .and_then(|f| f["status"].as_str())
            .unwrap_or("?")
    }

    fn why(&self) -> String {
        let err = self
            .finished
            .as_ref()
            .and_then(|f| f["error"].as_str())
            .map(str::to_string);
        err.unwrap_or_else(|| {
            let text = if self.stderr.trim().is_empty() {
                &self.stdout
            } else {
                &self.stderr
            };
            text.trim().lines().last().unwrap_or("").to_string()
        })
    }
}

/// A digest of everything below `root` (names and contents): equal digests mean
/// byte-identical data. SQLite's `-shm` files are left out: they are a shared-memory
/// index that any reader rewrites, not data.
fn digest(paths: &[PathBuf]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for root in paths {
        let entries = walkdir::WalkDir::new(root)
            .sort_by_file_name()
            .into_iter()
            .flatten();
        for entry in entries.filter(|e| !e.file_name().to_string_lossy().ends_with("-shm")) {
            h.update(entry.path().to_string_lossy().as_bytes());
            if entry.file_type().is_file() {
                h.update(std::fs::read(entry.path()).unwrap_or_default());
            }
        }
    }
    crate::actions::files::hex(&h.finalize())
}

fn free_port() -> Result<u16, DrillError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| DrillError::Setup(format!("no free port on 127.0.0.1: {e}")))
}

impl Drill {
    fn atocore_root(&self) -> PathBuf {
        self.dir.join("srv/storage/atocore")
    }

    fn vars(&self) -> PathBuf {
        self.dir.join("sandbox.yaml")
    }

    fn runbook(&self, args: &[&str], extra_vars: &[&Path]) -> Ran {
        let mut cmd = Command::new(&self.runbook);
        cmd.args(args)
            .arg("--vars")
            .arg(self.vars())
            .args(extra_vars.iter().flat_map(|v| [Path::new("--vars"), v]))
            .args(["--format", "json", "--yes"])
            .env("RUNBOOK_STATE_DIR", self.dir.join("state"))
            .env(
                "RUNBOOK_PATH",
                std::env::join_paths(&self.search_path).unwrap_or_default(),
            );
        let out = match cmd.output() {
            Ok(o) => o,
            Err(e) => {
                return Ran {
                    code: -1,
                    stdout: String::new(),
                    stderr: format!("cannot run {}: {e}", self.runbook.display()),
                    finished: None,
                };
            }
        };
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let finished = stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<Json>(l).ok())
            .find(|e| e["event"] == "run-finished");
        Ran {
            code: out.status.code().unwrap_or(-1),
            stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            finished,
        }
    }

    fn testkit(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(&self.testkit)
            .args(args)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.testkit.display()))?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!(
                "{}{}",
                text,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Runs every stage, in order; a stage that fails does not stop the ones that can
    /// still tell something, but the service is always stopped at the end.
    pub fn run(mut self) -> Result<DrillReport, DrillError> {
        let started = Instant::now();
        if !self.testkit.is_file() {
            return Err(DrillError::Setup(format!(
                "the drill's sandbox tools are missing: {} (build them: cargo build --release)",
                self.testkit.display()
            )));
        }
        let mut stages: Vec<Stage> = Vec::new();
        let mut push = |this: &mut Self, stage: Stage| {
            (this.on_stage)(stages.len() + 1, &stage);
            stages.push(stage);
        };

        let dir = self.dir.display().to_string();
        let t = Instant::now();
        let built = self.testkit(&["atocore-sandbox", &dir, "--port", "0", "--force"]);
        let ok = built.is_ok();
        let detail = built.map_or_else(|e| e, |text| text.lines().next().unwrap_or("").to_string());
        push(
            &mut self,
            Stage {
                name: "sandbox",
                purpose: "build an AtoCore deployment: database, registry, vector store",
                ok,
                seconds: t.elapsed().as_secs_f64(),
                detail,
            },
        );
        if !ok {
            return Ok(self.report(stages, started, None, None));
        }

        let r = self.runbook(&["run", "atocore/service", "--set", "state=started"], &[]);
        push(
            &mut self,
            stage_of(
                "start",
                "start the stand-in service (daemon-start)",
                &r,
                r.code == 0,
                String::new(),
            ),
        );

        let r = self.runbook(
            &["run", "atocore/backup", "--set", "include_chroma=true"],
            &[],
        );
        let stamp = r
            .output("stamp")
            .and_then(Json::as_str)
            .unwrap_or("")
            .to_string();
        push(
            &mut self,
            stage_of(
                "backup",
                "online backup with the vector store, validated, then published",
                &r,
                r.code == 0 && !stamp.is_empty(),
                format!("snapshot {stamp}"),
            ),
        );

        let r = self.runbook(&["run", "atocore/list"], &[]);
        let count = r
            .output("backups")
            .and_then(Json::as_array)
            .map_or(0, Vec::len);
        let listed = r.output("latest").and_then(Json::as_str) == Some(stamp.as_str());
        push(
            &mut self,
            stage_of(
                "list",
                "list snapshots newest first, with metadata",
                &r,
                r.code == 0 && listed,
                format!("{count} snapshot(s), latest {stamp}"),
            ),
        );

        let r = self.runbook(
            &[
                "run",
                "atocore/validate",
                "--set",
                &format!("stamp={stamp}"),
            ],
            &[],
        );
        let valid = r.output("valid") == Some(&Json::Bool(true));
        push(
            &mut self,
            stage_of(
                "validate",
                "integrity_check, registry JSON, vector store present",
                &r,
                r.code == 0 && valid,
                format!("valid: {valid}"),
            ),
        );

        let root = self.atocore_root().display().to_string();
        let t = Instant::now();
        let damaged = self.testkit(&["atocore-damage", &root, "--kind", "delete-documents"]);
        let ok = damaged.is_ok();
        let detail = damaged.unwrap_or_else(|e| e);
        push(
            &mut self,
            Stage {
                name: "damage",
                purpose: "damage the live data (delete every document)",
                ok,
                seconds: t.elapsed().as_secs_f64(),
                detail,
            },
        );

        let r = self.runbook(&["run", "atocore/verify"], &[]);
        push(
            &mut self,
            stage_of(
                "detect",
                "verify notices the damage",
                &r,
                r.code == 1,
                r.why(),
            ),
        );

        let r = self.runbook(
            &["run", "atocore/restore", "--set", &format!("stamp={stamp}")],
            &[],
        );
        let rto = r.finished.as_ref().and_then(|f| f["duration"].as_f64());
        let documents = r.output("documents").cloned().unwrap_or(Json::Null);
        push(
            &mut self,
            stage_of(
                "restore",
                "stop, safety copy, restore DB/registry/vector store, start, verify",
                &r,
                r.code == 0,
                format!("{documents} documents back"),
            ),
        );

        let r = self.runbook(&["run", "atocore/verify"], &[]);
        push(
            &mut self,
            stage_of(
                "verify",
                "health, stats, projects, known-good context query",
                &r,
                r.code == 0,
                format!(
                    "{} chunks used",
                    r.output("chunks_used").cloned().unwrap_or(Json::Null)
                ),
            ),
        );

        // A restore whose verification must fail: it has to roll back to the exact bytes.
        let live = [
            self.atocore_root().join("data"),
            self.atocore_root().join("config"),
        ];
        let strict = self.dir.join("impossible-verify.yaml");
        let wrote = std::fs::write(
            &strict,
            "# verify demands more documents than exist: the restore must roll back\nmin_documents: 1000000000\n",
        );
        // Safety copies are named by the second (PRESERVE_STAMP), and a restore refuses
        // to overwrite an earlier one: start this one in a new second.
        std::thread::sleep(std::time::Duration::from_millis(
            1000 - u64::from(chrono::Utc::now().timestamp_subsec_millis()).min(999),
        ));
        let before = digest(&live);
        let r = self.runbook(
            &["run", "atocore/restore", "--set", &format!("stamp={stamp}")],
            &[&strict],
        );
        let after = digest(&live);
        let rolled_back =
            wrote.is_ok() && r.code == 1 && r.status() == "rolled-back" && before == after;
        push(
            &mut self,
            stage_of(
                "forced-rollback",
                "a restore whose verify fails rolls back byte for byte",
                &r,
                rolled_back,
                format!(
                    "status {}, live data {}",
                    r.status(),
                    if before == after {
                        "byte-identical to before"
                    } else {
                        "CHANGED"
                    }
                ),
            ),
        );

        let r = self.runbook(&["run", "atocore/verify"], &[]);
        push(
            &mut self,
            stage_of(
                "verify-after-rollback",
                "the service is back and healthy",
                &r,
                r.code == 0,
                String::new(),
            ),
        );

        let drill_dir = self.dir.join("drill");
        let port = free_port()?;
        let argv = serde_json::json!([
            self.testkit,
            "atocore-standin",
            "--root",
            drill_dir.join("atocore"),
            "--listen",
            format!("127.0.0.1:{port}")
        ]);
        let r = self.runbook(
            &[
                "run",
                "atocore/drill",
                "--set",
                &format!("drill_dir={}", drill_dir.display()),
                "--set",
                &format!("drill_service_argv={argv}"),
                "--set",
                &format!("drill_addr=127.0.0.1:{port}"),
            ],
            &[],
        );
        let drill_rto = r.output("rto_seconds").and_then(Json::as_f64);
        push(
            &mut self,
            stage_of(
                "scratch-drill",
                "restore into a scratch dir with its own service, verify, tear down",
                &r,
                r.code == 0,
                format!("scratch RTO {:.3}s", drill_rto.unwrap_or(0.0)),
            ),
        );

        let r = self.runbook(&["plan", "atocore/retention"], &[]);
        push(
            &mut self,
            stage_of(
                "retention-plan",
                "retention dry-run: what would be deleted and why the rest stays",
                &r,
                r.code == 0,
                plan_summary(&r.stdout),
            ),
        );

        let r = self.runbook(&["run", "atocore/service", "--set", "state=stopped"], &[]);
        push(
            &mut self,
            stage_of(
                "stop",
                "stop the stand-in service",
                &r,
                r.code == 0,
                String::new(),
            ),
        );
        Ok(self.report(stages, started, rto, drill_rto))
    }

    fn report(
        &self,
        stages: Vec<Stage>,
        started: Instant,
        rto: Option<f64>,
        drill_rto: Option<f64>,
    ) -> DrillReport {
        DrillReport {
            sandbox: self.dir.clone(),
            ok: stages.iter().all(|s| s.ok) && stages.len() == STAGES,
            stages,
            rto_seconds: rto,
            drill_rto_seconds: drill_rto,
            seconds: started.elapsed().as_secs_f64(),
        }
    }
}

/// The number of stages of a complete drill.
pub const STAGES: usize = 14;

fn stage_of(name: &'static str, purpose: &'static str, r: &Ran, ok: bool, detail: String) -> Stage {
    let seconds = r
        .finished
        .as_ref()
        .and_then(|f| f["duration"].as_f64())
        .unwrap_or(0.0);
    let detail = if ok {
        detail
    } else {
        format!("exit {}: {}", r.code, r.why())
    };
    Stage {
        name,
        purpose,
        ok,
        seconds,
        detail,
    }
}

fn plan_summary(plan_json: &str) -> String {
    let v: Json = serde_json::from_str(plan_json).unwrap_or_default();
    let detail = v["steps"][0]["detail"].as_str().unwrap_or("");
    detail.chars().take(120).collect()
}

pub fn text_line(n: usize, s: &Stage) -> String {
    format!(
        "[{n:>2}/{STAGES}] {:<22} {:<4} {:>7.2}s  {}{}",
        s.name,
        if s.ok { "ok" } else { "FAIL" },
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
    let failed = r.stages.iter().filter(|s| !s.ok).count();
    let mut s = format!(
        "drill {}: {} stages, {} failed, {:.1}s in all\n",
        if r.ok { "passed" } else { "FAILED" },
        r.stages.len(),
        failed,
        r.seconds
    );
    if let Some(rto) = r.rto_seconds {
        s.push_str(&format!("time to restore (RTO): {rto:.2}s (restore run: stop, safety copy, restore, start, verify)\n"));
    }
    if let Some(rto) = r.drill_rto_seconds {
        s.push_str(&format!(
            "scratch drill RTO: {rto:.2}s (copy, start, verify)\n"
        ));
    }
    s
}

/// JUnit XML, for CI systems: one testcase per stage.
pub fn junit(r: &DrillReport) -> String {
    let esc = |t: &str| {
        t.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    };
    let failures = r.stages.iter().filter(|s| !s.ok).count();
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
            esc(s.name),
            s.seconds
        ));
        if s.ok {
            x.push_str(&format!(
                "<system-out>{}</system-out>",
                esc(&format!("{}: {}", s.purpose, s.detail))
            ));
        } else {
            x.push_str(&format!(
                "<failure message=\"{}\">{}</failure>",
                esc(&s.detail),
                esc(s.purpose)
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
