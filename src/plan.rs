//! The dry-run: every value rendered, every step judged read-only against the real
//! system overlaid with the predicted effects of the steps before it.
//!
//! Planning writes nothing: no file, no journal row, no lock. `run` computes the same
//! plan first and refuses to start when any step would fail.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value as Json;

use crate::actions::{ActionCtx, Verdict};
use crate::frame::{Frame, StepState};
use crate::load::{AssertArgs, CallArgs, Runbook, Step, StepKind};
use crate::params::ParamInputs;
use crate::template::Templates;
use crate::world::World;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "verdict", content = "detail", rename_all = "kebab-case")]
pub enum PlanVerdict {
    WillChange(String),
    NoChange(String),
    /// Its values read outputs of these steps, which exist only once they run.
    Unknown(Vec<String>),
    Skipped(String),
    WouldFail(String),
}

impl PlanVerdict {
    pub fn label(&self) -> &'static str {
        match self {
            PlanVerdict::WillChange(_) => "will change",
            PlanVerdict::NoChange(_) => "no change",
            PlanVerdict::Unknown(_) => "unknown",
            PlanVerdict::Skipped(_) => "skipped",
            PlanVerdict::WouldFail(_) => "would fail",
        }
    }

    pub fn detail(&self) -> String {
        match self {
            PlanVerdict::WillChange(d) | PlanVerdict::NoChange(d) => d.clone(),
            PlanVerdict::Unknown(steps) => format!(
                "unknown until {} run{}",
                steps.join(", "),
                if steps.len() == 1 { "s" } else { "" }
            ),
            PlanVerdict::Skipped(why) => why.clone(),
            PlanVerdict::WouldFail(why) => why.clone(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct PlannedStep {
    pub id: String,
    pub action: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(flatten)]
    pub verdict: PlanVerdict,
    /// The arguments as they will be used (secrets masked); absent when rendering failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub args: Option<Json>,
    /// The steps of a called runbook.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<PlannedStep>,
}

#[derive(Debug, Serialize)]
pub struct Plan {
    pub runbook: String,
    pub path: PathBuf,
    pub params: indexmap::IndexMap<String, Json>,
    pub vars: indexmap::IndexMap<String, String>,
    pub roots: Vec<PathBuf>,
    pub lock: String,
    pub steps: Vec<PlannedStep>,
    pub rollback: Vec<PlannedStep>,
    pub ok: bool,
    #[serde(skip)]
    pub frame: Frame,
}

#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct Tally {
    pub will_change: usize,
    pub no_change: usize,
    pub unknown: usize,
    pub skipped: usize,
    pub would_fail: usize,
}

impl Plan {
    pub fn tally(&self) -> Tally {
        fn add(t: &mut Tally, steps: &[PlannedStep]) {
            for s in steps {
                match s.verdict {
                    PlanVerdict::WillChange(_) => t.will_change += 1,
                    PlanVerdict::NoChange(_) => t.no_change += 1,
                    PlanVerdict::Unknown(_) => t.unknown += 1,
                    PlanVerdict::Skipped(_) => t.skipped += 1,
                    PlanVerdict::WouldFail(_) => t.would_fail += 1,
                }
            }
        }
        let mut t = Tally::default();
        add(&mut t, &self.steps);
        t
    }

    /// The first step (depth first) that would fail, with its reason.
    pub fn first_failure(&self) -> Option<(String, String)> {
        fn find(prefix: &str, steps: &[PlannedStep]) -> Option<(String, String)> {
            for s in steps {
                let key = format!("{prefix}{}", s.id);
                if let Some(inner) = find(&format!("{key}/"), &s.steps) {
                    return Some(inner);
                }
                if let PlanVerdict::WouldFail(why) = &s.verdict {
                    return Some((key, why.clone()));
                }
            }
            None
        }
        find("", &self.steps)
    }
}

pub struct Planner<'a> {
    pub templates: &'a Templates,
    pub inputs: &'a ParamInputs,
    pub state_dir: PathBuf,
}

impl Planner<'_> {
    pub fn plan(&self, runbook: Arc<Runbook>, frame: Frame) -> Plan {
        let mut world = World::predicted();
        let mut frame = frame;
        let steps = self.plan_steps(&runbook.steps, &mut frame, &mut world);
        // Rollback is judged against today's system plus the main steps' effects; its
        // reads of main-step outputs are placeholders.
        let rollback = self.plan_steps(&runbook.rollback, &mut frame, &mut world);
        let ok = !has_failure(&steps);
        Plan {
            runbook: runbook.name.clone(),
            path: runbook.source.path.clone(),
            params: frame.shown_params(),
            vars: frame.shown_vars(),
            roots: frame.roots.clone(),
            lock: runbook.lock.clone(),
            steps,
            rollback,
            ok,
            frame,
        }
    }

    fn plan_steps(&self, steps: &[Step], frame: &mut Frame, world: &mut World) -> Vec<PlannedStep> {
        let mut out = Vec::new();
        for step in steps {
            let planned = self.plan_step(step, frame, world);
            frame.steps.insert(step.id.clone(), StepState::Pending);
            out.push(planned);
        }
        out
    }

    fn plan_step(&self, step: &Step, frame: &Frame, world: &mut World) -> PlannedStep {
        let mut planned = PlannedStep {
            id: step.id.clone(),
            action: step.kind.action_name(),
            description: step.description.clone(),
            verdict: PlanVerdict::NoChange(String::new()),
            args: None,
            steps: Vec::new(),
        };
        frame.reads.take();
        if let Some(when) = &step.when {
            match frame.eval(when, self.templates) {
                Err(e) => {
                    planned.verdict = unknown_or(frame, format!("`when`: {e}"));
                    return planned;
                }
                Ok(value) => {
                    let reads = frame.reads.take();
                    if !reads.is_empty() {
                        planned.verdict = PlanVerdict::Unknown(reads.into_iter().collect());
                        return planned;
                    }
                    if !value {
                        planned.verdict = PlanVerdict::Skipped(format!("when `{when}` is false"));
                        return planned;
                    }
                }
            }
        }
        let args = match frame.render_args(&step.args, self.templates) {
            Ok(a) => a,
            Err(e) => {
                planned.verdict = unknown_or(frame, e);
                return planned;
            }
        };
        planned.args = Some(frame.redactor.json(&args));
        let reads = frame.reads.take();
        let unknown =
            (!reads.is_empty()).then(|| PlanVerdict::Unknown(reads.into_iter().collect()));
        let verdict = match &step.kind {
            StepKind::Action(action) => unknown.unwrap_or_else(|| {
                let ctx = ActionCtx {
                    roots: frame.roots.clone(),
                    state_dir: self.state_dir.clone(),
                    deadline: None,
                };
                world.set_step(&step.id);
                match action.preflight(&args, world, &ctx) {
                    Verdict::WillChange(d) => PlanVerdict::WillChange(d),
                    Verdict::NoChange(d) => PlanVerdict::NoChange(d),
                    Verdict::WouldFail(d) => PlanVerdict::WouldFail(d),
                }
            }),
            StepKind::Assert => self.plan_assert(step, frame),
            StepKind::Call(child) => {
                if let Some(u) = unknown {
                    u
                } else {
                    let (verdict, steps) = self.plan_call(child, &args, world);
                    planned.steps = steps;
                    verdict
                }
            }
        };
        planned.verdict = match verdict {
            PlanVerdict::WouldFail(d) => PlanVerdict::WouldFail(frame.redactor.text(&d)),
            PlanVerdict::WillChange(d) => PlanVerdict::WillChange(frame.redactor.text(&d)),
            PlanVerdict::NoChange(d) => PlanVerdict::NoChange(frame.redactor.text(&d)),
            other => other,
        };
        planned
    }

    fn plan_assert(&self, step: &Step, frame: &Frame) -> PlanVerdict {
        let args: AssertArgs = match serde_yaml::from_value(step.args.clone()) {
            Ok(a) => a,
            Err(e) => return PlanVerdict::WouldFail(e.to_string()),
        };
        frame.reads.take();
        let holds = frame.eval(&args.that, self.templates);
        let reads = frame.reads.take();
        if !reads.is_empty() {
            return PlanVerdict::Unknown(reads.into_iter().collect());
        }
        match holds {
            Err(e) => PlanVerdict::WouldFail(format!("`that`: {e}")),
            Ok(true) => PlanVerdict::NoChange(format!("`{}` holds", args.that)),
            Ok(false) => PlanVerdict::WouldFail(assert_message(&args, frame, self.templates)),
        }
    }

    fn plan_call(
        &self,
        child: &Arc<Runbook>,
        args: &Json,
        world: &mut World,
    ) -> (PlanVerdict, Vec<PlannedStep>) {
        let frame = match child_frame(child, args, self.inputs, self.templates) {
            Ok(f) => f,
            Err(e) => return (PlanVerdict::WouldFail(e), Vec::new()),
        };
        let mut frame = frame;
        let steps = self.plan_steps(&child.steps, &mut frame, world);
        let verdict = summarize(child, &steps);
        (verdict, steps)
    }
}

/// A template that failed while it read outputs of steps that have not run (such as
/// `steps.q.outputs.rows[0].name`, whose placeholder has no `[0]`) is unknown, not
/// failing: only the run can tell.
fn unknown_or(frame: &Frame, error: String) -> PlanVerdict {
    let reads = frame.reads.take();
    if reads.is_empty() {
        PlanVerdict::WouldFail(error)
    } else {
        PlanVerdict::Unknown(reads.into_iter().collect())
    }
}

/// A call's verdict from its children's.
fn summarize(child: &Runbook, steps: &[PlannedStep]) -> PlanVerdict {
    if let Some(fail) = steps
        .iter()
        .find(|s| matches!(s.verdict, PlanVerdict::WouldFail(_)))
    {
        return PlanVerdict::WouldFail(format!(
            "step `{}` of `{}` would fail: {}",
            fail.id,
            child.name,
            fail.verdict.detail()
        ));
    }
    let changing = steps
        .iter()
        .filter(|s| matches!(s.verdict, PlanVerdict::WillChange(_)))
        .count();
    let unknown = steps
        .iter()
        .filter(|s| matches!(s.verdict, PlanVerdict::Unknown(_)))
        .count();
    if changing > 0 || unknown > 0 {
        PlanVerdict::WillChange(format!(
            "runs `{}`: {changing} step(s) will change, {unknown} unknown",
            child.name
        ))
    } else {
        PlanVerdict::NoChange(format!("runs `{}`: nothing to change", child.name))
    }
}

fn has_failure(steps: &[PlannedStep]) -> bool {
    steps
        .iter()
        .any(|s| matches!(s.verdict, PlanVerdict::WouldFail(_)))
}

pub fn assert_message(args: &AssertArgs, frame: &Frame, templates: &Templates) -> String {
    match &args.message {
        Some(m) => frame
            .render(m, templates)
            .unwrap_or_else(|e| format!("{m} ({e})")),
        None => format!("assertion `{}` does not hold", args.that),
    }
}

/// The frame of a called runbook: its params from the call, then the run's vars
/// files, then defaults.
pub fn child_frame(
    child: &Arc<Runbook>,
    args: &Json,
    inputs: &ParamInputs,
    templates: &Templates,
) -> Result<Frame, String> {
    let call: CallArgs = serde_json::from_value(args.clone()).map_err(|e| e.to_string())?;
    let mut child_inputs = ParamInputs {
        files: inputs.files.clone(),
        sets: Default::default(),
    };
    for (k, v) in call.params {
        let json = serde_json::to_value(&v).map_err(|e| e.to_string())?;
        child_inputs.files.insert(k, json);
    }
    Frame::new(child.clone(), &child_inputs, None, templates)
        .map_err(|e| format!("calling `{}`: {e}", child.name))
}
