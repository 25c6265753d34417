//! Turning plans, events and journal records into text or JSON on stdout.

use std::io::Write;

use crate::events::{Event, EventSink, SinkError};
use crate::journal::{RunRecord, RunSummary};
use crate::plan::{Plan, PlannedStep};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
    /// JUnit XML (`runbook drill` only; elsewhere it means text).
    Junit,
}

fn secs(d: std::time::Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

/// Prints run events as they happen.
pub struct Reporter {
    pub format: Format,
    pub verbose: u8,
    pub quiet: bool,
    pub run_id: String,
}

impl EventSink for Reporter {
    fn on_event(&mut self, event: &Event) -> Result<(), SinkError> {
        let mut out = std::io::stdout().lock();
        if self.format == Format::Json {
            // Every line carries the run id, once, first.
            let mut line = serde_json::Map::new();
            line.insert(
                "run_id".into(),
                serde_json::Value::String(self.run_id.clone()),
            );
            if let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(event) {
                line.extend(fields.into_iter().filter(|(k, _)| k != "run_id"));
            }
            let line = serde_json::Value::Object(line).to_string();
            let _ = writeln!(out, "{line}");
            return Ok(());
        }
        let line = match event {
            Event::RunStarted(h) => Some(format!("run {} {}", h.run_id, h.runbook)),
            Event::RunResumed {
                run_id,
                runbook,
                purpose,
            } => Some(format!("{purpose} {run_id} {runbook}")),
            Event::FrameFrozen { .. } => None,
            Event::StepStarted {
                key,
                action,
                attempt,
                ..
            } if self.verbose > 0 => Some(format!(
                "  start    {key} ({action}){}",
                if *attempt > 1 {
                    format!(", attempt {attempt}")
                } else {
                    String::new()
                }
            )),
            Event::StepStarted { .. } => None,
            _ if self.quiet && !matches!(event, Event::RunFinished { .. }) => None,
            Event::StepSucceeded {
                key,
                duration,
                reconciled,
                ..
            } => Some(if *reconciled {
                format!("  ok       {key} (already done before the interruption)")
            } else {
                format!("  ok       {key} ({})", secs(*duration))
            }),
            Event::StepFailed {
                key,
                error,
                will_retry,
                ..
            } => Some(format!(
                "  FAILED   {key}: {error}{}",
                if *will_retry { " (retrying)" } else { "" }
            )),
            Event::StepFailedAsExpected {
                key,
                duration,
                error,
                ..
            } => Some(format!(
                "  ok       {key} ({}, failed as expected: {error})",
                secs(*duration)
            )),
            Event::StepSkipped { key, reason, .. } => Some(format!("  skipped  {key}: {reason}")),
            Event::StepAlreadyDone { key, .. } => {
                Some(format!("  done     {key} (finished in an earlier attempt)"))
            }
            Event::RollbackStarted { reason } => Some(format!("rollback ({reason})")),
            Event::RunFinished {
                run_id,
                status,
                error,
                outputs,
                duration,
            } => {
                let mut text = match error {
                    Some(e) => format!(
                        "run {run_id} {} after {}: {e}",
                        status.as_str(),
                        secs(*duration)
                    ),
                    None => format!("run {run_id} {} in {}", status.as_str(), secs(*duration)),
                };
                for (name, value) in outputs {
                    let shown = value
                        .as_str()
                        .map_or_else(|| value.to_string(), str::to_string);
                    text.push_str(&format!("\n  output {name} = {shown}"));
                }
                Some(text)
            }
        };
        if let Some(line) = line {
            let _ = writeln!(out, "{line}");
        }
        Ok(())
    }
}

pub fn plan_text(plan: &Plan) -> String {
    let mut s = format!("plan {} ({})\n", plan.runbook, plan.path.display());
    if !plan.params.is_empty() {
        s.push_str("params:\n");
        for (k, v) in &plan.params {
            let shown = v.as_str().map_or_else(|| v.to_string(), str::to_string);
            s.push_str(&format!("  {k} = {shown}\n"));
        }
    }
    if !plan.vars.is_empty() {
        s.push_str("vars:\n");
        for (k, v) in &plan.vars {
            s.push_str(&format!("  {k} = {v}\n"));
        }
    }
    s.push_str("steps:\n");
    steps_text(&mut s, &plan.steps, 1);
    if !plan.rollback.is_empty() {
        s.push_str("rollback (runs if a step fails):\n");
        steps_text(&mut s, &plan.rollback, 1);
    }
    let t = plan.tally();
    s.push_str(&format!(
        "{} steps: {} will change, {} no change, {} unknown, {} skipped, {} would fail{}\n",
        plan.steps.len(),
        t.will_change,
        t.no_change,
        t.unknown,
        t.skipped,
        t.would_fail,
        if t.may_fail > 0 {
            format!(", {} may fail (on_failure: continue)", t.may_fail)
        } else {
            String::new()
        }
    ));
    s
}

fn steps_text(s: &mut String, steps: &[PlannedStep], depth: usize) {
    let width = steps.iter().map(|st| st.id.len()).max().unwrap_or(0);
    for st in steps {
        let indent = "  ".repeat(depth);
        s.push_str(&format!(
            "{indent}{:<11} {:<width$}  {}: {}\n",
            if st.continues && matches!(st.verdict, crate::plan::PlanVerdict::WouldFail(_)) {
                "may fail"
            } else {
                st.verdict.label()
            },
            st.id,
            st.action,
            st.verdict.detail()
        ));
        if !st.steps.is_empty() {
            steps_text(s, &st.steps, depth + 1);
        }
    }
}

pub fn runs_text(runs: &[RunSummary]) -> String {
    if runs.is_empty() {
        return "no runs yet\n".to_string();
    }
    let w_id = runs.iter().map(|r| r.id.len()).max().unwrap_or(0);
    let w_rb = runs
        .iter()
        .map(|r| r.runbook.len())
        .max()
        .unwrap_or(0)
        .max(7);
    let mut s = format!(
        "{:<w_id$}  {:<w_rb$}  {:<11}  {}\n",
        "ID", "RUNBOOK", "STATUS", "STARTED"
    );
    for r in runs {
        s.push_str(&format!(
            "{:<w_id$}  {:<w_rb$}  {:<11}  {}\n",
            r.id, r.runbook, r.status, r.started_at
        ));
    }
    s
}

pub fn show_text(run: &RunRecord) -> String {
    let r = &run.summary;
    let mut s = format!("run {} {} {}\n", r.id, r.runbook, r.status);
    s.push_str(&format!(
        "  file: {} (sha256 {})\n",
        run.path.display(),
        &run.content_hash[..12.min(run.content_hash.len())]
    ));
    s.push_str(&format!("  started: {}\n", r.started_at));
    if let Some(f) = &r.finished_at {
        s.push_str(&format!("  finished: {f}\n"));
    }
    if let Some(e) = &r.error {
        s.push_str(&format!("  error: {e}\n"));
    }
    for (k, v) in &run.params {
        s.push_str(&format!(
            "  param {k} = {}\n",
            v.as_str().map_or_else(|| v.to_string(), str::to_string)
        ));
    }
    for (k, v) in &run.vars {
        s.push_str(&format!("  var {k} = {v}\n"));
    }
    let mut section = "";
    for st in &run.steps {
        if st.section != section {
            section = if st.section == "main" {
                "main"
            } else {
                "rollback"
            };
            s.push_str(&format!(
                "{}:\n",
                if section == "main" {
                    "steps"
                } else {
                    "rollback"
                }
            ));
        }
        let dur = st
            .duration
            .map_or_else(String::new, |d| format!(" {d:.2}s"));
        let attempts = if st.attempts > 1 {
            format!(" ({} attempts)", st.attempts)
        } else {
            String::new()
        };
        s.push_str(&format!(
            "  {:<9} {} ({}){dur}{attempts}\n",
            st.status, st.key, st.action
        ));
        match &st.error {
            // A step with `expect_failure` that did fail as expected.
            Some(e) if st.status == "succeeded" => {
                s.push_str(&format!("            failed as expected: {e}\n"));
            }
            Some(e) => s.push_str(&format!("            {e}\n")),
            None => {}
        }
        if !st.outputs.is_empty() {
            let outputs = serde_json::to_string(&st.outputs).unwrap_or_default();
            s.push_str(&format!("            outputs: {outputs}\n"));
        }
    }
    s
}
