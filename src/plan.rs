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
    /// `on_failure: continue`: its failure does not stop the run (nor fail the plan).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub continues: bool,
    /// `expect_failure.contains` as rendered: the step must fail with that error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expect_failure: Option<String>,
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
    /// Would fail, but `on_failure: continue`.
    pub may_fail: usize,
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
                    PlanVerdict::WouldFail(_) if s.continues => t.may_fail += 1,
                    PlanVerdict::WouldFail(_) => t.would_fail += 1,
                }
            }
        }
        let mut t = Tally::default();
        add(&mut t, &self.steps);
        t
    }

    /// The plan as a dry-run call's outputs: `details` (each step's verdict, one line),
    /// `summary` (the counts), `ok` and `steps` (id, action, verdict, detail of each).
    pub fn as_outputs(&self) -> crate::actions::Outputs {
        let t = self.tally();
        let summary = format!(
            "{} steps: {} will change, {} no change, {} unknown, {} skipped, {} would fail",
            self.steps.len(),
            t.will_change,
            t.no_change,
            t.unknown,
            t.skipped,
            t.would_fail + t.may_fail
        );
        let steps: Vec<Json> = self
            .steps
            .iter()
            .map(|s| {
                serde_json::json!({
                    "id": s.id,
                    "action": s.action,
                    "verdict": s.verdict.label(),
                    "detail": s.verdict.detail(),
                })
            })
            .collect();
        let details: Vec<String> = self
            .steps
            .iter()
            .map(|s| format!("{} {}: {}", s.id, s.verdict.label(), s.verdict.detail()))
            .collect();
        let mut out = crate::actions::Outputs::new();
        out.insert("details".into(), Json::String(details.join("; ")));
        out.insert("summary".into(), Json::String(summary));
        out.insert("ok".into(), Json::Bool(self.ok));
        out.insert("steps".into(), Json::Array(steps));
        out
    }

    /// The first step (depth first) that would fail and stop the run, with its reason.
    pub fn first_failure(&self) -> Option<(String, String)> {
        fn find(prefix: &str, steps: &[PlannedStep]) -> Option<(String, String)> {
            for s in steps {
                let key = format!("{prefix}{}", s.id);
                // Inside a call whose failure does not stop the run (it is expected, or
                // `on_failure: continue`), a failing step does not either.
                let stops = !s.continues && s.expect_failure.is_none();
                if stops && let Some(inner) = find(&format!("{key}/"), &s.steps) {
                    return Some(inner);
                }
                if let (true, PlanVerdict::WouldFail(why)) = (s.fails(), &s.verdict) {
                    return Some((key, why.clone()));
                }
            }
            None
        }
        find("", &self.steps)
    }
}

/// What the plan learnt of a step's outcome.
enum Known {
    Nothing,
    Status(&'static str),
    /// A local read-only check that the plan ran: its outputs or its error.
    Ran(Result<crate::actions::Outputs, String>),
    /// Its `when` is known to be false: skipped, with no outputs, as the run records it.
    Skipped,
    /// An `expect_failure` step the plan sees fail as expected, with that error.
    FailsAsExpected(String),
}

pub struct Planner<'a> {
    pub templates: &'a Templates,
    pub inputs: &'a ParamInputs,
    pub state_dir: PathBuf,
    /// `--yes`: confirm steps will be answered.
    pub assume_yes: bool,
    /// `--probe`: read-only requests (an `http` GET) may be sent to judge a step.
    pub probe: bool,
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
            roots: frame
                .roots
                .iter()
                .map(|r| PathBuf::from(frame.redactor.text(&r.to_string_lossy())))
                .collect(),
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
            let (planned, known) = self.plan_step(step, frame, world);
            let state = match known {
                Known::Nothing => StepState::Pending { status: None },
                Known::Status(status) => StepState::Pending {
                    status: Some(status),
                },
                Known::Ran(Ok(outputs)) => StepState::done("succeeded", outputs),
                Known::Ran(Err(error)) => StepState::Done {
                    status: "failed",
                    outputs: Default::default(),
                    duration: 0.0,
                    error: Some(error),
                },
                Known::Skipped => StepState::done("skipped", Default::default()),
                Known::FailsAsExpected(error) => StepState::Done {
                    status: "succeeded",
                    outputs: Default::default(),
                    duration: 0.0,
                    error: Some(error),
                },
            };
            frame.steps.insert(step.id.clone(), state);
            out.push(planned);
        }
        out
    }

    /// Earlier steps whose status (or error, or duration) this step reads while it is
    /// not known yet: the step's verdict is then "unknown until" they run.
    fn unknown_status_reads(&self, step: &Step, frame: &Frame) -> Vec<String> {
        let mut sources: Vec<(&str, bool)> = Vec::new();
        if let Some(when) = &step.when {
            sources.push((when, true));
        }
        collect_strings(&step.args, &mut sources);
        if let (StepKind::Assert, Some(that)) =
            (&step.kind, step.args.get("that").and_then(|v| v.as_str()))
        {
            sources.push((that, true));
        }
        let mut out = Vec::new();
        for (source, is_expr) in sources {
            for (id, field) in self.templates.step_refs(source, is_expr) {
                let unknown = matches!(
                    frame.steps.get(&id),
                    Some(StepState::Pending { status: None })
                ) || (field != "status"
                    && matches!(frame.steps.get(&id), Some(StepState::Pending { .. })));
                if unknown && field != "outputs" && !out.contains(&id) {
                    out.push(id);
                }
            }
        }
        out
    }

    /// The step's plan, and its outcome when the plan already knows it (a read-only
    /// check judged on the real system).
    fn plan_step(&self, step: &Step, frame: &Frame, world: &mut World) -> (PlannedStep, Known) {
        let mut known = Known::Nothing;
        let mut planned = self.plan_step_inner(step, frame, world, &mut known);
        if let Some(template) = &step.expect_failure {
            frame.reads.take();
            match frame.render(template, self.templates) {
                Ok(want) if frame.reads.take().is_empty() => {
                    (planned.verdict, known) = expected_failure(planned.verdict, known, &want);
                    planned.expect_failure = Some(frame.redactor.text(&want));
                }
                // The expected text reads outputs of steps that have not run.
                Ok(_) => {
                    planned.verdict = PlanVerdict::Unknown(Vec::new());
                    known = Known::Nothing;
                }
                Err(e) => {
                    planned.verdict = unknown_or(frame, format!("`expect_failure.contains`: {e}"));
                    known = Known::Nothing;
                }
            }
        }
        (planned, known)
    }

    fn plan_step_inner(
        &self,
        step: &Step,
        frame: &Frame,
        world: &mut World,
        known: &mut Known,
    ) -> PlannedStep {
        let mut planned = PlannedStep {
            id: step.id.clone(),
            action: step.kind.action_name(),
            description: step.description.clone(),
            verdict: PlanVerdict::NoChange(String::new()),
            continues: step.continue_on_failure,
            expect_failure: None,
            args: None,
            steps: Vec::new(),
        };
        let pending = self.unknown_status_reads(step, frame);
        if !pending.is_empty() {
            planned.verdict = PlanVerdict::Unknown(pending);
            return planned;
        }
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
                        *known = Known::Skipped;
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
        let redactor = frame.redactor_for(&step.args, &args, self.templates);
        planned.args = Some(redactor.json(&args));
        let reads = frame.reads.take();
        let unknown =
            (!reads.is_empty()).then(|| PlanVerdict::Unknown(reads.into_iter().collect()));
        let verdict = match &step.kind {
            StepKind::Action(action) if unknown.is_some() => {
                // Some values wait for an earlier step's outputs, but the rest (typically
                // the path it writes) are known: let the action predict its effect on
                // them, so the steps after it are judged against it. Its verdict stays
                // unknown, and so is anything it would say about the placeholders.
                let ctx = ActionCtx {
                    roots: frame.roots.clone(),
                    state_dir: self.state_dir.clone(),
                    deadline: None,
                    progress: false,
                    probe: false,
                };
                world.set_step(&step.id);
                world.take_opaque_reads();
                let verdict = action.preflight(&args, world, &ctx);
                let opaque_reads = record_effects(step, *action, &args, &verdict, true, world);
                let mut waits = match unknown {
                    Some(PlanVerdict::Unknown(steps)) => steps,
                    _ => Vec::new(),
                };
                for s in opaque_reads {
                    if !waits.contains(&s) {
                        waits.push(s);
                    }
                }
                PlanVerdict::Unknown(waits)
            }
            StepKind::Action(action) => unknown.unwrap_or_else(|| {
                let ctx = ActionCtx {
                    roots: frame.roots.clone(),
                    state_dir: self.state_dir.clone(),
                    deadline: None,
                    progress: false,
                    probe: self.probe,
                };
                world.set_step(&step.id);
                world.take_opaque_reads();
                let read_only = action.effect(&args) == crate::actions::Effect::ReadOnly;
                let verdict = action.preflight(&args, world, &ctx);
                let opaque_reads = record_effects(step, *action, &args, &verdict, false, world);
                if !opaque_reads.is_empty() {
                    // It read what an earlier opaque step may change: today's disk does
                    // not tell its outcome (nor, for a check the plan runs, its outputs).
                    return PlanVerdict::Unknown(opaque_reads);
                }
                if read_only && matches!(verdict, Verdict::NoChange(_) | Verdict::WouldFail(_)) {
                    *known = if action.plan_runs_it() {
                        // A local read-only check judged on the real system: its outputs
                        // are what the run will see, so later steps can use them.
                        Known::Ran(action.execute(&args, &ctx).map_err(|e| e.to_string()))
                    } else if matches!(verdict, Verdict::NoChange(_)) {
                        Known::Status("succeeded")
                    } else {
                        Known::Status("failed")
                    };
                }
                match verdict {
                    Verdict::WillChange(d) => PlanVerdict::WillChange(d),
                    Verdict::NoChange(d) | Verdict::Deferred(d) => PlanVerdict::NoChange(d),
                    Verdict::WouldFail(d) => PlanVerdict::WouldFail(d),
                }
            }),
            StepKind::Assert => {
                let v = self.plan_assert(step, frame);
                *known = match &v {
                    PlanVerdict::NoChange(_) => Known::Ran(Ok(Default::default())),
                    PlanVerdict::WouldFail(why) => Known::Ran(Err(why.clone())),
                    _ => Known::Nothing,
                };
                v
            }
            StepKind::Confirm => {
                let message = args["message"].as_str().unwrap_or_default();
                if self.assume_yes {
                    PlanVerdict::NoChange(format!("asks `{message}`: answered yes by --yes"))
                } else if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                    PlanVerdict::NoChange(format!("asks `{message}` on the terminal"))
                } else {
                    PlanVerdict::WouldFail(format!(
                        "asks `{message}` and there is no terminal to answer on; pass --yes"
                    ))
                }
            }
            StepKind::Call(child) => {
                if let Some(u) = unknown {
                    u
                } else if args.get("dry_run") == Some(&Json::Bool(true)) {
                    // Only planned at run time too: nothing of it is predicted to happen.
                    let (verdict, steps) =
                        self.plan_call(child, step, &args, frame, &mut world.clone());
                    planned.steps = steps;
                    match verdict {
                        PlanVerdict::WouldFail(why) => PlanVerdict::WouldFail(why),
                        _ => PlanVerdict::NoChange(format!(
                            "plans `{}` (a dry-run: nothing changes)",
                            child.name
                        )),
                    }
                } else if step.expect_failure.is_some() {
                    // A call expected to fail stops part-way and runs its own rollback:
                    // the steps after it are judged without its predicted effects.
                    let (verdict, steps) =
                        self.plan_call(child, step, &args, frame, &mut world.clone());
                    planned.steps = steps;
                    verdict
                } else {
                    let (verdict, steps) = self.plan_call(child, step, &args, frame, world);
                    planned.steps = steps;
                    verdict
                }
            }
        };
        let busy = step
            .lock
            .as_ref()
            .and_then(|lock| lock_busy(frame, lock, self.templates));
        let verdict = match (busy, verdict) {
            (Some(note), PlanVerdict::WillChange(d) | PlanVerdict::NoChange(d)) => {
                PlanVerdict::WillChange(format!("{d} ({note})"))
            }
            (_, v) => v,
        };
        planned.verdict = match verdict {
            PlanVerdict::WouldFail(d) => PlanVerdict::WouldFail(redactor.text(&d)),
            PlanVerdict::WillChange(d) => PlanVerdict::WillChange(redactor.text(&d)),
            PlanVerdict::NoChange(d) => PlanVerdict::NoChange(redactor.text(&d)),
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
        step: &Step,
        args: &Json,
        caller: &Frame,
        world: &mut World,
    ) -> (PlanVerdict, Vec<PlannedStep>) {
        let frame = match child_frame(child, step, args, caller, self.inputs, self.templates) {
            Ok(f) => f,
            Err(e) => return (PlanVerdict::WouldFail(e), Vec::new()),
        };
        let mut frame = frame;
        let steps = self.plan_steps(&child.steps, &mut frame, world);
        let verdict = summarize(child, &steps);
        (verdict, steps)
    }
}

/// After a step's preflight: the opaque steps whose reach it read (its verdict is then
/// unknown until they run), with the effects it leaves for the steps after it recorded
/// in `world`. An action whose effects cannot be predicted (`exec`, a started service,
/// a `POST`) makes what it may reach opaque, unless it will do nothing; and a step that
/// changes things but could not predict its effect, because it would fail on a guess
/// (an earlier opaque step's reach, or placeholders for outputs), may touch anything it
/// looked at, so that is opaque too, rather than a false "does not exist" later.
fn record_effects(
    step: &Step,
    action: &dyn crate::actions::ActionKind,
    args: &Json,
    verdict: &Verdict,
    values_unknown: bool,
    world: &mut World,
) -> Vec<String> {
    let (opaque_reads, queried) = world.take_opaque_reads();
    let guessed = values_unknown || !opaque_reads.is_empty();
    let read_only = action.effect(args) == crate::actions::Effect::ReadOnly;
    let does_nothing = matches!(verdict, Verdict::NoChange(_)) && !guessed;
    let failed = matches!(verdict, Verdict::WouldFail(_));
    if let Some(scope) = action
        .opaque(args)
        .filter(|_| !does_nothing && (!failed || guessed))
    {
        world.predict_opaque(&step.id, scope);
    } else if failed && guessed && !read_only {
        let mut reach = queried;
        named_paths(args, &mut reach);
        world.predict_opaque(&step.id, crate::world::OpaqueScope::Below(reach));
    }
    opaque_reads
}

/// Every string of a step's rendered arguments, taken as a path: what it may touch is
/// among them (a `copy`'s `to`), and a string that is no path names nothing real.
fn named_paths(args: &Json, out: &mut Vec<PathBuf>) {
    match args {
        Json::String(s) if !s.is_empty() => out.push(PathBuf::from(s)),
        Json::Array(items) => items.iter().for_each(|i| named_paths(i, out)),
        Json::Object(map) => map.values().for_each(|v| named_paths(v, out)),
        _ => {}
    }
}

/// The verdict of a step that must fail with `want`, from its usual one: a failure the
/// plan sees is "no change: fails as expected" when its error matches (and the steps
/// after it see it done, with that error), and "would fail" when it does not; a
/// read-only check the plan ran and saw pass would fail at run time. Anything else the
/// plan cannot tell: the usual verdict stands.
fn expected_failure(verdict: PlanVerdict, known: Known, want: &str) -> (PlanVerdict, Known) {
    match (verdict, known) {
        (PlanVerdict::WouldFail(why), _) if why.contains(want) => (
            PlanVerdict::NoChange(format!("fails as expected: {why}")),
            Known::FailsAsExpected(why),
        ),
        (PlanVerdict::WouldFail(why), _) => (
            PlanVerdict::WouldFail(format!(
                "would fail with a different error: {why} (expected an error containing `{want}`)"
            )),
            Known::Nothing,
        ),
        (_, Known::Ran(Ok(_)) | Known::Status("succeeded")) => (
            PlanVerdict::WouldFail(format!("expected to fail with `{want}`, but it passes now")),
            Known::Nothing,
        ),
        // Its usual verdict; what later steps see of it waits for the run.
        (verdict, _) => (verdict, Known::Nothing),
    }
}

/// "lock X is held now by ..." when a step's lock is taken at this moment (read-only).
fn lock_busy(frame: &Frame, lock: &crate::load::StepLock, templates: &Templates) -> Option<String> {
    let path = frame.render(&lock.path, templates).ok()?;
    let holder = crate::lock::holder_at(std::path::Path::new(&path))?;
    Some(format!(
        "lock {path} is held now by {holder}; the step will wait up to {}",
        humantime::format_duration(lock.timeout)
    ))
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
    if let Some(fail) = steps.iter().find(|s| s.fails()) {
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
    steps.iter().any(PlannedStep::fails)
}

impl PlannedStep {
    /// Would fail and stop the run.
    pub fn fails(&self) -> bool {
        matches!(self.verdict, PlanVerdict::WouldFail(_)) && !self.continues
    }
}

/// Every string in an argument tree, as (template source, is an expression).
fn collect_strings<'a>(v: &'a serde_yaml::Value, out: &mut Vec<(&'a str, bool)>) {
    match v {
        serde_yaml::Value::String(s) => out.push((s, false)),
        serde_yaml::Value::Sequence(items) => items.iter().for_each(|i| collect_strings(i, out)),
        serde_yaml::Value::Mapping(map) => map.values().for_each(|i| collect_strings(i, out)),
        _ => {}
    }
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
/// files, then defaults. It inherits its caller's secrets (secrecy follows the value:
/// a secret passed to a param not declared secret is still masked there), and a param
/// the call computes from a secret is secret whole.
pub fn child_frame(
    child: &Arc<Runbook>,
    step: &Step,
    args: &Json,
    caller: &Frame,
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
    let mut secret_params = std::collections::BTreeSet::new();
    if let Some(serde_yaml::Value::Mapping(given)) = step.args.get("params") {
        for (name, template) in given {
            let mut sources = Vec::new();
            collect_strings(template, &mut sources);
            let derived = sources.iter().any(|(source, _)| {
                templates
                    .names_used(source)
                    .iter()
                    .any(|n| caller.secrets.contains(n))
            });
            if let (true, Some(name)) = (derived, name.as_str()) {
                secret_params.insert(name.to_string());
            }
        }
    }
    let inherited = crate::frame::Inherited {
        redactor: caller.redactor.clone(),
        secret_params,
        called: true,
    };
    Frame::new(child.clone(), &child_inputs, None, templates, inherited).map_err(|e| {
        caller
            .redactor
            .text(&format!("calling `{}`: {e}", child.name))
    })
}
