//! The runbook file as written: what serde_yaml reads, before any checking.
//!
//! A successful parse is not yet a valid runbook (see `load.rs`): templates, ids,
//! actions and calls are checked afterwards. The doc comments here become the
//! descriptions in the JSON Schema that editors show.

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A runbook: typed inputs, derived values, the steps to run and how to undo them.
#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "runbook", rename = "Runbook")]
pub struct RawRunbook {
    /// Format version. Only `1` exists.
    pub version: u32,
    /// One line saying what the runbook does; shown by `runbook list`.
    #[serde(default)]
    pub description: Option<String>,
    /// Typed inputs, set with `--set name=value` or a `--vars FILE`.
    #[serde(default)]
    pub params: IndexMap<String, RawParam>,
    /// Derived values (templates). Rendered once, in order, when the run is planned, and
    /// frozen in the journal: a resumed run sees the same values.
    #[serde(default)]
    #[schemars(with = "IndexMap<String, String>")]
    pub vars: IndexMap<String, serde_yaml::Value>,
    /// Directories (templates) below which destructive actions (`remove`) may act.
    #[serde(default)]
    pub roots: Vec<String>,
    /// Name of the lock held for the whole run. Default: the runbook's directory on the
    /// search path (`atocore` for `atocore/backup`), so runbooks of one set exclude each other.
    #[serde(default)]
    pub lock: Option<String>,
    /// The steps, run in order.
    pub steps: Vec<RawStep>,
    /// Steps run when a step fails (unless `--no-rollback`) and by `runbook rollback RUN_ID`.
    #[serde(default)]
    pub rollback: Vec<RawStep>,
    /// Values (templates over params, vars and step outputs) that the runbook returns; a
    /// calling runbook reads them as `steps.<id>.outputs.<name>`.
    #[serde(default)]
    pub outputs: IndexMap<String, String>,
}

/// The type of a param.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ParamType {
    Bool,
    Int,
    String,
    Path,
    /// A list of strings (in a vars file a YAML list; with --set a JSON array).
    List,
}

/// A typed input.
#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Param")]
pub struct RawParam {
    /// `bool`, `int`, `string`, `path` or `list` (of strings).
    #[serde(rename = "type")]
    pub kind: ParamType,
    /// Value used when none is given.
    #[serde(default)]
    #[schemars(with = "Option<serde_json::Value>")]
    pub default: Option<serde_yaml::Value>,
    /// The run is refused when no value is given (and there is no default).
    #[serde(default)]
    pub required: bool,
    /// What the param means; shown in plans and errors.
    #[serde(default)]
    pub description: Option<String>,
    /// Never written to the journal, plans or logs; every occurrence of its value in
    /// output is masked. It must be given again to `runbook resume`.
    #[serde(default)]
    pub secret: bool,
    /// For `string` params: a regular expression the whole value must match.
    #[serde(default)]
    pub pattern: Option<String>,
}

/// One step: an action with its arguments.
#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Step")]
pub struct RawStep {
    /// Unique within the runbook (main and rollback steps share one namespace).
    pub id: String,
    /// The action to run; see the list of actions in the README.
    pub action: String,
    /// What the step is for; shown in plans.
    #[serde(default)]
    pub description: Option<String>,
    /// An expression (minijinja syntax, no braces) over params, vars and earlier steps'
    /// outputs; the step is skipped when it is false.
    #[serde(default)]
    #[schemars(with = "Option<WhenSchema>")]
    pub when: Option<serde_yaml::Value>,
    /// The action's arguments. Strings are templates.
    #[serde(default, rename = "with")]
    #[schemars(with = "serde_json::Map<String, serde_json::Value>")]
    pub args: serde_yaml::Value,
    /// Run the step again when it fails.
    #[serde(default)]
    pub retry: Option<RawRetry>,
    /// Give up on the step after this long (`30s`, `10m`).
    #[serde(default)]
    pub timeout: Option<String>,
    /// Declares that running the step twice does no harm, so `resume` may simply run it
    /// again when it was interrupted. Overrides the action's own effect class.
    #[serde(default)]
    pub idempotent: Option<bool>,
    /// Hold an advisory file lock (flock) while the step runs — e.g. the ingestion lock
    /// held during a vector-store copy. To hold one lock over several steps, put them in
    /// a runbook and call it with a `lock`.
    #[serde(default)]
    pub lock: Option<RawStepLock>,
    /// `stop` (default): a failure stops the run (and runs the rollback section).
    /// `continue`: the failure is recorded and the run goes on; later steps can read
    /// `steps.<id>.status` and `steps.<id>.error` (for checks that report, say, every
    /// problem of a snapshot rather than the first).
    #[serde(default)]
    pub on_failure: OnFailure,
    /// The step is expected to fail (a drill shows that a check notices damage, or that
    /// a forced failure rolls back): it succeeds when its action, or the runbook it
    /// calls, fails with a matching error, and fails when it succeeds or fails
    /// otherwise. Later steps read the error as `steps.<id>.error`.
    #[serde(default)]
    pub expect_failure: Option<RawExpectFailure>,
}

/// The failure a step is expected to end with.
#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "ExpectFailure")]
pub struct RawExpectFailure {
    /// Text (a template) that the step's error must contain.
    pub contains: String,
}

/// What a failed step does to the run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    #[default]
    Stop,
    Continue,
}

/// A file lock held for the duration of one step.
#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "StepLock")]
pub struct RawStepLock {
    /// The lock file (a template); created if missing, its directory must exist.
    pub path: String,
    /// How long to wait for a holder to let go (default `30s`).
    #[serde(default)]
    pub timeout: Option<String>,
}

/// An expression string, or a literal boolean.
#[derive(JsonSchema)]
#[schemars(untagged)]
#[allow(dead_code)]
enum WhenSchema {
    Expr(String),
    Literal(bool),
}

/// Retry policy of a step.
#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Retry")]
pub struct RawRetry {
    /// Total number of attempts, the first included.
    pub attempts: u32,
    /// Pause between attempts (`2s`, `500ms`). Default: no pause.
    #[serde(default)]
    pub delay: Option<String>,
}
