//! The controller's fleet record: one JSON Lines file per fleet run in the state dir's
//! `fleet/`, appended and synced line by line. Its first line names the format
//! version; each host's run id is written before that host is started, so a controller
//! killed at any point leaves a record that `fleet resume` can continue from. The
//! hosts' journals are the truth about their steps; this record is the truth about
//! which run on which host belongs to the fleet run.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::FleetError;
use super::inventory::Host;
use super::scheduler::FailLimit;

pub const FORMAT: &str = "runbook-fleet/1";

/// How a host ended (or stands) in a fleet run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostStatus {
    Succeeded,
    Failed,
    /// No connection could be made; nothing ran there in this attempt.
    Unreachable,
    /// The connection was lost while its run went on there, or the controller was
    /// killed: the host's journal knows how far it got.
    Interrupted,
    NotStarted,
    Running,
}

impl HostStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            HostStatus::Succeeded => "succeeded",
            HostStatus::Failed => "failed",
            HostStatus::Unreachable => "unreachable",
            HostStatus::Interrupted => "interrupted",
            HostStatus::NotStarted => "not-started",
            HostStatus::Running => "running",
        }
    }
}

/// What a fleet run was started with: the record's first line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Header {
    pub format: String,
    pub id: String,
    pub runbook: String,
    pub digest: String,
    /// The runbook files (relative path, text): what a resume compares against.
    pub files: Vec<(PathBuf, String)>,
    pub engine_sha256: String,
    pub engine_version: String,
    pub started_at: String,
    pub parallel: usize,
    pub max_fail: Option<FailLimit>,
    /// The selected hosts, their vars without the secret params.
    pub hosts: Vec<Host>,
    /// The names (never the values) of the secret params the run was given: a resume
    /// needs each of them again, as `runbook resume` does.
    #[serde(default)]
    pub secrets: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Line {
    FleetStarted(Box<Header>),
    FleetResumed {
        at: String,
    },
    /// Written (and synced) before the host's run is started or continued.
    HostStarting {
        host: String,
        run_id: String,
        at: String,
    },
    HostFinished {
        host: String,
        run_id: Option<String>,
        status: HostStatus,
        failed_step: Option<String>,
        error: Option<String>,
        duration_secs: f64,
        at: String,
    },
    FleetFinished {
        status: HostStatus,
        at: String,
    },
}

pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("fleet")
}

pub fn path(state_dir: &Path, id: &str) -> PathBuf {
    dir(state_dir).join(format!("{id}.jsonl"))
}

pub fn lock_path(state_dir: &Path, id: &str) -> PathBuf {
    dir(state_dir).join(format!("{id}.lock"))
}

/// Appends lines, each synced before `append` returns.
pub struct Writer {
    file: std::fs::File,
}

impl Writer {
    pub fn create(state_dir: &Path, id: &str) -> Result<Writer, FleetError> {
        let d = dir(state_dir);
        std::fs::create_dir_all(&d)
            .map_err(|e| FleetError::Internal(format!("cannot create {}: {e}", d.display())))?;
        Writer::open(state_dir, id, true)
    }

    pub fn open(state_dir: &Path, id: &str, new: bool) -> Result<Writer, FleetError> {
        let p = path(state_dir, id);
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create_new(new)
            .open(&p)
            .map_err(|e| FleetError::Internal(format!("cannot open {}: {e}", p.display())))?;
        Ok(Writer { file })
    }

    pub fn append(&mut self, line: &Line) -> Result<(), FleetError> {
        let mut text = serde_json::to_string(line)
            .map_err(|e| FleetError::Internal(format!("fleet record: {e}")))?;
        text.push('\n');
        self.file
            .write_all(text.as_bytes())
            .and_then(|()| self.file.sync_data())
            .map_err(|e| FleetError::Internal(format!("cannot write the fleet record: {e}")))
    }
}

/// One host as the record stands.
#[derive(Debug, Clone, Serialize)]
pub struct HostState {
    pub host: String,
    pub status: HostStatus,
    pub run_id: Option<String>,
    pub failed_step: Option<String>,
    pub error: Option<String>,
    pub duration_secs: Option<f64>,
}

impl HostState {
    pub fn new(host: &str, status: HostStatus) -> HostState {
        HostState {
            host: host.to_string(),
            status,
            run_id: None,
            failed_step: None,
            error: None,
            duration_secs: None,
        }
    }
}

/// A fleet run read back from its record.
#[derive(Debug, Clone)]
pub struct FleetRun {
    pub header: Header,
    pub states: IndexMap<String, HostState>,
    /// The last `fleet-finished`, if the last attempt ended.
    pub finished: Option<HostStatus>,
    /// A controller holds the record's lock now.
    pub live: bool,
}

impl FleetRun {
    pub fn read(state_dir: &Path, id: &str) -> Result<FleetRun, FleetError> {
        // The id names a file: `../x` or `/tmp/x` must not reach outside the state dir.
        let shape = id.strip_prefix("fleet-").is_some_and(|rest| {
            !rest.is_empty() && rest.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
        if !shape {
            return Err(FleetError::Invalid(format!(
                "`{id}` is not a fleet run id (fleet-YYYYMMDDTHHMMSSZ-xxxxxx; `runbook fleet runs` lists them)"
            )));
        }
        let p = path(state_dir, id);
        let file = std::fs::File::open(&p).map_err(|_| {
            FleetError::Invalid(format!(
                "no fleet run `{id}` in {} (`runbook fleet runs` lists them)",
                dir(state_dir).display()
            ))
        })?;
        let mut run: Option<FleetRun> = None;
        for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|e| FleetError::Internal(format!("{}: {e}", p.display())))?;
            if line.trim().is_empty() {
                continue;
            }
            if n == 0 {
                let v: Json = serde_json::from_str(&line).unwrap_or_default();
                let format = v["format"].as_str().unwrap_or("none");
                if format != FORMAT {
                    return Err(FleetError::Refused(format!(
                        "{}: fleet record format `{format}`, this engine reads `{FORMAT}`",
                        p.display()
                    )));
                }
            }
            let parsed: Line = match serde_json::from_str(&line) {
                Ok(l) => l,
                // A line cut short by a kill mid-write: everything before it holds.
                Err(_) => break,
            };
            match (parsed, run.as_mut()) {
                (Line::FleetStarted(header), None) => {
                    let states = header
                        .hosts
                        .iter()
                        .map(|h| {
                            (
                                h.name.clone(),
                                HostState::new(&h.name, HostStatus::NotStarted),
                            )
                        })
                        .collect();
                    run = Some(FleetRun {
                        header: *header,
                        states,
                        finished: None,
                        live: false,
                    });
                }
                (Line::FleetResumed { .. }, Some(r)) => r.finished = None,
                (Line::HostStarting { host, run_id, .. }, Some(r)) => {
                    if let Some(s) = r.states.get_mut(&host) {
                        s.status = HostStatus::Running;
                        s.run_id = Some(run_id);
                        s.failed_step = None;
                        s.error = None;
                    }
                }
                (
                    Line::HostFinished {
                        host,
                        run_id,
                        status,
                        failed_step,
                        error,
                        duration_secs,
                        ..
                    },
                    Some(r),
                ) => {
                    if let Some(s) = r.states.get_mut(&host) {
                        s.status = status;
                        if run_id.is_some() {
                            s.run_id = run_id;
                        }
                        s.failed_step = failed_step;
                        s.error = error;
                        s.duration_secs = Some(duration_secs);
                    }
                }
                (Line::FleetFinished { status, .. }, Some(r)) => r.finished = Some(status),
                _ => {
                    return Err(FleetError::Internal(format!(
                        "{}: line {} is out of order",
                        p.display(),
                        n + 1
                    )));
                }
            }
        }
        let mut run = run.ok_or_else(|| {
            FleetError::Internal(format!("{}: the record has no start line", p.display()))
        })?;
        run.live = crate::lock::holder_at(&lock_path(state_dir, id)).is_some();
        if !run.live {
            // No controller holds it: a host still "running" in the record lost its
            // controller (its own run may have gone on; `fleet resume` finds out).
            for s in run.states.values_mut() {
                if s.status == HostStatus::Running {
                    s.status = HostStatus::Interrupted;
                }
            }
        }
        Ok(run)
    }

    /// The fleet run's status: running while a controller has it; otherwise
    /// succeeded only if every host did, else failed (or interrupted when the last
    /// attempt never finished).
    pub fn status(&self) -> HostStatus {
        if self.live {
            return HostStatus::Running;
        }
        match self.finished {
            Some(s) => s,
            None => HostStatus::Interrupted,
        }
    }

    /// Every fleet run in the state dir, newest first.
    pub fn all(state_dir: &Path) -> Result<Vec<FleetRun>, FleetError> {
        let Ok(entries) = std::fs::read_dir(dir(state_dir)) else {
            return Ok(Vec::new());
        };
        let mut runs = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(id) = name.strip_suffix(".jsonl") {
                runs.push(FleetRun::read(state_dir, id)?);
            }
        }
        runs.sort_by(|a, b| {
            (&b.header.started_at, &b.header.id).cmp(&(&a.header.started_at, &a.header.id))
        });
        Ok(runs)
    }
}
