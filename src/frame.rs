//! One runbook's values during a plan or a run: params, frozen vars, rendered roots
//! and the outputs of the steps so far. Planner and executor render through this one
//! type, so a dry-run renders exactly what the run will.

use std::collections::BTreeMap;
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
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error(transparent)]
    Params(#[from] crate::params::ParamError),
    #[error("{0}")]
    Render(String),
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
    ) -> Result<Self, FrameError> {
        let params = resolve(&runbook.params, inputs)?;
        Self::with_params(runbook, params, frozen, templates)
    }

    pub fn with_params(
        runbook: Arc<Runbook>,
        params: IndexMap<String, Json>,
        frozen: Option<&IndexMap<String, String>>,
        templates: &Templates,
    ) -> Result<Self, FrameError> {
        let mut frame = Frame {
            runbook: runbook.clone(),
            params,
            vars: IndexMap::new(),
            roots: Vec::new(),
            steps: BTreeMap::new(),
            redactor: Redactor::default(),
            reads: UnknownReads::default(),
        };
        for spec in runbook.params.iter().filter(|p| p.secret) {
            if let Some(v) = frame.params.get(&spec.name) {
                frame.redactor.add(v);
            }
        }
        for var in &runbook.vars {
            let value = match frozen.and_then(|f| f.get(&var.name)) {
                Some(v) if !var.secret => v.clone(),
                _ => {
                    let ctx = frame.context();
                    templates
                        .render(&var.template, &ctx)
                        .map_err(|e| FrameError::Render(format!("var `{}`: {e}", var.name)))?
                }
            };
            if var.secret {
                frame.redactor.add(&Json::String(value.clone()));
            }
            frame.vars.insert(var.name.clone(), value);
        }
        let ctx = frame.context();
        for root in &runbook.roots {
            let rendered = templates
                .render(root, &ctx)
                .map_err(|e| FrameError::Render(format!("roots: {e}")))?;
            if rendered.trim().is_empty()
                || crate::world::normalize(rendered.as_ref()) == std::path::Path::new("/")
            {
                return Err(FrameError::Render(format!(
                    "root `{root}` renders to `{rendered}`: a root must be a directory below `/`"
                )));
            }
            frame.roots.push(PathBuf::from(rendered));
        }
        Ok(frame)
    }

    /// The vars as the journal keeps them: secret-derived ones are left out.
    pub fn frozen_vars(&self) -> IndexMap<String, String> {
        self.runbook
            .vars
            .iter()
            .filter(|v| !v.secret)
            .filter_map(|v| self.vars.get(&v.name).map(|x| (v.name.clone(), x.clone())))
            .collect()
    }

    /// Params as the journal and plans show them: secrets masked.
    pub fn shown_params(&self) -> IndexMap<String, Json> {
        self.params
            .iter()
            .map(|(k, v)| {
                let secret = self.runbook.params.iter().any(|p| &p.name == k && p.secret);
                let shown = if secret && !v.is_null() {
                    Json::String(crate::redact::MASK.into())
                } else {
                    v.clone()
                };
                (k.clone(), shown)
            })
            .collect()
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
            map.insert(k.clone(), Value::from(Serde(v)));
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
        render_yaml(args, &ctx, templates, "")
    }

    pub fn render(&self, source: &str, templates: &Templates) -> Result<String, String> {
        templates.render(source, &self.context())
    }

    pub fn eval(&self, expr: &str, templates: &Templates) -> Result<bool, String> {
        templates.eval(expr, &self.context()).map(|v| v.is_true())
    }

    /// The runbook's declared outputs, rendered.
    pub fn outputs(&self, templates: &Templates) -> Result<Outputs, String> {
        let mut out = Outputs::new();
        for (k, tmpl) in &self.runbook.outputs {
            let v = templates
                .render_output(tmpl, &self.context())
                .map_err(|e| format!("output `{k}`: {e}"))?;
            out.insert(k.clone(), v);
        }
        Ok(out)
    }
}

fn render_yaml(v: &Yaml, ctx: &Value, templates: &Templates, path: &str) -> Result<Json, String> {
    Ok(match v {
        Yaml::Null => Json::Object(Default::default()),
        Yaml::String(s) => templates.render_value(s, ctx).map_err(|e| {
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
                .map(|(i, item)| render_yaml(item, ctx, templates, &format!("{path}[{i}]")))
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
                out.insert(key, render_yaml(v, ctx, templates, &child)?);
            }
            Json::Object(out)
        }
        other => serde_json::to_value(other).map_err(|e| e.to_string())?,
    })
}
