//! The action interface and the registry. Adding an action is one module that
//! implements [`Action`] plus one line in [`registry`].
//!
//! `assert` and `runbook` are not here: they read the template context or call the
//! engine itself, so the planner and executor handle them (see `control.rs`).

pub mod daemon;
pub mod files;
pub mod guard;
pub mod http;
pub mod json;
pub mod offsite;
pub mod process;
pub mod services;
pub mod snapshots;
pub mod sqlite;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::world::{OpaqueScope, World};

/// What running an action does to the world; decides how resume treats an
/// interrupted attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Effect {
    ReadOnly,
    Idempotent,
    NotIdempotent,
}

/// An action's own read-only judgement of one step (the planner adds `unknown` and
/// `skipped`, which need the template context).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    WillChange(String),
    NoChange(String),
    /// A check that can only be judged when the run gets there (its input is made by
    /// an earlier step). Shown as "no change", but its outcome is not known yet.
    Deferred(String),
    WouldFail(String),
}

/// How resume deals with an attempt that started but never recorded a result.
#[derive(Debug)]
pub enum Reconcile {
    /// Safe to run again.
    Rerun,
    /// The effect is already there; these are the step's outputs.
    AlreadyDone(Outputs),
    /// Cannot tell; the operator must check this and resume with `--retry-step`.
    AskOperator(String),
}

pub type Outputs = serde_json::Map<String, serde_json::Value>;

#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("{0}")]
    Failed(String),
    // Rounded to the millisecond: the clock starts a few microseconds after the deadline
    // is set, and "timed out after 199ms 998us" for a 200ms timeout helps nobody.
    #[error("timed out after {}", humantime::format_duration(Duration::from_millis((.0.as_micros() as u64 + 500) / 1000)))]
    TimedOut(Duration),
    /// The shared path guard refused the target (see `guard.rs`).
    #[error(transparent)]
    Refused(#[from] guard::Refusal),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

impl ActionError {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ActionError {
        let context = context.into();
        move |source| ActionError::Io { context, source }
    }
}

/// What every action may consult besides its arguments.
#[derive(Debug, Clone)]
pub struct ActionCtx {
    /// Rendered `roots` of the runbook: destructive actions act only below these
    /// (judged by `guard::destructive`).
    pub roots: Vec<PathBuf>,
    /// The journal's directory: nothing in it, nor anything holding it, is a target of
    /// a writing action (`guard::writable`).
    pub state_dir: PathBuf,
    /// The step's `timeout`, as a deadline.
    pub deadline: Option<Instant>,
    /// Long actions may show progress on the terminal (stderr).
    pub progress: bool,
    /// Planning with `--probe`: read-only network requests (an `http` GET) may be sent
    /// to judge a step. Never set when running.
    pub probe: bool,
}

pub trait Action: Send + Sync + 'static {
    /// Arguments as they appear under `with:` (after rendering).
    type Args: DeserializeOwned + JsonSchema;
    const NAME: &'static str;
    /// One line for the README and `--help`.
    const SUMMARY: &'static str;
    /// The names of its outputs (`steps.<id>.outputs.<name>`).
    const OUTPUTS: &'static [&'static str];
    /// True for checks that only read local files (never the network, never a
    /// service): the plan runs them for real so later steps see their outputs.
    const PLAN_RUNS_IT: bool = false;

    fn effect(&self, args: &Self::Args) -> Effect;

    /// Effects beyond what its preflight predicts, which no plan can foresee (what an
    /// arbitrary program, a started service or a `POST` does): once the step is planned
    /// to run, what lies in the scope is "unknown until it runs" for the steps after
    /// it. None: its preflight's predictions are the whole of its effect on files.
    fn opaque(&self, _args: &Self::Args) -> Option<OpaqueScope> {
        None
    }

    /// Outputs this step has besides [`Action::OUTPUTS`], named by its arguments (the
    /// `outputs:` of an `http` step). Judged on the raw arguments at validate.
    fn extra_outputs(&self, _args: &Self::Args) -> Vec<String> {
        Vec::new()
    }

    /// Checks that need no template context, run by `validate` on the raw arguments
    /// (template strings are left alone). Returns the field and the problem.
    fn check_static(&self, _args: &Self::Args) -> Result<(), (String, String)> {
        Ok(())
    }

    /// Read-only: judges the step against `world` and, unless it would fail, records
    /// the predicted effect in `world` for the steps after it.
    fn preflight(&self, args: &Self::Args, world: &mut World, ctx: &ActionCtx) -> Verdict;

    fn execute(&self, args: &Self::Args, ctx: &ActionCtx) -> Result<Outputs, ActionError>;

    fn reconcile(&self, args: &Self::Args, _ctx: &ActionCtx) -> Reconcile {
        match self.effect(args) {
            Effect::ReadOnly | Effect::Idempotent => Reconcile::Rerun,
            Effect::NotIdempotent => {
                Reconcile::AskOperator(format!("`{}` is not idempotent", Self::NAME))
            }
        }
    }
}

/// An argument problem found before anything runs: the path below `with` and the message.
#[derive(Debug)]
pub struct ArgError {
    pub path: String,
    pub message: String,
}

/// The object-safe face of [`Action`], over JSON arguments.
pub trait ActionKind: Send + Sync {
    fn name(&self) -> &'static str;
    fn summary(&self) -> &'static str;
    fn outputs(&self) -> &'static [&'static str];
    fn plan_runs_it(&self) -> bool;
    /// Every output of a step with these raw (unrendered) arguments.
    fn output_names(&self, raw: &serde_yaml::Value) -> Vec<String>;
    fn args_schema(&self, generator: &mut SchemaGenerator) -> Schema;
    /// Static shape check of the raw (unrendered) arguments.
    fn check_raw(&self, raw: &serde_yaml::Value) -> Result<(), ArgError>;
    fn effect(&self, args: &serde_json::Value) -> Effect;
    fn opaque(&self, args: &serde_json::Value) -> Option<OpaqueScope>;
    fn preflight(&self, args: &serde_json::Value, world: &mut World, ctx: &ActionCtx) -> Verdict;
    fn execute(&self, args: &serde_json::Value, ctx: &ActionCtx) -> Result<Outputs, ActionError>;
    fn reconcile(&self, args: &serde_json::Value, ctx: &ActionCtx) -> Reconcile;
}

/// Deserializes rendered arguments. A template renders to a string, so where the field
/// wants a bool or a number (`keep_daily: "{{ keep_daily }}"`, `insecure: "{{ tls_off }}"`)
/// the rendered text is read as a YAML scalar (`7`, `true`) and tried in its place; text
/// that does not parse as what the field takes is an error naming the field and the text.
fn parse_args<T: DeserializeOwned>(args: &serde_json::Value) -> Result<T, String> {
    let mut args = args.clone();
    // Each coercion fixes one field; a bound keeps a pathological input from looping.
    for _ in 0..64 {
        let err = match serde_path_to_error::deserialize::<_, T>(&args) {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let path = err.path().to_string();
        let inner = err.inner().to_string();
        let describe = || {
            if path == "." {
                format!("invalid arguments: {inner}")
            } else {
                format!("invalid argument `{path}`: {inner}")
            }
        };
        let Some(slot) = value_at(&mut args, &path) else {
            return Err(describe());
        };
        let Some(text) = slot.as_str().map(str::to_string) else {
            return Err(describe());
        };
        let scalar = serde_yaml::from_str::<serde_json::Value>(&text)
            .ok()
            .filter(|v| v.is_boolean() || v.is_number());
        match scalar {
            Some(v) if inner.contains("invalid type: string") => *slot = v,
            _ if inner.contains("invalid type: string") => {
                let expected = inner.split_once(", expected ").map_or("", |(_, e)| e);
                return Err(format!(
                    "invalid argument `{path}`: it renders to `{text}`, expected {expected}"
                ));
            }
            _ => return Err(describe()),
        }
    }
    Err("invalid arguments: too many values to coerce".into())
}

impl<A: Action> ActionKind for A {
    fn name(&self) -> &'static str {
        A::NAME
    }
    fn summary(&self) -> &'static str {
        A::SUMMARY
    }
    fn outputs(&self) -> &'static [&'static str] {
        A::OUTPUTS
    }
    fn plan_runs_it(&self) -> bool {
        A::PLAN_RUNS_IT
    }
    fn output_names(&self, raw: &serde_yaml::Value) -> Vec<String> {
        let mut names: Vec<String> = A::OUTPUTS.iter().map(|s| s.to_string()).collect();
        if let Ok(args) = serde_yaml::from_value::<A::Args>(raw.clone()) {
            names.extend(self.extra_outputs(&args));
        }
        names
    }
    fn args_schema(&self, generator: &mut SchemaGenerator) -> Schema {
        generator.subschema_for::<A::Args>()
    }
    fn check_raw(&self, raw: &serde_yaml::Value) -> Result<(), ArgError> {
        let raw = match raw {
            serde_yaml::Value::Null => serde_yaml::Value::Mapping(Default::default()),
            other => other.clone(),
        };
        let args: A::Args = deserialize_lenient(raw)?;
        self.check_static(&args)
            .map_err(|(path, message)| ArgError { path, message })
    }
    fn effect(&self, args: &serde_json::Value) -> Effect {
        parse_args::<A::Args>(args).map_or(Effect::NotIdempotent, |a| Action::effect(self, &a))
    }
    fn opaque(&self, args: &serde_json::Value) -> Option<OpaqueScope> {
        parse_args::<A::Args>(args)
            .ok()
            .and_then(|a| Action::opaque(self, &a))
    }
    fn preflight(&self, args: &serde_json::Value, world: &mut World, ctx: &ActionCtx) -> Verdict {
        match parse_args::<A::Args>(args) {
            Ok(a) => Action::preflight(self, &a, world, ctx),
            Err(e) => Verdict::WouldFail(e),
        }
    }
    fn execute(&self, args: &serde_json::Value, ctx: &ActionCtx) -> Result<Outputs, ActionError> {
        let a = parse_args::<A::Args>(args).map_err(ActionError::Failed)?;
        Action::execute(self, &a, ctx)
    }
    fn reconcile(&self, args: &serde_json::Value, ctx: &ActionCtx) -> Reconcile {
        match parse_args::<A::Args>(args) {
            Ok(a) => Action::reconcile(self, &a, ctx),
            Err(_) => Reconcile::Rerun,
        }
    }
}

/// Deserializes raw arguments, letting a whole-value template (`"{{ argv_param }}"`)
/// stand wherever the field is not a string: a list, a map, a bool, a number or one of
/// an enum's names (what it renders to is checked at run time, by [`parse_args`]).
/// Structs (`retry: {...}`) are not templatable. The template is replaced by a stand-in
/// of the type the field wants, so the checks after it (`check_static`) see a value of
/// the right shape: a list holding the template itself (so checks of its items skip it
/// as a template), an empty map, `false`, `0`, or the enum's first name.
fn deserialize_lenient<T: DeserializeOwned>(mut raw: serde_yaml::Value) -> Result<T, ArgError> {
    use serde_yaml::Value as Y;
    for _ in 0..64 {
        let err = match serde_path_to_error::deserialize::<_, T>(raw.clone()) {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let path = match err.path().to_string().as_str() {
            "." => String::new(),
            p => p.to_string(),
        };
        let message = err.inner().to_string();
        let Some(slot) =
            value_at(&mut raw, &path).filter(|v| v.as_str().is_some_and(is_whole_template))
        else {
            return Err(ArgError { path, message });
        };
        let candidates: Vec<Y> = if message.contains("expected a sequence") {
            vec![Y::Sequence(vec![slot.clone()])]
        } else if message.contains("expected a map") {
            vec![Y::Mapping(Default::default())]
        } else if message.contains("expected a boolean") {
            vec![Y::Bool(false)]
        } else if message.contains("unknown variant") {
            parse_expected(&message)
                .into_iter()
                .take(1)
                .map(Y::String)
                .collect()
        } else if message.contains("expected u")
            || message.contains("expected i")
            || message.contains("expected f")
        {
            vec![Y::Number(0.into())]
        } else if message.contains("untagged enum") {
            // One of several shapes (`status: 200` or `[200, 204]`): the first that fits.
            vec![
                Y::Number(0.into()),
                Y::Sequence(vec![]),
                Y::Bool(false),
                Y::Mapping(Default::default()),
            ]
        } else {
            Vec::new()
        };
        let fits = candidates.into_iter().find(|candidate| {
            let mut trial = raw.clone();
            if let Some(s) = value_at(&mut trial, &path) {
                *s = candidate.clone();
            }
            match serde_path_to_error::deserialize::<_, T>(trial) {
                Ok(_) => true,
                Err(e) => e.path().to_string() != path.as_str() && !path.is_empty(),
            }
        });
        match (fits, value_at(&mut raw, &path)) {
            (Some(v), Some(slot)) => *slot = v,
            _ => return Err(ArgError { path, message }),
        }
    }
    Err(ArgError {
        path: String::new(),
        message: "too many templated values".into(),
    })
}

/// The names serde lists after "expected" (`` expected `never` or `replace` ``).
fn parse_expected(message: &str) -> Vec<String> {
    let tail = message.split_once("expected").map_or("", |(_, t)| t);
    tail.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

pub fn is_whole_template(s: &str) -> bool {
    let t = s.trim();
    t.starts_with("{{") && t.ends_with("}}") && t.matches("{{").count() == 1
}

/// A document tree a path can walk: the raw (YAML) arguments and the rendered (JSON)
/// ones, so one walk serves both.
trait Tree: Sized {
    fn key_mut(&mut self, key: &str) -> Option<&mut Self>;
    fn index_mut(&mut self, index: usize) -> Option<&mut Self>;
}

impl Tree for serde_yaml::Value {
    fn key_mut(&mut self, key: &str) -> Option<&mut Self> {
        self.get_mut(key)
    }
    fn index_mut(&mut self, index: usize) -> Option<&mut Self> {
        self.get_mut(index)
    }
}

impl Tree for serde_json::Value {
    fn key_mut(&mut self, key: &str) -> Option<&mut Self> {
        self.get_mut(key)
    }
    fn index_mut(&mut self, index: usize) -> Option<&mut Self> {
        self.get_mut(index)
    }
}

/// The value at a serde_path_to_error path (`argv`, `env.KEY`, `items[2]`).
fn value_at<'v, T: Tree>(root: &'v mut T, path: &str) -> Option<&'v mut T> {
    let mut cur = root;
    for (key, index) in path_parts(path) {
        if let Some(key) = key {
            cur = cur.key_mut(key)?;
        }
        if let Some(i) = index {
            cur = cur.index_mut(i)?;
        }
    }
    Some(cur)
}

/// `env.KEY`, `items[2][0]` -> (Some("env"), None), (Some("KEY"), None),
/// (Some("items"), Some(2)), (None, Some(0)).
fn path_parts(path: &str) -> Vec<(Option<&str>, Option<usize>)> {
    let mut out = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty() && *p != ".") {
        let (key, indexes) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            out.push((Some(key), None));
        }
        for idx in indexes.split('[').filter(|s| !s.is_empty()) {
            out.push((None, idx.trim_end_matches(']').parse::<usize>().ok()));
        }
    }
    out
}

/// Every effectful action. One line each.
pub fn registry() -> &'static [&'static dyn ActionKind] {
    &[
        &files::Mkdir,
        &files::Copy,
        &files::WriteFile,
        &files::Remove,
        &files::Move,
        &files::Chown,
        &files::Chmod,
        &files::PathCheck,
        &process::Exec,
        &snapshots::SnapshotList,
        &snapshots::Retention,
        &daemon::DaemonStart,
        &daemon::DaemonStop,
        &json::JsonCheck,
        &http::Http,
        &http::HttpCheck,
        &services::ComposeStop,
        &services::ComposeStart,
        &services::SystemdStop,
        &services::SystemdStart,
        &services::DockerExec,
        &sqlite::SqliteBackup,
        &sqlite::Check,
        &sqlite::Query,
        &offsite::OffsitePush,
        &offsite::OffsiteList,
        &offsite::OffsiteFetch,
        &offsite::OffsiteRetention,
        &offsite::check::OffsiteCheck,
    ]
}

pub fn find(name: &str) -> Option<&'static dyn ActionKind> {
    registry().iter().copied().find(|a| a.name() == name)
}

/// A file mode written as octal: `"0755"`, `"755"`, or the YAML integer `0755` (which
/// YAML 1.2 reads as decimal 755; its digits are taken as octal, as `chmod` would).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Mode {
    Text(String),
    Digits(u32),
}

impl Mode {
    pub fn bits(&self) -> Result<u32, String> {
        let digits = match self {
            Mode::Text(s) => s.trim_start_matches("0o").to_string(),
            Mode::Digits(n) => n.to_string(),
        };
        match u32::from_str_radix(&digits, 8) {
            Ok(bits) if bits <= 0o7777 => Ok(bits),
            _ => Err(format!(
                "mode `{digits}` is not an octal file mode like \"0644\""
            )),
        }
    }

    pub fn check_static(&self) -> Result<(), String> {
        match self {
            Mode::Text(s) if s.contains("{{") => Ok(()),
            _ => self.bits().map(|_| ()),
        }
    }
}

/// What an opaque action may write: the paths of its `writes:` argument (every path
/// when it has none).
pub fn writes_scope(writes: &Option<Vec<PathBuf>>) -> OpaqueScope {
    match writes {
        None => OpaqueScope::Anywhere,
        Some(paths) => OpaqueScope::Below(paths.clone()),
    }
}

/// Parses `30s`, `10m`, `1h 30m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("`{text}` is not a duration like `30s` or `10m` ({e})"))
}
