//! One runbook's values during a plan or a run: params, frozen vars, rendered roots
//! and the outputs of the steps so far. Planner and executor render through this one
//! type, so a dry-run renders exactly what the run will.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use indexmap::IndexMap;
use minijinja::value::{Serde, Value};
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

use crate::actions::Outputs;
use crate::load::Runbook;
use crate::params::{ParamInputs, resolve};
use crate::redact::Redactor;
use crate::template::{PendingOutputs, Templates, UnknownReads};

/// What is known of an earlier step.
#[derive(Debug, Clone)]
pub enum StepState {
    Done {
        status: &'static str,
        outputs: Outputs,
        /// Seconds the step took (0 when it was done before a resume).
        duration: f64,
        /// Why it failed, for a step that may fail (`on_failure: continue`).
        error: Option<String>,
    },
    /// Dry-run: the step has not run, its outputs are placeholders; its status is
    /// known when the plan could judge it (a read-only check of the real system).
    Pending { status: Option<&'static str> },
}

#[derive(Debug, Clone)]
pub struct Frame {
    pub runbook: Arc<Runbook>,
    pub params: IndexMap<String, Json>,
    pub vars: IndexMap<String, String>,
    pub roots: Vec<PathBuf>,
    pub steps: BTreeMap<String, StepState>,
    pub redactor: Redactor,
    pub reads: UnknownReads,
    /// Params and vars whose values are secret here: declared `secret`, derived from a
    /// secret by their template, or holding a secret value (secrecy follows the value,
    /// not the declaration). Never frozen, never shown.
    pub secrets: BTreeSet<String>,
    /// A called runbook (its params come from the call, not from `--set`).
    pub called: bool,
}

/// What a frame receives from where it is built: the secrets known so far (a caller's,
/// or every secret the run's inputs give) and the params its caller computed from a
/// secret.
#[derive(Debug, Clone, Default)]
pub struct Inherited {
    pub redactor: Redactor,
    /// Params given a value that a template made from a secret (a call's `params`).
    pub secret_params: BTreeSet<String>,
    pub called: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error(transparent)]
    Params(#[from] crate::params::ParamError),
    #[error("{0}")]
    Render(String),
}

impl Inherited {
    /// What a run's top frame starts with: every secret its inputs give to any runbook
    /// of the call tree (a called runbook's secret from a vars file is masked in the
    /// caller too, before the call runs).
    pub fn for_run(runbook: &Runbook, inputs: &ParamInputs) -> Self {
        let tree = runbook.call_tree_params();
        let mut redactor = Redactor::default();
        for (name, value) in inputs.files.iter().map(|(k, v)| (k, v.clone())).chain(
            inputs
                .sets
                .iter()
                .map(|(k, v)| (k, Json::String(v.clone()))),
        ) {
            if tree.get(name) == Some(&true) {
                redactor.add(&value);
            }
        }
        Inherited {
            redactor,
            ..Inherited::default()
        }
    }
}

impl StepState {
    pub fn done(status: &'static str, outputs: Outputs) -> Self {
        StepState::Done {
            status,
            outputs,
            duration: 0.0,
            error: None,
        }
    }

    pub fn timed(self, took: std::time::Duration) -> Self {
        match self {
            StepState::Done {
                status,
                outputs,
                error,
                ..
            } => StepState::Done {
                status,
                outputs,
                duration: took.as_secs_f64(),
                error,
            },
            pending => pending,
        }
    }
}

impl Frame {
    /// Resolves params and renders (freezes) vars. `frozen` holds vars from the
    /// journal: those are taken as they are, never rendered again.
    pub fn new(
        runbook: Arc<Runbook>,
        inputs: &ParamInputs,
        frozen: Option<&IndexMap<String, String>>,
        templates: &Templates,
        inherited: Inherited,
    ) -> Result<Self, FrameError> {
        // A param error may quote a value: mask what is already known to be secret.
        let params = resolve(&runbook.params, inputs)
            .map_err(|e| FrameError::Render(inherited.redactor.text(&e.to_string())))?;
        Self::with_params(runbook, params, frozen, templates, inherited)
    }

    pub fn with_params(
        runbook: Arc<Runbook>,
        params: IndexMap<String, Json>,
        frozen: Option<&IndexMap<String, String>>,
        templates: &Templates,
        inherited: Inherited,
    ) -> Result<Self, FrameError> {
        let mut frame = Frame {
            runbook: runbook.clone(),
            params,
            vars: IndexMap::new(),
            roots: Vec::new(),
            steps: BTreeMap::new(),
            redactor: inherited.redactor,
            reads: UnknownReads::default(),
            secrets: BTreeSet::new(),
            called: inherited.called,
        };
        // Declared secrets are secret whole, and so is what a caller made of a secret.
        for spec in &runbook.params {
            let value = frame.params.get(&spec.name).cloned().unwrap_or(Json::Null);
            if spec.secret {
                frame.redactor.add(&value);
                frame.secrets.insert(spec.name.clone());
            } else if inherited.secret_params.contains(&spec.name) {
                add_derived(&mut frame.redactor, &value);
                frame.secrets.insert(spec.name.clone());
            }
        }
        // Any other param that holds a secret value is secret too.
        for (name, value) in &frame.params {
            if frame.redactor.finds_in_json(value) {
                frame.secrets.insert(name.clone());
            }
        }
        for var in &runbook.vars {
            // Never frozen when secret, so a frozen value is one that held no secret.
            let value = match frozen.and_then(|f| f.get(&var.name)) {
                Some(v) if !var.secret => v.clone(),
                _ => {
                    let ctx = frame.context();
                    templates.render(&var.template, &ctx).map_err(|e| {
                        let e = frame.explain(&var.template, false, templates, e);
                        FrameError::Render(frame.redactor.text(&format!("var `{}`: {e}", var.name)))
                    })?
                }
            };
            let derived = var.secret
                || templates
                    .names_used(&var.template)
                    .iter()
                    .any(|n| frame.secrets.contains(n));
            if derived {
                add_derived(&mut frame.redactor, &Json::String(value.clone()));
            }
            if derived || frame.redactor.finds_in(&value) {
                frame.secrets.insert(var.name.clone());
            }
            frame.vars.insert(var.name.clone(), value);
        }
        let ctx = frame.context();
        for root in &runbook.roots {
            let rendered = templates.render(root, &ctx).map_err(|e| {
                let e = frame.explain(root, false, templates, e);
                FrameError::Render(frame.redactor.text(&format!("roots: {e}")))
            })?;
            if rendered.trim().is_empty()
                || crate::world::normalize(rendered.as_ref()) == std::path::Path::new("/")
            {
                return Err(FrameError::Render(frame.redactor.text(&format!(
                    "root `{root}` renders to `{rendered}`: a root must be a directory below `/`"
                ))));
            }
            // A relative root is taken from the directory the run works in, and kept
            // absolute so that nothing later reads it against another one.
            frame
                .roots
                .push(crate::params::absolute(std::path::Path::new(&rendered)));
        }
        Ok(frame)
    }

    /// The vars as the journal keeps them: secret ones (derived from a secret or
    /// holding one) are left out and rendered again on resume.
    pub fn frozen_vars(&self) -> IndexMap<String, String> {
        self.vars
            .iter()
            .filter(|(k, _)| !self.secrets.contains(*k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Params as the journal and plans show them: secrets masked whole, and any secret
    /// inside another value masked where it occurs.
    pub fn shown_params(&self) -> IndexMap<String, Json> {
        self.params
            .iter()
            .map(|(k, v)| {
                let shown = if self.secrets.contains(k) && !v.is_null() {
                    Json::String(crate::redact::MASK.into())
                } else {
                    self.redactor.json(v)
                };
                (k.clone(), shown)
            })
            .collect()
    }

    /// Params whose value holds a secret: never journaled, asked for again on resume.
    pub fn secret_params(&self) -> impl Iterator<Item = &str> {
        self.runbook
            .params
            .iter()
            .map(|p| p.name.as_str())
            .filter(|n| self.secrets.contains(*n))
    }

    /// A rendering error, made clear when the template used an optional param that is
    /// not set (it is undefined, as strict undefined wants, never `None`).
    pub fn explain(
        &self,
        source: &str,
        is_expr: bool,
        templates: &Templates,
        error: String,
    ) -> String {
        if !error.starts_with(crate::template::UNDEFINED) {
            return error;
        }
        let used = templates.names_read(source, is_expr);
        let unset: Vec<&str> = self
            .params
            .iter()
            .filter(|(k, v)| v.is_null() && used.contains(*k))
            .map(|(k, _)| k.as_str())
            .collect();
        let Some(first) = unset.first() else {
            return error;
        };
        let how = if self.called {
            "give it in the call's `params` or in a --vars FILE".to_string()
        } else {
            format!("give it with --set {first}=VALUE or in a --vars FILE")
        };
        format!(
            "param `{}` is not set (it is optional and has no default): {how}, or test it with `{first} is defined`",
            unset.join("`, `")
        )
    }

    pub fn shown_vars(&self) -> IndexMap<String, String> {
        self.vars
            .iter()
            .map(|(k, v)| (k.clone(), self.redactor.text(v)))
            .collect()
    }

    pub fn context(&self) -> Value {
        let mut map: BTreeMap<String, Value> = BTreeMap::new();
        for (k, v) in &self.params {
            // An optional param that is not set is undefined: using it is an error
            // (strict undefined), `is defined` tells.
            if !v.is_null() {
                map.insert(k.clone(), Value::from(Serde(v)));
            }
        }
        for (k, v) in &self.vars {
            map.insert(k.clone(), Value::from(v.as_str()));
        }
        let mut steps: BTreeMap<String, Value> = BTreeMap::new();
        for (id, state) in &self.steps {
            let v = match state {
                StepState::Done {
                    status,
                    outputs,
                    duration,
                    error,
                } => {
                    let mut m: BTreeMap<&str, Value> = BTreeMap::new();
                    m.insert("status", Value::from(*status));
                    m.insert("outputs", Value::from(Serde(outputs)));
                    m.insert("duration", Value::from(*duration));
                    m.insert("error", Value::from(error.clone().unwrap_or_default()));
                    Value::from(m)
                }
                StepState::Pending { status } => {
                    // An unknown status is caught before rendering (Planner::unknown_status_reads).
                    let mut m: BTreeMap<&str, Value> = BTreeMap::new();
                    m.insert(
                        "outputs",
                        Value::from_object(PendingOutputs {
                            step: id.clone(),
                            reads: self.reads.clone(),
                        }),
                    );
                    m.insert("status", Value::from(status.unwrap_or("pending")));
                    m.insert("error", Value::from(""));
                    m.insert("duration", Value::from(0.0));
                    Value::from(m)
                }
            };
            steps.insert(id.clone(), v);
        }
        map.insert("steps".into(), Value::from(steps));
        Value::from(map)
    }

    /// Renders every string in an argument tree.
    pub fn render_args(&self, args: &Yaml, templates: &Templates) -> Result<Json, String> {
        let ctx = self.context();
        render_yaml(args, &ctx, templates, "", self)
    }

    pub fn render(&self, source: &str, templates: &Templates) -> Result<String, String> {
        templates
            .render(source, &self.context())
            .map_err(|e| self.explain(source, false, templates, e))
    }

    pub fn eval(&self, expr: &str, templates: &Templates) -> Result<bool, String> {
        templates
            .eval(expr, &self.context())
            .map(|v| v.is_true())
            .map_err(|e| self.explain(expr, true, templates, e))
    }

    /// The runbook's declared outputs, rendered. One made from a secret by its
    /// template is secret whole from now on.
    pub fn outputs(&mut self, templates: &Templates) -> Result<Outputs, String> {
        let mut out = Outputs::new();
        for (k, tmpl) in &self.runbook.outputs {
            let v = templates
                .render_output(tmpl, &self.context())
                .map_err(|e| {
                    format!("output `{k}`: {}", self.explain(tmpl, false, templates, e))
                })?;
            if self.reads_secret(tmpl, templates) {
                add_derived(&mut self.redactor, &v);
            }
            out.insert(k.clone(), v);
        }
        Ok(out)
    }

    /// Whether a template reads a secret param or var.
    pub fn reads_secret(&self, source: &str, templates: &Templates) -> bool {
        !self.secrets.is_empty()
            && templates
                .names_used(source)
                .iter()
                .any(|n| self.secrets.contains(n))
    }

    /// The redactor for a step whose arguments were rendered from `raw`: a value a
    /// template made from a secret (`{{ token | upper }}`, `{{ token[:8] }}`) is
    /// secret whole, like a var that reads one.
    pub fn redactor_for(&self, raw: &Yaml, rendered: &Json, templates: &Templates) -> Redactor {
        fn walk(
            frame: &Frame,
            raw: &Yaml,
            rendered: &Json,
            templates: &Templates,
            out: &mut Redactor,
        ) {
            match (raw, rendered) {
                (Yaml::String(s), value) if frame.reads_secret(s, templates) => {
                    add_derived(out, value);
                }
                (Yaml::Sequence(items), Json::Array(values)) => {
                    for (item, value) in items.iter().zip(values) {
                        walk(frame, item, value, templates, out);
                    }
                }
                (Yaml::Mapping(map), Json::Object(values)) => {
                    for (k, item) in map {
                        if let Some(value) = k.as_str().and_then(|k| values.get(k)) {
                            walk(frame, item, value, templates, out);
                        }
                    }
                }
                _ => {}
            }
        }
        let mut out = self.redactor.clone();
        walk(self, raw, rendered, templates, &mut out);
        out
    }
}

/// A value a template made from a secret: when the secret shows in it as it is (or
/// encoded), masking that is enough (`Bearer ********`); when it does not, the secret
/// was transformed (`upper`, a slice, a hash) and the whole value is secret.
fn add_derived(redactor: &mut Redactor, value: &Json) {
    if !redactor.finds_in_json(value) {
        redactor.add(value);
    }
}

fn render_yaml(
    v: &Yaml,
    ctx: &Value,
    templates: &Templates,
    path: &str,
    frame: &Frame,
) -> Result<Json, String> {
    Ok(match v {
        Yaml::Null => Json::Object(Default::default()),
        Yaml::String(s) => templates.render_value(s, ctx).map_err(|e| {
            let e = frame.explain(s, false, templates, e);
            if path.is_empty() {
                e
            } else {
                format!("`{path}`: {e}")
            }
        })?,
        Yaml::Sequence(items) => Json::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, item)| render_yaml(item, ctx, templates, &format!("{path}[{i}]"), frame))
                .collect::<Result<_, _>>()?,
        ),
        Yaml::Mapping(map) => {
            let mut out = serde_json::Map::new();
            for (k, v) in map {
                let key = k.as_str().map_or_else(
                    || {
                        serde_yaml::to_string(k)
                            .unwrap_or_default()
                            .trim()
                            .to_string()
                    },
                    str::to_string,
                );
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                out.insert(key, render_yaml(v, ctx, templates, &child, frame)?);
            }
            Json::Object(out)
        }
        other => serde_json::to_value(other).map_err(|e| e.to_string())?,
    })
}
