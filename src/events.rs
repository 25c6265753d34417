//! What the executor reports. It never prints: the journal, the terminal renderer and
//! the JSON writer each consume these.

use std::path::PathBuf;
use std::time::Duration;

use indexmap::IndexMap;
use serde::Serialize;
use serde_json::Value as Json;

use crate::actions::Outputs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Section {
    Main,
    Rollback,
}

impl Section {
    pub fn as_str(self) -> &'static str {
        match self {
            Section::Main => "main",
            Section::Rollback => "rollback",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunStatus {
    Running,
    Succeeded,
    Failed,
    Interrupted,
    RolledBack,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Interrupted => "interrupted",
            RunStatus::RolledBack => "rolled-back",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            RunStatus::Running,
            RunStatus::Succeeded,
            RunStatus::Failed,
            RunStatus::Interrupted,
            RunStatus::RolledBack,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }
}

/// Everything the journal needs to know about a new run.
#[derive(Debug, Clone, Serialize)]
pub struct RunHeader {
    pub run_id: String,
    pub runbook: String,
    pub path: PathBuf,
    pub content_hash: String,
    /// Secret params masked.
    pub params: IndexMap<String, Json>,
    /// Frozen vars, without secret-derived ones.
    pub vars: IndexMap<String, String>,
    pub lock: String,
    pub started_at: String,
    pub pid: u32,
    /// Every runbook file of the run with its text: resume compares against these.
    #[serde(skip)]
    pub files: Vec<(PathBuf, String)>,
    /// The `--vars` values the run's runbooks declare as params (secrets left out):
    /// resume and rollback give them to called runbooks again.
    #[serde(skip)]
    pub inputs: IndexMap<String, Json>,
    /// The directory the run was started in: resume and rollback work there, so that
    /// anything still relative means what it meant.
    #[serde(skip)]
    pub cwd: PathBuf,
    /// The names (never the values) of the secrets given with `--set`/`--vars`: resume
    /// and rollback ask for each again.
    #[serde(skip)]
    pub secrets: Vec<String>,
    /// Main steps of the top runbook, in order: recorded as pending.
    pub steps: Vec<(String, &'static str)>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    RunStarted(Box<RunHeader>),
    /// An earlier run continues: `resume` or `rollback`.
    RunResumed {
        run_id: String,
        runbook: String,
        purpose: &'static str,
    },
    /// The frozen vars of a called runbook (key of the call step).
    FrameFrozen {
        key: String,
        vars: IndexMap<String, String>,
    },
    /// Written and synced before the step's side effect starts.
    StepStarted {
        key: String,
        section: Section,
        action: &'static str,
        attempt: u32,
        /// Rendered, secrets masked.
        args: Json,
    },
    StepSucceeded {
        key: String,
        section: Section,
        #[serde(with = "secs")]
        duration: Duration,
        outputs: Outputs,
        /// True when the step was found already done (resume reconciliation).
        reconciled: bool,
    },
    StepFailed {
        key: String,
        section: Section,
        #[serde(with = "secs")]
        duration: Duration,
        error: String,
        /// More attempts follow.
        will_retry: bool,
    },
    /// A step with `expect_failure` failed as it was expected to: it counts as done.
    StepFailedAsExpected {
        key: String,
        section: Section,
        #[serde(with = "secs")]
        duration: Duration,
        /// The error it failed with (secrets masked).
        error: String,
    },
    StepSkipped {
        key: String,
        section: Section,
        reason: String,
    },
    /// Resume found the step finished in an earlier attempt of this run.
    StepAlreadyDone {
        key: String,
        section: Section,
    },
    RollbackStarted {
        reason: String,
    },
    RunFinished {
        run_id: String,
        status: RunStatus,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        /// The runbook's declared outputs (secrets masked), when it succeeded.
        #[serde(skip_serializing_if = "Outputs::is_empty")]
        outputs: Outputs,
        #[serde(with = "secs")]
        duration: Duration,
    },
}

mod secs {
    use serde::Serializer;
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64((d.as_secs_f64() * 1000.0).round() / 1000.0)
    }
}

/// A consumer of events. The journal returns an error when it could not record an
/// event durably; the executor then stops before any further side effect.
pub trait EventSink {
    fn on_event(&mut self, event: &Event) -> Result<(), SinkError>;
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SinkError(pub String);
