//! Runs a validated runbook. Emits events; never prints. The journal sink records
//! each step's intent (and syncs it) before the side effect and its result after.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value as Json;

use crate::actions::{ActionCtx, Outputs, Reconcile, Verdict};
use crate::events::{Event, EventSink, RunStatus, Section, SinkError};
use crate::frame::{Frame, StepState};
use crate::journal::RunRecord;
use crate::load::{AssertArgs, Step, StepKind};
use crate::params::ParamInputs;
use crate::plan::{assert_message, child_frame};
use crate::template::Templates;

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Journal(#[from] SinkError),
}

/// Why the main steps stopped.
#[derive(Debug, Clone)]
pub enum Stop {
    Failed {
        key: String,
        error: String,
    },
    /// Resume cannot tell whether an interrupted step took effect.
    NeedsOperator {
        key: String,
        message: String,
    },
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: RunStatus,
    pub stop: Option<Stop>,
    pub outputs: Outputs,
}

pub struct Executor<'a> {
    pub templates: &'a Templates,
    pub inputs: &'a ParamInputs,
    pub state_dir: PathBuf,
    pub sinks: Vec<&'a mut dyn EventSink>,
    /// The journal of the run being resumed (or rolled back).
    pub prior: Option<&'a RunRecord>,
    /// Step keys that resume may run again although they were interrupted.
    pub retry_steps: BTreeSet<String>,
    pub no_rollback: bool,
    /// For messages that tell the operator what to run next.
    pub run_id: String,
    /// Actions may draw progress bars on the terminal.
    pub progress: bool,
    /// `--yes`: every `confirm` step is answered yes.
    pub assume_yes: bool,
}

/// Fault injection for the interrupted-attempt tests: `RUNBOOK_FAILPOINT=before:KEY`
/// (or `after:KEY`) makes the engine SIGKILL itself right before (or right after) the
/// side effect of step KEY — after its intent is journaled, before its result is. Only
/// the tests set it; it is the same death as `kill -9` at that instant.
fn failpoint(when: &str, key: &str) {
    if std::env::var("RUNBOOK_FAILPOINT").is_ok_and(|p| p.split_once(':') == Some((when, key))) {
        // SAFETY: sends a signal to this very process.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

/// The operator's answer to a `confirm` step: `--yes`, or asked on the terminal. This
/// is the one place the executor talks to the terminal itself: a question cannot wait
/// for a renderer.
fn confirm(message: &str, assume_yes: bool) -> Result<&'static str, String> {
    use std::io::{BufRead, IsTerminal, Write};
    if assume_yes {
        return Ok("yes (--yes)");
    }
    if !std::io::stdin().is_terminal() {
        return Err(format!(
            "`{message}` needs an answer and there is no terminal to ask on; pass --yes to answer yes"
        ));
    }
    let mut err = std::io::stderr().lock();
    let _ = write!(err, "{message} [y/N] ");
    let _ = err.flush();
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| format!("reading the answer: {e}"))?;
    match line.trim() {
        "y" | "Y" | "yes" | "YES" | "Yes" => Ok("yes"),
        _ => Err(format!("`{message}`: the operator said no")),
    }
}

type StepResult = Result<(), Stop>;

/// A step's result judged against its `expect_failure`.
enum Judged {
    Succeeded(Outputs),
    /// It failed, and that was expected: the step is done.
    FailedAsExpected(String),
    Failed(String),
}

/// `expected`: the text the error of a step with `expect_failure` must contain.
fn judge(expected: Option<&str>, result: Result<Outputs, String>) -> Judged {
    match (expected, result) {
        (None, Ok(outputs)) => Judged::Succeeded(outputs),
        (None, Err(error)) => Judged::Failed(error),
        (Some(want), Err(error)) if error.contains(want) => Judged::FailedAsExpected(error),
        (Some(want), Err(error)) => Judged::Failed(format!(
            "failed with a different error: {error} (expected an error containing `{want}`)"
        )),
        (Some(want), Ok(_)) => {
            Judged::Failed(format!("expected to fail with `{want}`, but it succeeded"))
        }
    }
}

impl Executor<'_> {
    /// Records (durably, through the journal sink) that a step's attempt begins; the
    /// clock of its duration starts here.
    fn start_step(
        &mut self,
        key: &str,
        section: Section,
        action: &'static str,
        attempt: u32,
        args: Json,
    ) -> Result<Instant, ExecError> {
        let started = Instant::now();
        crate::lock::set_current_step(Some(key));
        self.emit(Event::StepStarted {
            key: key.to_string(),
            section,
            action,
            attempt,
            args,
        })?;
        Ok(started)
    }

    fn emit(&mut self, event: Event) -> Result<(), ExecError> {
        for sink in &mut self.sinks {
            sink.on_event(&event)?;
        }
        Ok(())
    }

    /// Runs the main steps, then the rollback section when one failed.
    pub fn run(
        &mut self,
        run_id: &str,
        frame: &mut Frame,
        start: Event,
    ) -> Result<Outcome, ExecError> {
        let started = Instant::now();
        self.emit(start)?;
        let steps = &frame.runbook.clone().steps;
        let result = self.run_steps(frame, steps, "", Section::Main)?;
        let (status, stop, outputs) = match result {
            Ok(()) => match frame.outputs(self.templates) {
                Ok(outputs) => (RunStatus::Succeeded, None, outputs),
                Err(e) => {
                    let stop = Stop::Failed {
                        key: "outputs".into(),
                        error: e,
                    };
                    (
                        self.after_failure(frame, "", &stop)?,
                        Some(stop),
                        Outputs::new(),
                    )
                }
            },
            Err(stop @ Stop::NeedsOperator { .. }) => {
                (RunStatus::Failed, Some(stop), Outputs::new())
            }
            Err(stop) => {
                let status = self.after_failure(frame, "", &stop)?;
                // What the runbook reports (say, a validator's list of errors) is still
                // worth having when it failed: rendered where it can be.
                (
                    status,
                    Some(stop),
                    frame.outputs(self.templates).unwrap_or_default(),
                )
            }
        };
        let error = stop.as_ref().map(|s| match s {
            Stop::Failed { key, error } => format!("step `{key}` failed: {error}"),
            Stop::NeedsOperator { key, message } => {
                format!("step `{key}` needs checking: {message}")
            }
        });
        self.emit(Event::RunFinished {
            run_id: run_id.to_string(),
            status,
            error: error.map(|e| frame.redactor.text(&e)),
            outputs: frame.redactor_outputs(&outputs),
            duration: started.elapsed(),
        })?;
        Ok(Outcome {
            status,
            stop,
            outputs: frame.redactor_outputs(&outputs),
        })
    }

    /// Runs only the rollback section (for `runbook rollback RUN_ID`).
    pub fn rollback(
        &mut self,
        run_id: &str,
        frame: &mut Frame,
        start: Event,
    ) -> Result<Outcome, ExecError> {
        let started = Instant::now();
        self.emit(start)?;
        self.emit(Event::RollbackStarted {
            reason: "requested".into(),
        })?;
        let steps = &frame.runbook.clone().rollback;
        let result = self.run_steps(frame, steps, "", Section::Rollback)?;
        let (status, stop) = match result {
            Ok(()) => (RunStatus::RolledBack, None),
            Err(stop) => (RunStatus::Failed, Some(stop)),
        };
        let error = stop.as_ref().map(|s| match s {
            Stop::Failed { key, error } => format!("rollback step `{key}` failed: {error}"),
            Stop::NeedsOperator { key, message } => format!("rollback step `{key}`: {message}"),
        });
        let error = error.map(|e| frame.redactor.text(&e));
        self.emit(Event::RunFinished {
            run_id: run_id.to_string(),
            status,
            error,
            outputs: Outputs::new(),
            duration: started.elapsed(),
        })?;
        Ok(Outcome {
            status,
            stop,
            outputs: Outputs::new(),
        })
    }

    /// Runs the rollback section of `frame` after a failure; returns the run status.
    fn after_failure(
        &mut self,
        frame: &mut Frame,
        prefix: &str,
        stop: &Stop,
    ) -> Result<RunStatus, ExecError> {
        if self.no_rollback || frame.runbook.rollback.is_empty() {
            return Ok(RunStatus::Failed);
        }
        let reason = match stop {
            Stop::Failed { key, .. } | Stop::NeedsOperator { key, .. } => {
                format!("step `{key}` failed")
            }
        };
        self.emit(Event::RollbackStarted { reason })?;
        let steps = &frame.runbook.clone().rollback;
        Ok(
            match self.run_steps(frame, steps, prefix, Section::Rollback)? {
                Ok(()) => RunStatus::RolledBack,
                Err(_) => RunStatus::Failed,
            },
        )
    }

    fn prior_status(
        &self,
        section: Section,
        key: &str,
    ) -> Option<(String, Outputs, Option<String>)> {
        let step = self.prior?.step(section, key)?;
        Some((
            step.status.clone(),
            step.outputs.clone(),
            step.error.clone(),
        ))
    }

    fn run_steps(
        &mut self,
        frame: &mut Frame,
        steps: &[Step],
        prefix: &str,
        section: Section,
    ) -> Result<StepResult, ExecError> {
        for step in steps {
            let key = format!("{prefix}{}", step.id);
            // A rollback after `runbook rollback` or a resumed failure starts over.
            let prior = if section == Section::Main {
                self.prior_status(section, &key)
            } else {
                None
            };
            match prior.as_ref().map(|(s, o, e)| (s.as_str(), o, e)) {
                Some(("succeeded", outputs, error)) => {
                    // A step that failed as expected keeps its error readable.
                    frame.steps.insert(
                        step.id.clone(),
                        StepState::Done {
                            status: "succeeded",
                            outputs: outputs.clone(),
                            duration: 0.0,
                            error: error.clone(),
                        },
                    );
                    self.emit(Event::StepAlreadyDone { key, section })?;
                    continue;
                }
                Some(("skipped", ..)) => {
                    frame
                        .steps
                        .insert(step.id.clone(), StepState::done("skipped", Outputs::new()));
                    self.emit(Event::StepAlreadyDone { key, section })?;
                    continue;
                }
                _ => {}
            }
            let interrupted = matches!(prior.as_ref().map(|(s, ..)| s.as_str()), Some("started"));
            let result = self.run_step(frame, step, &key, section, interrupted)?;
            match result {
                Ok(()) => {}
                // A check that may fail: later steps read its status and error.
                Err(Stop::Failed { error, .. }) if step.continue_on_failure => {
                    frame.steps.insert(
                        step.id.clone(),
                        StepState::Done {
                            status: "failed",
                            outputs: Outputs::new(),
                            duration: 0.0,
                            error: Some(error),
                        },
                    );
                }
                Err(stop) => return Ok(Err(stop)),
            }
        }
        Ok(Ok(()))
    }

    fn run_step(
        &mut self,
        frame: &mut Frame,
        step: &Step,
        key: &str,
        section: Section,
        interrupted: bool,
    ) -> Result<StepResult, ExecError> {
        let action = step.kind.action_name();
        if let Some(when) = &step.when {
            match frame.eval(when, self.templates) {
                Ok(false) => {
                    frame
                        .steps
                        .insert(step.id.clone(), StepState::done("skipped", Outputs::new()));
                    self.emit(Event::StepSkipped {
                        key: key.to_string(),
                        section,
                        reason: format!("when `{when}` is false"),
                    })?;
                    return Ok(Ok(()));
                }
                Ok(true) => {}
                Err(e) => {
                    return self.fail_now(
                        frame,
                        key,
                        section,
                        action,
                        Json::Null,
                        format!("`when`: {e}"),
                    );
                }
            }
        }
        let args = match frame.render_args(&step.args, self.templates) {
            Ok(a) => a,
            Err(e) => return self.fail_now(frame, key, section, action, Json::Null, e),
        };
        // What the arguments make of a secret is masked in everything after this.
        frame.redactor = frame.redactor_for(&step.args, &args, self.templates);
        let shown_args = frame.redactor.json(&args);
        let expected = match &step.expect_failure {
            None => None,
            Some(template) => match frame.render(template, self.templates) {
                Ok(text) => Some(text),
                Err(e) => {
                    let error = format!("`expect_failure.contains`: {e}");
                    return self.fail_now(frame, key, section, action, shown_args, error);
                }
            },
        };
        let expected = expected.as_deref();
        // Held until this function returns: for every attempt of the step.
        let _step_lock = match &step.lock {
            None => None,
            Some(lock) => {
                let taken = frame.render(&lock.path, self.templates).and_then(|path| {
                    let holder = format!("{} {} {key}", self.run_id, std::process::id());
                    crate::lock::acquire_file(std::path::Path::new(&path), &holder, lock.timeout)
                        .map_err(|e| e.to_string())
                });
                match taken {
                    Ok(held) => Some(held),
                    Err(e) => return self.fail_now(frame, key, section, action, shown_args, e),
                }
            }
        };
        match &step.kind {
            StepKind::Confirm => {
                let started = self.start_step(key, section, action, 1, shown_args)?;
                let message = args["message"].as_str().unwrap_or_default().to_string();
                let result = confirm(&message, self.assume_yes).map(|answer| {
                    let mut out = Outputs::new();
                    out.insert("answer".into(), Json::String(answer.into()));
                    out
                });
                self.finish(frame, step, key, section, started, expected, result)
            }
            StepKind::Action(kind) => {
                let ctx = ActionCtx {
                    roots: frame.roots.clone(),
                    state_dir: self.state_dir.clone(),
                    deadline: None,
                    progress: self.progress,
                    probe: false,
                };
                if interrupted && !self.retry_steps.contains(key) && step.idempotent != Some(true) {
                    let decision = if step.idempotent == Some(false) {
                        Reconcile::AskOperator("the step is declared `idempotent: false`".into())
                    } else {
                        kind.reconcile(&args, &ctx)
                    };
                    match decision {
                        Reconcile::Rerun => {}
                        Reconcile::AlreadyDone(outputs) => {
                            let shown = frame.redactor_outputs(&outputs);
                            frame
                                .steps
                                .insert(step.id.clone(), StepState::done("succeeded", outputs));
                            self.emit(Event::StepSucceeded {
                                key: key.to_string(),
                                section,
                                duration: Duration::ZERO,
                                outputs: shown,
                                reconciled: true,
                            })?;
                            return Ok(Ok(()));
                        }
                        Reconcile::AskOperator(why) => {
                            let message = format!(
                                "it was interrupted and {why}, so running it again could repeat its effect. Check whether it took effect (arguments: {shown_args}), then run `runbook resume {} --retry-step {key}`",
                                self.run_id
                            );
                            return Ok(Err(Stop::NeedsOperator {
                                key: key.to_string(),
                                message: frame.redactor.text(&message),
                            }));
                        }
                    }
                }
                for attempt in 1..=step.attempts {
                    let started =
                        self.start_step(key, section, action, attempt, shown_args.clone())?;
                    let ctx = ActionCtx {
                        deadline: step.timeout.map(|t| started + t),
                        ..ctx.clone()
                    };
                    let result = match kind.preflight(&args, &mut crate::world::World::real(), &ctx)
                    {
                        Verdict::WouldFail(why) => Err(format!("precondition failed: {why}")),
                        _ => {
                            failpoint("before", key);
                            let r = kind.execute(&args, &ctx).map_err(|e| e.to_string());
                            failpoint("after", key);
                            r
                        }
                    };
                    // Attempts are retried until the judged outcome is right.
                    let judged = judge(expected, result);
                    let will_retry = matches!(judged, Judged::Failed(_)) && attempt < step.attempts;
                    let outcome =
                        self.conclude(frame, step, key, section, started, judged, will_retry)?;
                    if !will_retry {
                        return Ok(outcome);
                    }
                    std::thread::sleep(step.retry_delay);
                }
                unreachable!("attempts is at least 1")
            }
            StepKind::Assert => {
                let started = self.start_step(key, section, action, 1, shown_args)?;
                let parsed: Result<AssertArgs, String> =
                    serde_json::from_value(args).map_err(|e| e.to_string());
                let result = parsed.and_then(|a| match frame.eval(&a.that, self.templates) {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(assert_message(&a, frame, self.templates)),
                    Err(e) => Err(format!("`that`: {e}")),
                });
                self.finish(
                    frame,
                    step,
                    key,
                    section,
                    started,
                    expected,
                    result.map(|()| Outputs::new()),
                )
            }
            StepKind::Call(child) => {
                let started = self.start_step(key, section, action, 1, shown_args)?;
                if args.get("dry_run") == Some(&Json::Bool(true)) {
                    let result = self.dry_run_call(child, step, &args, frame);
                    return self.finish(frame, step, key, section, started, expected, result);
                }
                let mut child_frame =
                    match child_frame(child, step, &args, frame, self.inputs, self.templates) {
                        Ok(f) => f,
                        Err(e) => {
                            return self.finish(
                                frame,
                                step,
                                key,
                                section,
                                started,
                                expected,
                                Err(e),
                            );
                        }
                    };
                // A resumed call sees the vars its first attempt froze (never a secret
                // one: those were not frozen, and are rendered again).
                if let Some(frozen) = self.prior.and_then(|p| p.frames.get(key)) {
                    for (k, v) in frozen {
                        if !child_frame.secrets.contains(k) {
                            child_frame.vars.insert(k.clone(), v.clone());
                        }
                    }
                }
                self.emit(Event::FrameFrozen {
                    key: key.to_string(),
                    vars: child_frame.frozen_vars(),
                })?;
                let prefix = format!("{key}/");
                let steps = &child.steps;
                let result = match self.run_steps(&mut child_frame, steps, &prefix, section)? {
                    Ok(()) => child_frame.outputs(self.templates),
                    Err(stop) => {
                        self.after_failure(&mut child_frame, &prefix, &stop)?;
                        frame.redactor.absorb(&child_frame.redactor);
                        match stop {
                            Stop::NeedsOperator { .. } => return Ok(Err(stop)),
                            Stop::Failed { key: k, error } => {
                                Err(format!("step `{k}` of `{}` failed: {error}", child.name))
                            }
                        }
                    }
                };
                // The caller masks what its callee knew to be secret (its outputs may
                // carry a secret the callee got from a vars file).
                frame.redactor.absorb(&child_frame.redactor);
                self.finish(frame, step, key, section, started, expected, result)
            }
        }
    }

    /// A call with `dry_run: true`: the called runbook's plan, made now (read-only), as
    /// the step's outputs; it fails when a step of that plan would fail.
    fn dry_run_call(
        &self,
        child: &std::sync::Arc<crate::load::Runbook>,
        step: &Step,
        args: &Json,
        caller: &Frame,
    ) -> Result<Outputs, String> {
        let frame = child_frame(child, step, args, caller, self.inputs, self.templates)?;
        let planner = crate::plan::Planner {
            templates: self.templates,
            inputs: self.inputs,
            state_dir: self.state_dir.clone(),
            assume_yes: self.assume_yes,
            probe: false,
        };
        let plan = planner.plan(child.clone(), frame);
        if let Some((key, why)) = plan.first_failure() {
            return Err(format!(
                "the plan of `{}` fails: step `{key}` would fail: {why}",
                child.name
            ));
        }
        Ok(plan.as_outputs())
    }

    #[allow(clippy::too_many_arguments)]
    fn finish(
        &mut self,
        frame: &mut Frame,
        step: &Step,
        key: &str,
        section: Section,
        started: Instant,
        expected: Option<&str>,
        result: Result<Outputs, String>,
    ) -> Result<StepResult, ExecError> {
        let judged = judge(expected, result);
        self.conclude(frame, step, key, section, started, judged, false)
    }

    /// Records a step attempt's judged outcome: in the frame and as an event.
    #[allow(clippy::too_many_arguments)]
    fn conclude(
        &mut self,
        frame: &mut Frame,
        step: &Step,
        key: &str,
        section: Section,
        started: Instant,
        judged: Judged,
        will_retry: bool,
    ) -> Result<StepResult, ExecError> {
        match judged {
            Judged::FailedAsExpected(error) => {
                let error = frame.redactor.text(&error);
                frame.steps.insert(
                    step.id.clone(),
                    StepState::Done {
                        status: "succeeded",
                        outputs: Outputs::new(),
                        duration: started.elapsed().as_secs_f64(),
                        error: Some(error.clone()),
                    },
                );
                self.emit(Event::StepFailedAsExpected {
                    key: key.to_string(),
                    section,
                    duration: started.elapsed(),
                    error,
                })?;
                Ok(Ok(()))
            }
            Judged::Succeeded(outputs) => {
                let shown = frame.redactor_outputs(&outputs);
                frame.steps.insert(
                    step.id.clone(),
                    StepState::done("succeeded", outputs).timed(started.elapsed()),
                );
                self.emit(Event::StepSucceeded {
                    key: key.to_string(),
                    section,
                    duration: started.elapsed(),
                    outputs: shown,
                    reconciled: false,
                })?;
                Ok(Ok(()))
            }
            Judged::Failed(error) => {
                let error = frame.redactor.text(&error);
                self.emit(Event::StepFailed {
                    key: key.to_string(),
                    section,
                    duration: started.elapsed(),
                    error: error.clone(),
                    will_retry,
                })?;
                Ok(Err(Stop::Failed {
                    key: key.to_string(),
                    error,
                }))
            }
        }
    }

    /// A failure found before the step could start (rendering, `when`).
    fn fail_now(
        &mut self,
        frame: &Frame,
        key: &str,
        section: Section,
        action: &'static str,
        args: Json,
        error: String,
    ) -> Result<StepResult, ExecError> {
        let error = frame.redactor.text(&error);
        self.start_step(key, section, action, 1, args)?;
        self.emit(Event::StepFailed {
            key: key.to_string(),
            section,
            duration: Duration::ZERO,
            error: error.clone(),
            will_retry: false,
        })?;
        Ok(Err(Stop::Failed {
            key: key.to_string(),
            error,
        }))
    }
}

impl Frame {
    /// Outputs as they are stored and shown: secrets masked.
    pub fn redactor_outputs(&self, outputs: &Outputs) -> Outputs {
        outputs
            .iter()
            .map(|(k, v)| (k.clone(), self.redactor.json(v)))
            .collect()
    }
}
