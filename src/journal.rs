//! The durable record of runs: one SQLite file in the state dir.
//!
//! Every event is its own transaction with `synchronous=FULL`, so a step's intent is
//! on disk before its side effect starts, and a SIGKILL at any point loses nothing
//! that was reported. The schema carries a format version.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde_json::Value as Json;

use crate::actions::Outputs;
use crate::events::{Event, EventSink, RunStatus, Section, SinkError};

pub const FORMAT_VERSION: i64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("cannot create state dir {path}: {source}; {CHOOSE_ANOTHER}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state dir {path} {why}; {CHOOSE_ANOTHER}")]
    Unusable { path: PathBuf, why: String },
    #[error(
        "journal {path} cannot be opened: {source}; if it is damaged or not a runbook journal, move it aside, or {CHOOSE_ANOTHER_LOWER}"
    )]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "journal {path} has format version {found}; this engine reads version {FORMAT_VERSION}"
    )]
    Version { path: PathBuf, found: i64 },
    #[error("no run `{0}` in the journal (`runbook runs` lists them)")]
    NoSuchRun(String),
}

const CHOOSE_ANOTHER: &str =
    "fix it, or choose another state dir (--state-dir DIR or RUNBOOK_STATE_DIR)";
const CHOOSE_ANOTHER_LOWER: &str =
    "choose another state dir (--state-dir DIR or RUNBOOK_STATE_DIR)";

/// Refuses a state dir that exists but cannot hold the journal and locks: a file, or
/// a directory this process cannot write (a read-only mount stops root too). Every
/// command that reads or writes the state dir asks this first, so each reports the
/// same problem the same way (exit 4) rather than as a held lock or an empty journal.
pub fn check_state_dir(dir: &Path) -> Result<(), JournalError> {
    let unusable = |why: String| JournalError::Unusable {
        path: dir.to_path_buf(),
        why,
    };
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(unusable(format!("cannot be read: {e}"))),
        Ok(m) if !m.is_dir() => Err(unusable("is not a directory".into())),
        Ok(_) => {
            use std::os::unix::ffi::OsStrExt;
            let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
                .map_err(|_| unusable("has a NUL byte in its name".into()))?;
            // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
            if unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } == 0 {
                Ok(())
            } else {
                Err(unusable(format!(
                    "is not writable ({})",
                    std::io::Error::last_os_error()
                )))
            }
        }
    }
}

pub struct Journal {
    conn: Connection,
    path: PathBuf,
    pub state_dir: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub id: String,
    pub runbook: String,
    pub status: String,
    pub started_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    pub key: String,
    pub section: String,
    pub action: String,
    pub status: String,
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub args: Option<Json>,
    pub outputs: Outputs,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    #[serde(flatten)]
    pub summary: RunSummary,
    pub path: PathBuf,
    pub content_hash: String,
    pub lock: String,
    pub pid: u32,
    pub params: IndexMap<String, Json>,
    pub vars: IndexMap<String, String>,
    pub steps: Vec<StepRecord>,
    #[serde(skip)]
    pub files: Vec<(PathBuf, String)>,
    #[serde(skip)]
    pub frames: HashMap<String, IndexMap<String, String>>,
    /// See [`crate::events::RunHeader::inputs`]; empty for runs recorded before them.
    #[serde(skip)]
    pub inputs: IndexMap<String, Json>,
    /// See [`crate::events::RunHeader::cwd`]; `None` for runs recorded before it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cwd: Option<PathBuf>,
    /// See [`crate::events::RunHeader::secrets`]; `None` for runs recorded before.
    #[serde(rename = "secrets_given", skip_serializing_if = "Option::is_none")]
    pub secrets: Option<Vec<String>>,
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
  id TEXT PRIMARY KEY, runbook TEXT NOT NULL, path TEXT NOT NULL, content_hash TEXT NOT NULL,
  params TEXT NOT NULL, vars TEXT NOT NULL, lock TEXT NOT NULL, pid INTEGER NOT NULL,
  status TEXT NOT NULL, started_at TEXT NOT NULL, finished_at TEXT, error TEXT);
CREATE TABLE IF NOT EXISTS run_files (
  run_id TEXT NOT NULL, path TEXT NOT NULL, content TEXT NOT NULL, PRIMARY KEY (run_id, path));
CREATE TABLE IF NOT EXISTS run_inputs (
  run_id TEXT PRIMARY KEY, inputs TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS run_context (
  run_id TEXT PRIMARY KEY, cwd TEXT NOT NULL, secrets TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS frames (
  run_id TEXT NOT NULL, key TEXT NOT NULL, vars TEXT NOT NULL, PRIMARY KEY (run_id, key));
CREATE TABLE IF NOT EXISTS steps (
  run_id TEXT NOT NULL, section TEXT NOT NULL, key TEXT NOT NULL, seq INTEGER NOT NULL,
  action TEXT NOT NULL, status TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
  started_at TEXT, finished_at TEXT, duration REAL, args TEXT, outputs TEXT, error TEXT,
  PRIMARY KEY (run_id, section, key));
";

impl Journal {
    pub fn open(state_dir: &Path) -> Result<Self, JournalError> {
        check_state_dir(state_dir)?;
        std::fs::create_dir_all(state_dir).map_err(|source| JournalError::Dir {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let path = state_dir.join("journal.db");
        // Every failure while opening says the journal itself is unusable.
        let sql = |source| JournalError::Open {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(sql)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(sql)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sql)?;
        conn.execute_batch(SCHEMA).map_err(sql)?;
        let found: Option<String> = conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'format_version'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql)?;
        match found.and_then(|v| v.parse::<i64>().ok()) {
            None => {
                conn.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('format_version', ?1)",
                    [FORMAT_VERSION.to_string()],
                )
                .map_err(sql)?;
            }
            Some(FORMAT_VERSION) => {}
            Some(found) => return Err(JournalError::Version { path, found }),
        }
        Ok(Journal {
            conn,
            path,
            state_dir: state_dir.to_path_buf(),
        })
    }

    fn sql(&self) -> impl Fn(rusqlite::Error) -> JournalError + '_ {
        |source| JournalError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    pub fn record(&self, run_id: &str, event: &Event) -> Result<(), JournalError> {
        let c = &self.conn;
        let e = self.sql();
        match event {
            Event::RunStarted(h) => {
                let tx = c.unchecked_transaction().map_err(&e)?;
                tx.execute(
                    "INSERT INTO runs (id, runbook, path, content_hash, params, vars, lock, pid, status, started_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'running', ?9)",
                    params![
                        h.run_id,
                        h.runbook,
                        h.path.to_string_lossy(),
                        h.content_hash,
                        serde_json::to_string(&h.params).unwrap_or_default(),
                        serde_json::to_string(&h.vars).unwrap_or_default(),
                        h.lock,
                        h.pid,
                        h.started_at
                    ],
                )
                .map_err(&e)?;
                tx.execute(
                    "INSERT INTO run_inputs (run_id, inputs) VALUES (?1, ?2)",
                    params![
                        h.run_id,
                        serde_json::to_string(&h.inputs).unwrap_or_default()
                    ],
                )
                .map_err(&e)?;
                tx.execute(
                    "INSERT INTO run_context (run_id, cwd, secrets) VALUES (?1, ?2, ?3)",
                    params![
                        h.run_id,
                        h.cwd.to_string_lossy(),
                        serde_json::to_string(&h.secrets).unwrap_or_default()
                    ],
                )
                .map_err(&e)?;
                for (path, content) in &h.files {
                    tx.execute(
                        "INSERT INTO run_files (run_id, path, content) VALUES (?1, ?2, ?3)",
                        params![h.run_id, path.to_string_lossy(), content],
                    )
                    .map_err(&e)?;
                }
                for (seq, (key, action)) in h.steps.iter().enumerate() {
                    tx.execute(
                        "INSERT INTO steps (run_id, section, key, seq, action, status) VALUES (?1, 'main', ?2, ?3, ?4, 'pending')",
                        params![h.run_id, key, seq as i64, action],
                    )
                    .map_err(&e)?;
                }
                tx.commit().map_err(&e)?;
            }
            Event::RunResumed { .. } => {
                c.execute(
                    "UPDATE runs SET status = 'running', pid = ?2, finished_at = NULL, error = NULL WHERE id = ?1",
                    params![run_id, std::process::id()],
                )
                .map_err(&e)?;
            }
            Event::FrameFrozen { key, vars } => {
                c.execute(
                    "INSERT OR REPLACE INTO frames (run_id, key, vars) VALUES (?1, ?2, ?3)",
                    params![run_id, key, serde_json::to_string(vars).unwrap_or_default()],
                )
                .map_err(&e)?;
            }
            Event::StepStarted {
                key,
                section,
                action,
                attempt,
                args,
            } => {
                c.execute(
                    "INSERT INTO steps (run_id, section, key, seq, action, status, attempts, started_at, args)
                     VALUES (?1, ?2, ?3, (SELECT COALESCE(MAX(seq), -1) + 1 FROM steps WHERE run_id = ?1), ?4, 'started', ?5, ?6, ?7)
                     ON CONFLICT (run_id, section, key) DO UPDATE SET
                       status = 'started', attempts = ?5, started_at = ?6, args = ?7,
                       finished_at = NULL, duration = NULL, error = NULL",
                    params![run_id, section.as_str(), key, action, attempt, now(), compact_args(args).to_string()],
                )
                .map_err(&e)?;
            }
            Event::StepSucceeded {
                key,
                section,
                duration,
                outputs,
                ..
            } => {
                c.execute(
                    "UPDATE steps SET status = 'succeeded', finished_at = ?4, duration = ?5, outputs = ?6, error = NULL
                     WHERE run_id = ?1 AND section = ?2 AND key = ?3",
                    params![
                        run_id,
                        section.as_str(),
                        key,
                        now(),
                        duration.as_secs_f64(),
                        serde_json::to_string(outputs).unwrap_or_default()
                    ],
                )
                .map_err(&e)?;
            }
            Event::StepFailed {
                key,
                section,
                duration,
                error,
                ..
            } => {
                c.execute(
                    "UPDATE steps SET status = 'failed', finished_at = ?4, duration = ?5, error = ?6
                     WHERE run_id = ?1 AND section = ?2 AND key = ?3",
                    params![run_id, section.as_str(), key, now(), duration.as_secs_f64(), error],
                )
                .map_err(&e)?;
            }
            // Done, as expected: resume skips it, and its error stays readable.
            Event::StepFailedAsExpected {
                key,
                section,
                duration,
                error,
            } => {
                c.execute(
                    "UPDATE steps SET status = 'succeeded', finished_at = ?4, duration = ?5, outputs = '{}', error = ?6
                     WHERE run_id = ?1 AND section = ?2 AND key = ?3",
                    params![run_id, section.as_str(), key, now(), duration.as_secs_f64(), error],
                )
                .map_err(&e)?;
            }
            Event::StepSkipped {
                key,
                section,
                reason,
            } => {
                c.execute(
                    "INSERT INTO steps (run_id, section, key, seq, action, status, error)
                     VALUES (?1, ?2, ?3, (SELECT COALESCE(MAX(seq), -1) + 1 FROM steps WHERE run_id = ?1), '', 'skipped', ?4)
                     ON CONFLICT (run_id, section, key) DO UPDATE SET status = 'skipped', error = ?4, finished_at = ?5",
                    params![run_id, section.as_str(), key, reason, now()],
                )
                .map_err(&e)?;
            }
            Event::StepAlreadyDone { .. } | Event::RollbackStarted { .. } => {}
            Event::RunFinished { status, error, .. } => {
                c.execute(
                    "UPDATE runs SET status = ?2, finished_at = ?3, error = ?4 WHERE id = ?1",
                    params![run_id, status.as_str(), now(), error],
                )
                .map_err(&e)?;
            }
        }
        Ok(())
    }

    /// Runs, newest first, with `running` turned into `interrupted` when no live
    /// process holds the run's lock.
    pub fn runs(&self) -> Result<Vec<RunSummary>, JournalError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, runbook, status, started_at, finished_at, error, lock FROM runs ORDER BY started_at DESC, id DESC")
            .map_err(self.sql())?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    RunSummary {
                        id: r.get(0)?,
                        runbook: r.get(1)?,
                        status: r.get(2)?,
                        started_at: r.get(3)?,
                        finished_at: r.get(4)?,
                        error: r.get(5)?,
                    },
                    r.get::<_, String>(6)?,
                ))
            })
            .map_err(self.sql())?;
        let mut out = Vec::new();
        for row in rows {
            let (mut summary, lock) = row.map_err(self.sql())?;
            summary.status = self
                .live_status(&summary.id, &summary.status, &lock)
                .as_str()
                .to_string();
            out.push(summary);
        }
        Ok(out)
    }

    pub fn live_status(&self, run_id: &str, stored: &str, lock: &str) -> RunStatus {
        let status = RunStatus::parse(stored).unwrap_or(RunStatus::Failed);
        if status == RunStatus::Running && !crate::lock::held_by(&self.state_dir, lock, run_id) {
            RunStatus::Interrupted
        } else {
            status
        }
    }

    pub fn run(&self, run_id: &str) -> Result<RunRecord, JournalError> {
        let e = self.sql();
        let head = self
            .conn
            .query_row(
                "SELECT id, runbook, status, started_at, finished_at, error, path, content_hash, lock, pid, params, vars
                 FROM runs WHERE id = ?1",
                [run_id],
                |r| {
                    Ok((
                        RunSummary {
                            id: r.get(0)?,
                            runbook: r.get(1)?,
                            status: r.get(2)?,
                            started_at: r.get(3)?,
                            finished_at: r.get(4)?,
                            error: r.get(5)?,
                        },
                        r.get::<_, String>(6)?,
                        r.get::<_, String>(7)?,
                        r.get::<_, String>(8)?,
                        r.get::<_, u32>(9)?,
                        r.get::<_, String>(10)?,
                        r.get::<_, String>(11)?,
                    ))
                },
            )
            .optional()
            .map_err(&e)?
            .ok_or_else(|| JournalError::NoSuchRun(run_id.to_string()))?;
        let (mut summary, path, content_hash, lock, pid, params, vars) = head;
        summary.status = self
            .live_status(&summary.id, &summary.status, &lock)
            .as_str()
            .to_string();
        let mut stmt = self
            .conn
            .prepare(
                "SELECT key, section, action, status, attempts, started_at, finished_at, duration, args, outputs, error
                 FROM steps WHERE run_id = ?1 ORDER BY section = 'rollback', seq",
            )
            .map_err(&e)?;
        let steps = stmt
            .query_map([run_id], |r| {
                Ok(StepRecord {
                    key: r.get(0)?,
                    section: r.get(1)?,
                    action: r.get(2)?,
                    status: r.get(3)?,
                    attempts: r.get(4)?,
                    started_at: r.get(5)?,
                    finished_at: r.get(6)?,
                    duration: r.get(7)?,
                    args: r
                        .get::<_, Option<String>>(8)?
                        .and_then(|s| serde_json::from_str(&s).ok()),
                    outputs: r
                        .get::<_, Option<String>>(9)?
                        .and_then(|s| serde_json::from_str(&s).ok())
                        .unwrap_or_default(),
                    error: r.get(10)?,
                })
            })
            .map_err(&e)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(&e)?;
        let mut stmt = self
            .conn
            .prepare("SELECT path, content FROM run_files WHERE run_id = ?1 ORDER BY rowid")
            .map_err(&e)?;
        let files = stmt
            .query_map([run_id], |r| {
                Ok((
                    PathBuf::from(r.get::<_, String>(0)?),
                    r.get::<_, String>(1)?,
                ))
            })
            .map_err(&e)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(&e)?;
        let mut stmt = self
            .conn
            .prepare("SELECT key, vars FROM frames WHERE run_id = ?1")
            .map_err(&e)?;
        let frames = stmt
            .query_map([run_id], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })
            .map_err(&e)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(&e)?
            .into_iter()
            .map(|(k, v)| (k, serde_json::from_str(&v).unwrap_or_default()))
            .collect();
        let inputs: Option<String> = self
            .conn
            .query_row(
                "SELECT inputs FROM run_inputs WHERE run_id = ?1",
                [run_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(&e)?;
        let context: Option<(String, String)> = self
            .conn
            .query_row(
                "SELECT cwd, secrets FROM run_context WHERE run_id = ?1",
                [run_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(&e)?;
        let (cwd, secrets) = match context {
            Some((cwd, secrets)) => (
                Some(PathBuf::from(cwd)),
                Some(serde_json::from_str(&secrets).unwrap_or_default()),
            ),
            None => (None, None),
        };
        Ok(RunRecord {
            cwd,
            secrets,
            inputs: inputs
                .and_then(|i| serde_json::from_str(&i).ok())
                .unwrap_or_default(),
            summary,
            path: PathBuf::from(path),
            content_hash,
            lock,
            pid,
            params: serde_json::from_str(&params).unwrap_or_default(),
            vars: serde_json::from_str(&vars).unwrap_or_default(),
            steps,
            files,
            frames,
        })
    }
}

/// Argument strings longer than this are journaled as their size and digest.
pub const MAX_JOURNALED_ARG: usize = 4096;

/// The rendered arguments as the journal keeps them: a long string (a `write-file`
/// `content`, a large JSON body) becomes `{"bytes": N, "sha256": HEX}`. The text is
/// already in the journal once, as the runbook file or the frozen var it was rendered
/// from, and resume renders it again from those; the row only has to say which value
/// a step was given, for `runbook show` and for an operator comparing with a file.
fn compact_args(args: &Json) -> Json {
    match args {
        Json::String(s) if s.len() > MAX_JOURNALED_ARG => {
            use sha2::Digest;
            serde_json::json!({
                "bytes": s.len(),
                "sha256": crate::actions::files::hex(&sha2::Sha256::digest(s.as_bytes())),
            })
        }
        Json::Array(items) => Json::Array(items.iter().map(compact_args).collect()),
        Json::Object(map) => Json::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), compact_args(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

impl RunRecord {
    pub fn step(&self, section: Section, key: &str) -> Option<&StepRecord> {
        self.steps
            .iter()
            .find(|s| s.section == section.as_str() && s.key == key)
    }
}

/// The journal as an event consumer for one run.
pub struct JournalSink<'a> {
    pub journal: &'a Journal,
    pub run_id: String,
}

impl EventSink for JournalSink<'_> {
    fn on_event(&mut self, event: &Event) -> Result<(), SinkError> {
        self.journal
            .record(&self.run_id, event)
            .map_err(|e| SinkError(format!("could not write the journal: {e}")))
    }
}
