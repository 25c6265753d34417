//! One host's part of a fleet command: the engine and runbook files installed there,
//! its run started or continued there over SSH, its events passed back as they come,
//! and how it ended.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indexmap::IndexMap;
use serde_json::Value as Json;

use super::FleetError;
use super::bundle::Bundle;
use super::inventory::Host;
use super::record::{self, HostStatus, Line, Writer};
use crate::actions::offsite::repo::RepoArgs;
use crate::actions::offsite::ssh::{Remote, SshError};

/// The engine the controller installs: a static build of this very version.
#[derive(Debug, Clone)]
pub struct Engine {
    pub path: PathBuf,
    pub sha256: String,
    pub version: String,
}

/// Whether an ELF file asks for a dynamic loader (a PT_INTERP program header): such
/// a build needs the controller's libc on every host.
fn asks_for_loader(bytes: &[u8]) -> Option<bool> {
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
        return None; // not a 64-bit little-endian ELF
    }
    let u64_at = |o: usize| {
        bytes
            .get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    let u16_at = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes(b.try_into().unwrap()))
    };
    let phoff = u64_at(0x20)? as usize;
    let phentsize = u16_at(0x36)? as usize;
    let phnum = u16_at(0x38)? as usize;
    let mut interp = false;
    for i in 0..phnum {
        let at = phoff.checked_add(i.checked_mul(phentsize)?)?;
        let kind = bytes.get(at..at + 4)?;
        interp |= u32::from_le_bytes(kind.try_into().unwrap()) == 3;
    }
    Some(interp)
}

/// Engine builds found static and of a version, by file identity (path, device,
/// inode, size, mtime and ctime: any write to the file changes its ctime), with their
/// sha256: hashing a 24 MB build and running it cost ~120 ms per fleet command.
const CHECKED_ENGINES: &str = "checked-engines.json";

#[derive(serde::Serialize, serde::Deserialize)]
struct CheckedEngine {
    sha256: String,
    version: String,
}

fn file_identity(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(format!(
        "{}|{}|{}|{}|{}.{}|{}.{}",
        path.display(),
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec()
    ))
}

fn checked_engines(state_dir: &Path) -> BTreeMap<String, CheckedEngine> {
    std::fs::read(record::dir(state_dir).join(CHECKED_ENGINES))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Keeps what was found (one entry per path, 16 at most: past that it starts over),
/// written whole and renamed; a failure to write only costs the next command the
/// check again.
fn remember_engine(state_dir: &Path, identity: String, engine: &Engine) {
    let mut all = checked_engines(state_dir);
    all.retain(|k, _| !k.starts_with(&format!("{}|", engine.path.display())));
    if all.len() >= 16 {
        all.clear();
    }
    all.insert(
        identity,
        CheckedEngine {
            sha256: engine.sha256.clone(),
            version: engine.version.clone(),
        },
    );
    let dir = record::dir(state_dir);
    let tmp = dir.join(format!("{CHECKED_ENGINES}.tmp{}", std::process::id()));
    let written = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(&tmp, serde_json::to_vec(&all).unwrap_or_default()))
        .and_then(|()| std::fs::rename(&tmp, dir.join(CHECKED_ENGINES)));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

impl Engine {
    /// `given` (`--engine`) or this program, checked: statically linked, and
    /// reporting this version. A build checked before (same file, unchanged) is taken
    /// from `STATE_DIR/fleet/checked-engines.json`; `remember` records a new one there
    /// (not for `fleet plan`, which writes nothing).
    pub fn resolve(
        given: Option<&Path>,
        state_dir: &Path,
        remember: bool,
    ) -> Result<Engine, FleetError> {
        let path = match given {
            Some(p) => crate::params::absolute(p),
            None => std::env::current_exe()
                .map_err(|e| FleetError::Internal(format!("cannot find this program: {e}")))?,
        };
        let ours = format!("runbook {}", env!("CARGO_PKG_VERSION"));
        let identity = file_identity(&path);
        if let Some(known) = identity
            .as_ref()
            .and_then(|id| checked_engines(state_dir).remove(id))
            .filter(|k| k.version == ours)
        {
            return Ok(Engine {
                path,
                sha256: known.sha256,
                version: known.version,
            });
        }
        let engine = Self::check(path, &ours)?;
        if let (true, Some(identity)) = (remember, identity) {
            remember_engine(state_dir, identity, &engine);
        }
        Ok(engine)
    }

    fn check(path: PathBuf, ours: &str) -> Result<Engine, FleetError> {
        let mut bytes = Vec::new();
        std::fs::File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|e| {
                FleetError::Refused(format!("cannot read the engine {}: {e}", path.display()))
            })?;
        let build = "build one with `RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --target x86_64-unknown-linux-gnu` and pass it with --engine target/x86_64-unknown-linux-gnu/release/runbook";
        match asks_for_loader(&bytes) {
            None => {
                return Err(FleetError::Refused(format!(
                    "the engine {} is not a 64-bit ELF program; {build}",
                    path.display()
                )));
            }
            Some(true) => {
                return Err(FleetError::Refused(format!(
                    "the engine {} is dynamically linked: it would need this machine's libraries on every host; {build}",
                    path.display()
                )));
            }
            Some(false) => {}
        }
        let out = std::process::Command::new(&path)
            .arg("--version")
            .output()
            .map_err(|e| {
                FleetError::Refused(format!("cannot run the engine {}: {e}", path.display()))
            })?;
        let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if version != ours {
            return Err(FleetError::Refused(format!(
                "the engine {} reports `{version}`, this controller is `{ours}`: every host must run the same version; {build}",
                path.display()
            )));
        }
        use sha2::Digest;
        let sha256 = crate::actions::files::hex(&sha2::Sha256::digest(&bytes));
        Ok(Engine {
            path,
            sha256,
            version,
        })
    }

    /// Its path inside a host's `dir`: named by digest, so installing a new build
    /// never replaces one a run is using.
    pub fn relative(&self) -> String {
        format!("bin/runbook-{}", &self.sha256[..16])
    }
}

/// What the controller sends every host.
pub struct Shipment<'a> {
    pub engine: &'a Engine,
    pub bundle: &'a Bundle,
    /// The local tree that mirrors a host's `dir` (engine and runbook files).
    pub stage: PathBuf,
}

impl Shipment<'_> {
    pub fn bundle_relative(&self) -> String {
        bundle_relative(&self.bundle.digest)
    }

    fn paths(&self, host: &Host) -> HostPaths {
        HostPaths::new(host, self.engine, &self.bundle.digest)
    }

    /// Builds the stage once per engine and bundle (kept in the state dir; built in a
    /// temp dir and renamed, so a half-built one is never used).
    pub fn prepare(
        state_dir: &Path,
        engine: &Engine,
        bundle: &Bundle,
    ) -> Result<PathBuf, FleetError> {
        let stage = record::dir(state_dir).join("stage").join(format!(
            "{}-{}",
            &engine.sha256[..16],
            &bundle.digest[..16]
        ));
        if stage.is_dir() {
            return Ok(stage);
        }
        let io = |e: std::io::Error| {
            FleetError::Internal(format!("cannot build {}: {e}", stage.display()))
        };
        let tmp = stage.with_extension(format!("tmp{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(tmp.join("bin")).map_err(io)?;
        std::fs::copy(
            &engine.path,
            tmp.join(format!("bin/runbook-{}", &engine.sha256[..16])),
        )
        .map_err(io)?;
        bundle
            .write_to(&tmp.join("runbooks").join(&bundle.digest[..16]))
            .map_err(io)?;
        std::fs::rename(&tmp, &stage).map_err(io)?;
        Ok(stage)
    }
}

pub fn repo_args(host: &Host) -> RepoArgs {
    RepoArgs {
        host: host.spec.address.clone(),
        port: host.spec.port,
        user: host.spec.user.clone(),
        dir: host.spec.dir.clone(),
        ssh_key: host.spec.ssh_key.clone(),
        known_hosts: host.spec.known_hosts.clone(),
        key: None,
    }
}

/// Where, in a host's `dir`, a fleet's runbook files are: by digest.
pub fn bundle_relative(digest: &str) -> String {
    format!("runbooks/{}", &digest[..16])
}

/// The paths of one engine and one bundle on one host.
pub struct HostPaths {
    pub engine: String,
    pub bundle: String,
    pub state: String,
}

impl HostPaths {
    pub fn new(host: &Host, engine: &Engine, digest: &str) -> HostPaths {
        let dir = |rel: &str| host.spec.dir.join(rel).display().to_string();
        HostPaths {
            engine: dir(&engine.relative()),
            bundle: dir(&bundle_relative(digest)),
            state: dir("state"),
        }
    }

    /// [`ENGINE_SCRIPT`]'s words: the engine, the runbook dir, then the engine's
    /// global options (search path, state dir, JSON output) and `words`.
    pub fn engine_words<'a>(&'a self, words: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec![
            self.engine.as_str(),
            &self.bundle,
            "--path",
            &self.bundle,
            "--state-dir",
            &self.state,
            "--format",
            "json",
        ];
        args.extend_from_slice(words);
        args
    }
}

/// Runs the engine installed under the host's dir, or exits 127 when it or the
/// runbook files are not (completely) there. `$1` engine, `$2` runbook dir.
pub const ENGINE_SCRIPT: &str = "e=$1 b=$2; shift 2; if [ ! -x \"$e\" ] || [ ! -f \"$b/.digest\" ]; then exit 127; fi; exec \"$e\" \"$@\"";
pub const NOT_INSTALLED: i32 = 127;

/// What a host's run reported back.
#[derive(Debug, Default)]
struct Observed {
    started: bool,
    failed_step: Option<String>,
    error: Option<String>,
}

impl Observed {
    fn take(&mut self, v: &Json) {
        match v["event"].as_str() {
            Some("run-started" | "run-resumed") => self.started = true,
            Some("step-failed") if v["will_retry"] != Json::Bool(true) => {
                if v["section"] == "main" {
                    self.failed_step = v["key"].as_str().map(str::to_string);
                }
                self.error = v["error"].as_str().map(str::to_string);
            }
            Some("run-finished") => {
                if let Some(e) = v["error"].as_str() {
                    self.error = Some(e.to_string());
                }
            }
            None => {
                // An error before the run started (refused plan, lock held, bad vars).
                if let Some(e) = v["error"].as_str() {
                    self.error = Some(e.to_string());
                }
                if let Some(step) = v["step"].as_str() {
                    self.failed_step = Some(step.to_string());
                }
            }
            _ => {}
        }
    }
}

/// How one host ended in this attempt.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: HostStatus,
    pub run_id: Option<String>,
    pub failed_step: Option<String>,
    pub error: Option<String>,
    pub duration: Duration,
}

impl Outcome {
    /// The host's row, as the record and the summary show it.
    pub fn state(&self, host: &str) -> super::record::HostState {
        super::record::HostState {
            host: host.to_string(),
            status: self.status,
            run_id: self.run_id.clone(),
            failed_step: self.failed_step.clone(),
            error: self.error.clone(),
            duration_secs: Some(self.duration.as_secs_f64()),
        }
    }
}

/// Progress a host's thread reports to the controller's loop.
pub enum Report {
    /// An event line of the host's run (JSON, as the engine prints it).
    Event(Json),
    /// What the controller is doing with the host now.
    Doing(String),
}

/// What to do on a host.
#[derive(Debug, Clone)]
pub enum Job {
    /// A new run.
    Start,
    /// The host's run of this id: look it up there and continue it if it did not
    /// finish.
    Continue(String),
}

pub struct HostRun<'a> {
    pub host: &'a Host,
    pub shipment: &'a Shipment<'a>,
    pub record: &'a Mutex<Writer>,
    /// The values for a new run (YAML, sent on stdin).
    pub vars: IndexMap<String, Json>,
    /// The secret values only: what a resumed run asks for again.
    pub secrets: IndexMap<String, Json>,
    pub report: &'a (dyn Fn(Report) + Sync),
}

pub fn yaml(values: &IndexMap<String, Json>) -> Vec<u8> {
    if values.is_empty() {
        return b"{}\n".to_vec();
    }
    serde_yaml::to_string(values)
        .unwrap_or_else(|_| "{}\n".into())
        .into_bytes()
}

impl HostRun<'_> {
    /// `ENGINE --path RUNBOOKS --state-dir STATE --format json WORDS...` on the host.
    fn engine(&self, words: &[&str], stdin: &[u8]) -> (Result<(i32, String), SshError>, Observed) {
        let paths = self.shipment.paths(self.host);
        let args = paths.engine_words(words);
        let mut seen = Observed::default();
        let repo = repo_args(self.host);
        let remote = Remote::new(&repo);
        let result = remote.run_lines(ENGINE_SCRIPT, &args, stdin, &mut |line| {
            if let Ok(v) = serde_json::from_str::<Json>(line) {
                seen.take(&v);
                (self.report)(Report::Event(v));
            }
        });
        (result, seen)
    }

    fn install(&self) -> Result<(), SshError> {
        (self.report)(Report::Doing("installing".into()));
        install(self.host, self.shipment)
    }

    fn starting(&self, run_id: &str) -> Result<(), FleetError> {
        self.record
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .append(&Line::HostStarting {
                host: self.host.name.clone(),
                run_id: run_id.to_string(),
                at: record::now(),
            })
    }

    /// Runs `words` on the host, installing first when the engine is not there.
    fn engine_installing(
        &self,
        words: &[&str],
        stdin: &[u8],
    ) -> (Result<(i32, String), SshError>, Observed) {
        let first = self.engine(words, stdin);
        if !matches!(first.0, Ok((NOT_INSTALLED, _))) {
            return first;
        }
        if let Err(e) = self.install() {
            return (Err(e), Observed::default());
        }
        self.engine(words, stdin)
    }

    pub fn go(&self, job: Job) -> Outcome {
        let started = Instant::now();
        let mut out = match job {
            Job::Start => self.start(),
            Job::Continue(id) => self.continue_run(id),
        };
        out.duration = started.elapsed();
        out
    }

    fn outcome(status: HostStatus, run_id: Option<String>, error: Option<String>) -> Outcome {
        Outcome {
            status,
            run_id,
            failed_step: None,
            error,
            duration: Duration::ZERO,
        }
    }

    pub fn unreachable(e: &SshError) -> String {
        match e {
            SshError::Unreachable { detail, .. } => format!("cannot reach the host: {detail}"),
            other => other.to_string(),
        }
    }

    fn start(&self) -> Outcome {
        let run_id = crate::app::new_run_id();
        if let Err(e) = self.starting(&run_id) {
            return Self::outcome(HostStatus::Failed, None, Some(e.to_string()));
        }
        (self.report)(Report::Doing("starting".into()));
        let words = [
            "--expect-digest",
            &self.shipment.bundle.digest,
            "run",
            &self.shipment.bundle.name,
            "--run-id",
            &run_id,
            "--vars",
            "-",
            "--yes",
        ];
        let (result, seen) = self.engine_installing(&words, &yaml(&self.vars));
        Self::judge(result, seen, Some(run_id))
    }

    fn judge(
        result: Result<(i32, String), SshError>,
        seen: Observed,
        run_id: Option<String>,
    ) -> Outcome {
        let (status, error) = match result {
            Ok((0, _)) => (HostStatus::Succeeded, None),
            Ok((code, stderr)) => (
                HostStatus::Failed,
                Some(
                    seen.error
                        .clone()
                        .unwrap_or_else(|| format!("exit {code}: {stderr}")),
                ),
            ),
            // Lost after the run started there: it may go on, or have stopped; the
            // host's journal knows, and `fleet resume` asks it.
            Err(e) if seen.started => (HostStatus::Interrupted, Some(Self::unreachable(&e))),
            Err(e) => (HostStatus::Unreachable, Some(Self::unreachable(&e))),
        };
        Outcome {
            status,
            run_id,
            failed_step: if status == HostStatus::Failed {
                seen.failed_step
            } else {
                None
            },
            error,
            duration: Duration::ZERO,
        }
    }

    fn continue_run(&self, run_id: String) -> Outcome {
        loop {
            (self.report)(Report::Doing("asking".into()));
            let mut shown = Vec::new();
            let paths = self.shipment.paths(self.host);
            let args = repo_args(self.host);
            let result = Remote::new(&args).run_lines(
                ENGINE_SCRIPT,
                &paths.engine_words(&["show", &run_id]),
                b"",
                &mut |line| shown.push(line.to_string()),
            );
            let (code, _) = match result {
                Ok(r) => r,
                Err(e) => {
                    return Self::outcome(
                        HostStatus::Unreachable,
                        Some(run_id),
                        Some(Self::unreachable(&e)),
                    );
                }
            };
            if code == NOT_INSTALLED {
                // Its files are gone from the host: install them again, then look.
                if let Err(e) = self.install() {
                    return Self::judge(Err(e), Observed::default(), Some(run_id));
                }
                continue;
            }
            let record: Json = serde_json::from_str(&shown.join("\n")).unwrap_or_default();
            let status = record["status"].as_str().unwrap_or("");
            match (code, status) {
                // The journal there has no such run: the controller died between
                // recording the id and the run's start. A new run, then.
                (2, _) => return self.start(),
                (0, "succeeded") => {
                    return Self::outcome(HostStatus::Succeeded, Some(run_id), None);
                }
                (0, "running") => {
                    (self.report)(Report::Doing("running there (started earlier)".into()));
                    std::thread::sleep(Duration::from_millis(500));
                }
                (0, _) => {
                    if let Err(e) = self.starting(&run_id) {
                        return Self::outcome(
                            HostStatus::Failed,
                            Some(run_id),
                            Some(e.to_string()),
                        );
                    }
                    (self.report)(Report::Doing("resuming".into()));
                    let words = ["resume", &run_id, "--vars", "-", "--yes"];
                    let (result, seen) = self.engine(&words, &yaml(&self.secrets));
                    return Self::judge(result, seen, Some(run_id));
                }
                (code, _) => {
                    return Self::outcome(
                        HostStatus::Failed,
                        Some(run_id),
                        Some(format!(
                            "`runbook show` there exited {code}: {}",
                            shown.join(" ")
                        )),
                    );
                }
            }
        }
    }
}

/// Puts the engine and the runbook files under the host's dir: one directory, one
/// rsync of what is missing there, then the marker that makes them usable.
pub fn install(host: &Host, shipment: &Shipment) -> Result<(), SshError> {
    let args = repo_args(host);
    let remote = Remote::new(&args);
    let dir = host.spec.dir.display().to_string();
    remote.run(
        "creating the fleet directory",
        "mkdir -p -- \"$1/bin\" \"$1/runbooks\" \"$1/state\"",
        &[&dir],
        b"",
        &[],
    )?;
    let b = shipment.bundle_relative();
    let mut names = vec![shipment.engine.relative()];
    names.extend(
        shipment
            .bundle
            .files
            .iter()
            .map(|(p, _)| format!("{b}/{}", p.display())),
    );
    remote.upload(&shipment.stage, &names, None)?;
    // The marker last: the engine script runs nothing until every file is there.
    let bundle_dir = host.spec.dir.join(&b).display().to_string();
    remote.run(
        "marking the runbook files complete",
        "printf '%s\\n' \"$2\" > \"$1/.digest.tmp\" && mv -f -- \"$1/.digest.tmp\" \"$1/.digest\"",
        &[&bundle_dir, &shipment.bundle.digest],
        b"",
        &[],
    )?;
    Ok(())
}
