//! The commands. Each returns an [`Exit`]; errors are printed here, at the edge.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use crate::catalog::Catalog;
use crate::cli::{Cli, Command, Inputs};
use crate::events::{Event, EventSink, RunHeader, RunStatus};
use crate::executor::{Executor, Stop};
use crate::exit::Exit;
use crate::frame::{Frame, Inherited, StepState};
use crate::journal::{Journal, JournalSink, RunRecord};
use crate::load::{LoadError, Loader, Runbook, StepKind};
use crate::params::{ParamError, ParamInputs};
use crate::plan::Planner;
use crate::render::{Format, Reporter, plan_text, runs_text, show_text};
use crate::template::Templates;

/// A command's failure, with the exit code it maps to.
#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Refused(String),
    /// `run` refused: the plan says this step (its key) would fail.
    #[error("{message}")]
    PlanRefused { step: String, message: String },
    #[error("{0}")]
    Internal(String),
    #[error(transparent)]
    Fleet(Box<crate::fleet::FleetError>),
}

impl AppError {
    fn exit(&self) -> Exit {
        match self {
            AppError::Load(LoadError::Io { .. }) | AppError::Internal(_) => Exit::Internal,
            AppError::Load(_) | AppError::Invalid(_) => Exit::Invalid,
            AppError::Refused(_) | AppError::PlanRefused { .. } => Exit::Refused,
            AppError::Fleet(e) => e.exit(),
        }
    }
}

impl From<ParamError> for AppError {
    fn from(e: ParamError) -> Self {
        AppError::Invalid(e.to_string())
    }
}

impl From<crate::journal::JournalError> for AppError {
    fn from(e: crate::journal::JournalError) -> Self {
        match e {
            crate::journal::JournalError::NoSuchRun(_) => AppError::Invalid(e.to_string()),
            other => AppError::Internal(other.to_string()),
        }
    }
}

impl From<crate::frame::FrameError> for AppError {
    fn from(e: crate::frame::FrameError) -> Self {
        AppError::Invalid(e.to_string())
    }
}

impl From<crate::executor::ExecError> for AppError {
    fn from(e: crate::executor::ExecError) -> Self {
        AppError::Internal(e.to_string())
    }
}

/// What kind of execution `App::execute` starts.
struct Execution<'r> {
    /// The journal of the run being resumed.
    prior: Option<&'r RunRecord>,
    retry_steps: BTreeSet<String>,
    no_rollback: bool,
    /// Only the rollback section (`runbook rollback`).
    rollback_only: bool,
    /// `--yes`.
    assume_yes: bool,
}

struct App<'a> {
    cli: &'a Cli,
    catalog: Catalog,
    templates: Templates,
    state_dir: PathBuf,
}

pub fn dispatch(cli: &Cli) -> Exit {
    let app = App {
        cli,
        catalog: Catalog {
            search_path: cli.path.clone(),
        },
        templates: Templates::new(),
        // Absolute: resume and rollback change to the run's directory.
        state_dir: crate::params::absolute(
            &cli.state_dir.clone().unwrap_or_else(default_state_dir),
        ),
    };
    let result = match &cli.command {
        Command::List => app.list(),
        Command::Completions { shell } => printed(crate::cli::write_completions(
            *shell,
            &mut std::io::stdout(),
        )),
        Command::Man => printed(crate::cli::write_man(&mut std::io::stdout())),
        Command::Validate { targets } => app.validate(targets),
        Command::Plan { name, inputs } => app.plan(name, inputs),
        Command::Run {
            name,
            inputs,
            dry_run: true,
            ..
        } => app.plan(name, inputs),
        _ if cli.probe && !matches!(cli.command, Command::Plan { .. }) => Err(AppError::Invalid(
            "--probe applies only to `runbook plan` and `runbook run --dry-run`".into(),
        )),
        Command::Run {
            name,
            inputs,
            no_rollback,
            run_id,
            ..
        } => app.run(name, inputs, *no_rollback, run_id.as_deref()),
        Command::Fleet { command } => crate::fleet::dispatch(cli, command, &app.state_dir)
            .map_err(|e| AppError::Fleet(Box::new(e))),
        Command::Resume {
            run_id,
            inputs,
            retry_step,
            accept_changes,
            no_rollback,
        } => app.resume(run_id, inputs, retry_step, *accept_changes, *no_rollback),
        Command::Rollback {
            run_id,
            inputs,
            accept_changes,
            again,
        } => app.rollback(run_id, inputs, *accept_changes, *again),
        Command::Runs {
            status,
            since,
            runbook,
        } => app.runs(*status, *since, runbook.as_deref()),
        Command::Show { run_id } => app.show(run_id),
        Command::Drill { keep, dir, inputs } => app.drill(*keep, dir.clone(), inputs),
        Command::Schema => {
            print!("{}", crate::schema::runbook_schema_text());
            Ok(Exit::Success)
        }
    };
    match result {
        Ok(exit) => exit,
        Err(e) => {
            app.report_error(&e);
            e.exit()
        }
    }
}

/// A command that only prints: its write error (a closed pipe ends it quietly before
/// this, see `cli::run`) is the engine's own.
fn printed(written: std::io::Result<()>) -> Result<Exit, AppError> {
    written
        .map(|()| Exit::Success)
        .map_err(|e| AppError::Internal(format!("cannot write to stdout: {e}")))
}

fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("runbook");
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/state/runbook"),
        None => PathBuf::from(".runbook-state"),
    }
}

pub(crate) fn new_run_id() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 3];
    let random = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if random.is_err() {
        let nanos = chrono::Utc::now().timestamp_subsec_nanos() ^ std::process::id();
        bytes.copy_from_slice(&nanos.to_le_bytes()[..3]);
    }
    format!(
        "{}-{}",
        chrono::Utc::now().format("%Y%m%dT%H%M%SZ"),
        crate::actions::files::hex(&bytes)
    )
}

impl App<'_> {
    fn json(&self) -> bool {
        self.cli.format == Format::Json
    }

    fn report_error(&self, e: &AppError) {
        if self.json() {
            let body = match e {
                AppError::Load(LoadError::Invalid(diags)) => {
                    serde_json::json!({"error": "invalid runbook", "diagnostics": diags})
                }
                // The step, too: the fleet controller names it for the host.
                AppError::PlanRefused { step, message } => {
                    serde_json::json!({"error": message, "step": step})
                }
                other => serde_json::json!({"error": other.to_string()}),
            };
            println!("{body}");
        } else {
            match e {
                AppError::Load(LoadError::Invalid(_)) => eprintln!("{e}"),
                other => eprintln!("error: {other}"),
            }
        }
    }

    fn load(&self, name: &str) -> Result<Arc<Runbook>, AppError> {
        Ok(Loader::new(&self.catalog, &self.templates).load(name)?)
    }

    fn inputs(&self, inputs: &Inputs) -> Result<ParamInputs, AppError> {
        let mut out = ParamInputs::default();
        for file in &inputs.vars {
            out.add_file(file)?;
        }
        for pair in &inputs.set {
            out.add_set(pair)?;
        }
        Ok(out)
    }

    fn list(&self) -> Result<Exit, AppError> {
        let found = self.catalog.list();
        let rows: Vec<serde_json::Value> = found
            .iter()
            .map(|l| {
                let description = std::fs::read_to_string(&l.path)
                    .ok()
                    .and_then(|t| serde_yaml::from_str::<serde_yaml::Value>(&t).ok())
                    .and_then(|v| {
                        v.get("description")
                            .and_then(|d| d.as_str())
                            .map(str::to_string)
                    });
                serde_json::json!({"name": l.name, "path": l.path, "description": description})
            })
            .collect();
        if self.json() {
            println!("{}", serde_json::Value::Array(rows));
        } else if rows.is_empty() {
            let dirs: Vec<String> = self
                .catalog
                .search_path
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            println!("no runbooks in {}", dirs.join(", "));
        } else {
            let width = found.iter().map(|l| l.name.len()).max().unwrap_or(0);
            for row in rows {
                println!(
                    "{:<width$}  {}",
                    row["name"].as_str().unwrap_or_default(),
                    row["description"].as_str().unwrap_or_default()
                );
            }
        }
        Ok(Exit::Success)
    }

    fn validate(&self, targets: &[String]) -> Result<Exit, AppError> {
        let targets: Vec<String> = if targets.is_empty() {
            self.catalog.list().into_iter().map(|l| l.name).collect()
        } else {
            targets.to_vec()
        };
        let mut results = Vec::new();
        let mut failed = false;
        for target in &targets {
            match self.load(target) {
                Ok(rb) => {
                    if !self.json() {
                        println!("ok  {} ({})", rb.name, rb.source.path.display());
                    }
                    results.push(serde_json::json!({"target": target, "ok": true}));
                }
                Err(AppError::Load(LoadError::Invalid(diags))) => {
                    failed = true;
                    if !self.json() {
                        for d in &diags {
                            eprintln!("{d}\n");
                        }
                    }
                    results.push(
                        serde_json::json!({"target": target, "ok": false, "diagnostics": diags}),
                    );
                }
                Err(e) => {
                    failed = true;
                    if !self.json() {
                        eprintln!("error: {e}");
                    }
                    results.push(
                        serde_json::json!({"target": target, "ok": false, "error": e.to_string()}),
                    );
                }
            }
        }
        if self.json() {
            println!("{}", serde_json::Value::Array(results));
        }
        if targets.is_empty() && !self.json() {
            println!("no runbooks to validate");
        }
        Ok(if failed { Exit::Invalid } else { Exit::Success })
    }

    /// Loads, resolves params, freezes vars and plans. Nothing is written.
    fn prepare(
        &self,
        name: &str,
        inputs: &Inputs,
        probe: bool,
    ) -> Result<(crate::plan::Plan, Frame, ParamInputs), AppError> {
        let rb = self.load(name)?;
        self.check_digest(&rb)?;
        let assume_yes = inputs.yes;
        let inputs = self.inputs(inputs)?;
        let inherited = Inherited::for_run(&rb, &inputs);
        let frame = Frame::new(rb.clone(), &inputs, None, &self.templates, inherited)?;
        let planner = Planner {
            assume_yes,
            templates: &self.templates,
            inputs: &inputs,
            state_dir: self.state_dir.clone(),
            probe,
        };
        let plan = planner.plan(rb, frame.clone());
        Ok((plan, frame, inputs))
    }

    /// `--expect-digest`: the runbook's files are the ones the fleet controller sent.
    fn check_digest(&self, rb: &Runbook) -> Result<(), AppError> {
        let Some(expected) = &self.cli.expect_digest else {
            return Ok(());
        };
        let found = crate::fleet::bundle::digest_of(rb, &self.catalog.search_path);
        if &found != expected {
            return Err(AppError::Refused(format!(
                "the runbook files here have digest {found}, not {expected} as the fleet controller expects: they were changed on this host"
            )));
        }
        Ok(())
    }

    fn plan(&self, name: &str, inputs: &Inputs) -> Result<Exit, AppError> {
        let (plan, _, _) = self.prepare(name, inputs, self.cli.probe)?;
        if self.json() {
            let mut value = serde_json::to_value(&plan).unwrap_or_default();
            value["summary"] = serde_json::to_value(plan.tally()).unwrap_or_default();
            value["lock_holder"] =
                serde_json::to_value(crate::lock::holder(&self.state_dir, &plan.lock))
                    .unwrap_or_default();
            println!(
                "{}",
                serde_json::to_string_pretty(&value).unwrap_or_default()
            );
        } else {
            print!("{}", plan_text(&plan));
            if let Some(holder) = crate::lock::holder(&self.state_dir, &plan.lock) {
                println!(
                    "note: lock `{}` is held now by {holder}; a run would be refused until it ends",
                    plan.lock
                );
            }
        }
        Ok(if plan.ok {
            Exit::Success
        } else {
            Exit::Refused
        })
    }

    fn locks(rb: &Runbook) -> BTreeSet<String> {
        fn walk(rb: &Runbook, out: &mut BTreeSet<String>) {
            out.insert(rb.lock.clone());
            for step in rb.steps.iter().chain(&rb.rollback) {
                if let StepKind::Call(child) = &step.kind {
                    walk(child, out);
                }
            }
        }
        let mut out = BTreeSet::new();
        walk(rb, &mut out);
        out
    }

    fn acquire(&self, rb: &Runbook, run_id: &str) -> Result<Vec<crate::lock::HeldLock>, AppError> {
        crate::journal::check_state_dir(&self.state_dir)?;
        Self::locks(rb)
            .iter()
            .map(|name| {
                crate::lock::acquire(&self.state_dir, name, run_id).map_err(|e| match e {
                    crate::lock::LockError::Held { .. } => AppError::Refused(e.to_string()),
                    // Not a held lock: the state dir cannot hold one (exit 4).
                    other => AppError::Internal(other.to_string()),
                })
            })
            .collect()
    }

    fn reporter(&self, run_id: &str) -> Reporter {
        Reporter {
            format: self.cli.format,
            verbose: self.cli.verbose,
            quiet: self.cli.quiet,
            run_id: run_id.to_string(),
        }
    }

    fn run(
        &self,
        name: &str,
        inputs: &Inputs,
        no_rollback: bool,
        run_id: Option<&str>,
    ) -> Result<Exit, AppError> {
        let outcome = self.run_observed(name, inputs, no_rollback, None, run_id)?;
        Ok(exit_for(outcome.status, outcome.stop.as_ref()))
    }

    /// `run`, with `observer` (when given) consuming the run's events instead of the
    /// reporter (and the refused plan left unprinted: the observer reports it).
    fn run_observed(
        &self,
        name: &str,
        inputs: &Inputs,
        no_rollback: bool,
        observer: Option<&mut dyn EventSink>,
        given_run_id: Option<&str>,
    ) -> Result<crate::executor::Outcome, AppError> {
        let assume_yes = inputs.yes;
        let (plan, mut frame, inputs) = self.prepare(name, inputs, false)?;
        if let Some((step, why)) = plan.first_failure() {
            // `-q` asks for the result only: the refusal says which step and why; an
            // observer (the drill) reports the refusal itself.
            if !self.json() && !self.cli.quiet && observer.is_none() {
                print!("{}", plan_text(&plan));
            }
            return Err(AppError::PlanRefused {
                message: format!(
                    "refusing to run `{}`: step `{step}` would fail: {why}\nnothing was changed; fix the cause and run again (`runbook plan` shows the whole plan)",
                    plan.runbook
                ),
                step,
            });
        }
        let rb = frame.runbook.clone();
        let run_id = given_run_id.map_or_else(new_run_id, str::to_string);
        let _locks = self.acquire(&rb, &run_id)?;
        let journal = Journal::open(&self.state_dir)?;
        if given_run_id.is_some() && journal.run(&run_id).is_ok() {
            return Err(AppError::Refused(format!(
                "run {run_id} is in the journal already; `runbook resume {run_id}` continues it"
            )));
        }
        tracing::debug!(journal = %self.state_dir.display(), run_id, "run starting");
        let header = RunHeader {
            run_id: run_id.clone(),
            runbook: rb.name.clone(),
            path: rb.source.path.clone(),
            content_hash: rb.content_hash(),
            params: frame.shown_params(),
            vars: frame.frozen_vars(),
            lock: rb.lock.clone(),
            started_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            pid: std::process::id(),
            files: rb.files(),
            inputs: recorded_inputs(&rb, &frame, &inputs),
            cwd: std::env::current_dir().map_err(|e| {
                AppError::Internal(format!("cannot read the current directory: {e}"))
            })?,
            secrets: given_secrets(&rb, &frame, &inputs),
            steps: rb
                .steps
                .iter()
                .map(|s| (s.id.clone(), s.kind.action_name()))
                .collect(),
        };
        self.execute_observed(
            &journal,
            run_id.as_ref(),
            &inputs,
            &mut frame,
            Execution {
                prior: None,
                retry_steps: BTreeSet::new(),
                no_rollback,
                rollback_only: false,
                assume_yes,
            },
            Event::RunStarted(Box::new(header)),
            observer,
        )
    }

    /// The runbook of an earlier run, refusing when its files changed (unless accepted).
    fn reload(&self, record: &RunRecord, accept_changes: bool) -> Result<Arc<Runbook>, AppError> {
        let rb = self.load(&record.path.to_string_lossy())?;
        let now = rb.files();
        if now != record.files {
            let report = crate::load::files_diff(&record.files, &now, "run start");
            if !accept_changes {
                return Err(AppError::Refused(format!(
                    "the runbook changed since run {} started:\n{report}resume with --accept-changes to run the changed runbook with the run's frozen values",
                    record.summary.id
                )));
            }
            if !self.json() {
                eprintln!("note: the runbook changed since the run started (accepted):\n{report}");
            }
        }
        Ok(rb)
    }

    /// The operator's inputs for a resume or rollback, read where the command was
    /// typed; then the process moves to the run's directory (see [`App::enter_run_dir`]).
    fn given_inputs(&self, record: &RunRecord, inputs: &Inputs) -> Result<ParamInputs, AppError> {
        let given = self.inputs(inputs)?;
        self.enter_run_dir(record)?;
        Ok(given)
    }

    /// Resume and rollback work in the directory the run was started in, so that a
    /// relative path (a literal in a step's arguments, the default `runbooks` search
    /// path) means what it meant in the run's first part.
    fn enter_run_dir(&self, record: &RunRecord) -> Result<(), AppError> {
        let Some(dir) = &record.cwd else {
            return Ok(());
        };
        if std::env::current_dir().ok().as_ref() == Some(dir) {
            return Ok(());
        }
        std::env::set_current_dir(dir).map_err(|e| {
            AppError::Refused(format!(
                "run {} was started in {}, and resume and rollback work there: cannot enter it: {e}",
                record.summary.id,
                dir.display()
            ))
        })?;
        if !self.json() && !self.cli.quiet {
            eprintln!(
                "note: working in {}, where run {} was started",
                dir.display(),
                record.summary.id
            );
        }
        Ok(())
    }

    /// The run's frame rebuilt from the journal: recorded params, frozen vars as they
    /// were, and every secret the run was given asked for again (the journal keeps
    /// their names only), before anything runs.
    fn restore_frame(
        &self,
        record: &RunRecord,
        rb: &Arc<Runbook>,
        given: ParamInputs,
    ) -> Result<(Frame, ParamInputs), AppError> {
        // The secrets to give again: those the run recorded as given; for a run
        // recorded before the journal kept them, every secret param of the runbook
        // that had a value (required, or with a default).
        let needed: Vec<String> = match &record.secrets {
            Some(names) => names.clone(),
            None => rb
                .params
                .iter()
                .filter(|p| p.secret && (p.required || p.default.is_some()))
                .map(|p| p.name.clone())
                .collect(),
        };
        let missing: Vec<String> = needed
            .iter()
            .filter(|n| !given.sets.contains_key(*n) && !given.files.contains_key(*n))
            .map(|n| {
                format!(
                    "secret param `{n}` is not stored in the journal: give it again with --set {n}=... or --vars FILE"
                )
            })
            .collect();
        if !missing.is_empty() {
            return Err(AppError::Invalid(format!(
                "{}
(run {} was given {}; nothing was run)",
                missing.join("\n"),
                record.summary.id,
                if needed.len() == 1 {
                    "this secret".to_string()
                } else {
                    format!("these {} secrets", needed.len())
                }
            )));
        }
        // The run's own --vars values first (called runbooks read their params from
        // them), then this command's --vars, then the run's frozen params.
        let mut files = record.inputs.clone();
        files.extend(given.files.clone());
        let mut inputs = ParamInputs {
            files,
            sets: Default::default(),
        };
        for (name, value) in &given.sets {
            let declared_secret = rb.params.iter().any(|p| &p.name == name && p.secret);
            if declared_secret || needed.contains(name) {
                inputs
                    .files
                    .insert(name.clone(), serde_json::Value::String(value.clone()));
            }
        }
        for spec in &rb.params {
            if spec.secret || needed.contains(&spec.name) {
                continue;
            }
            if let Some(v) = record.params.get(&spec.name).filter(|v| !v.is_null()) {
                inputs.files.insert(spec.name.clone(), v.clone());
            }
        }
        let inherited = Inherited::for_run(rb, &inputs);
        let frame = Frame::new(
            rb.clone(),
            &inputs,
            Some(&record.vars),
            &self.templates,
            inherited,
        )?;
        Ok((frame, inputs))
    }

    fn resume(
        &self,
        run_id: &str,
        inputs: &Inputs,
        retry: &[String],
        accept_changes: bool,
        no_rollback: bool,
    ) -> Result<Exit, AppError> {
        let assume_yes = inputs.yes;
        let journal = Journal::open(&self.state_dir)?;
        let record = journal.run(run_id)?;
        match RunStatus::parse(&record.summary.status) {
            Some(RunStatus::Running) => {
                return Err(AppError::Refused(format!(
                    "run {run_id} is still running (pid {})",
                    record.pid
                )));
            }
            Some(RunStatus::Succeeded) => {
                println!("run {run_id} already succeeded; nothing to resume");
                return Ok(Exit::Success);
            }
            Some(RunStatus::RolledBack) => {
                return Err(AppError::Refused(format!(
                    "run {run_id} was rolled back; start a new run instead"
                )));
            }
            _ => {}
        }
        let given = self.given_inputs(&record, inputs)?;
        let rb = self.reload(&record, accept_changes)?;
        let (mut frame, inputs) = self.restore_frame(&record, &rb, given)?;
        let _locks = self.acquire(&rb, run_id)?;
        let start = Event::RunResumed {
            run_id: run_id.to_string(),
            runbook: rb.name.clone(),
            purpose: "resume",
        };
        let outcome = self.execute(
            &journal,
            run_id.as_ref(),
            &inputs,
            &mut frame,
            Execution {
                prior: Some(&record),
                retry_steps: retry.iter().cloned().collect(),
                no_rollback,
                rollback_only: false,
                assume_yes,
            },
            start,
        )?;
        Ok(exit_for(outcome.status, outcome.stop.as_ref()))
    }

    fn rollback(
        &self,
        run_id: &str,
        inputs: &Inputs,
        accept_changes: bool,
        again: bool,
    ) -> Result<Exit, AppError> {
        let assume_yes = inputs.yes;
        let journal = Journal::open(&self.state_dir)?;
        let record = journal.run(run_id)?;
        match RunStatus::parse(&record.summary.status) {
            Some(RunStatus::Running) => {
                return Err(AppError::Refused(format!(
                    "run {run_id} is still running (pid {})",
                    record.pid
                )));
            }
            Some(RunStatus::RolledBack) if !again => {
                return Err(AppError::Refused(format!(
                    "run {run_id} was already rolled back at {}; nothing was run. To run its rollback section again anyway: runbook rollback {run_id} --again",
                    record
                        .summary
                        .finished_at
                        .as_deref()
                        .unwrap_or("an unknown time")
                )));
            }
            _ => {}
        }
        let given = self.given_inputs(&record, inputs)?;
        let rb = self.reload(&record, accept_changes)?;
        if rb.rollback.is_empty() {
            return Err(AppError::Invalid(format!(
                "runbook `{}` has no rollback section",
                rb.name
            )));
        }
        let (mut frame, inputs) = self.restore_frame(&record, &rb, given)?;
        for step in record
            .steps
            .iter()
            .filter(|s| s.section == "main" && !s.key.contains('/'))
        {
            if step.status == "succeeded" {
                frame.steps.insert(
                    step.key.clone(),
                    StepState::done("succeeded", step.outputs.clone()),
                );
            }
        }
        let _locks = self.acquire(&rb, run_id)?;
        let start = Event::RunResumed {
            run_id: run_id.to_string(),
            runbook: rb.name.clone(),
            purpose: "rollback",
        };
        let outcome = self.execute(
            &journal,
            run_id.as_ref(),
            &inputs,
            &mut frame,
            Execution {
                prior: None,
                retry_steps: BTreeSet::new(),
                no_rollback: false,
                rollback_only: true,
                assume_yes,
            },
            start,
        )?;
        Ok(match outcome.status {
            RunStatus::RolledBack => Exit::Success,
            status => exit_for(status, outcome.stop.as_ref()),
        })
    }

    /// Runs (or resumes, or rolls back) with the journal and the reporter as the
    /// executor's event consumers.
    fn execute(
        &self,
        journal: &Journal,
        run_id: &str,
        inputs: &ParamInputs,
        frame: &mut Frame,
        how: Execution<'_>,
        start: Event,
    ) -> Result<crate::executor::Outcome, AppError> {
        self.execute_observed(journal, run_id, inputs, frame, how, start, None)
    }

    /// As [`App::execute`]; `observer`, when given, takes the reporter's place.
    #[allow(clippy::too_many_arguments)]
    fn execute_observed(
        &self,
        journal: &Journal,
        run_id: &str,
        inputs: &ParamInputs,
        frame: &mut Frame,
        how: Execution<'_>,
        start: Event,
        observer: Option<&mut dyn EventSink>,
    ) -> Result<crate::executor::Outcome, AppError> {
        let mut sink = JournalSink {
            journal,
            run_id: run_id.to_string(),
        };
        let mut reporter = self.reporter(run_id);
        let observed = observer.is_some();
        let consumer: &mut dyn EventSink = match observer {
            Some(o) => o,
            None => &mut reporter,
        };
        let mut executor = Executor {
            templates: &self.templates,
            inputs,
            state_dir: self.state_dir.clone(),
            sinks: vec![&mut sink, consumer],
            prior: how.prior,
            retry_steps: how.retry_steps,
            no_rollback: how.no_rollback,
            run_id: run_id.to_string(),
            progress: !self.json() && !self.cli.quiet && !observed,
            assume_yes: how.assume_yes,
        };
        Ok(if how.rollback_only {
            executor.rollback(run_id, frame, start)?
        } else {
            executor.run(run_id, frame, start)?
        })
    }

    /// The AtoCore drill: builds a sandbox, then runs the bundled cycle runbook on it
    /// (through `run`, journaled in the sandbox's state dir), reporting each stage.
    fn drill(&self, keep: bool, dir: Option<PathBuf>, given: &Inputs) -> Result<Exit, AppError> {
        use crate::drill::{CYCLE, StageReport, default_dir, junit, testkit_path, text_summary};
        let cwd = std::env::current_dir().unwrap_or_default();
        let absolute = |p: &std::path::Path| crate::world::normalize(&cwd.join(p));
        let dir = absolute(&dir.unwrap_or_else(default_dir));
        let text = self.cli.format == Format::Text;
        let testkit = testkit_path();
        if !testkit.is_file() {
            return Err(AppError::Refused(
                crate::drill::DrillError::NoTestkit(testkit).to_string(),
            ));
        }
        if text {
            println!("drill: sandbox in {}", dir.display());
        }
        // The sandbox's own engine: its journal and locks live in it, and the search
        // path is absolute so that `runbook resume` works from anywhere.
        let sandboxed = App {
            cli: self.cli,
            catalog: Catalog {
                search_path: self.cli.path.iter().map(|p| absolute(p)).collect(),
            },
            templates: Templates::new(),
            state_dir: dir.join("state"),
        };
        let cycle = sandboxed.load(CYCLE)?;
        let mut report = StageReport::new(&dir, text);
        report.expect_cycle(&cycle);
        if report.build_sandbox(&testkit) {
            let port = crate::drill::free_port().map_err(|e| AppError::Refused(e.to_string()))?;
            let mut vars = vec![dir.join("sandbox.yaml")];
            vars.extend(given.vars.iter().map(|v| absolute(v)));
            let mut set = vec![
                format!("testkit={}", testkit.display()),
                format!("drill_dir={}", dir.join("drill").display()),
                format!("scratch_addr=127.0.0.1:{port}"),
            ];
            // The disaster stages: an off-site host, then a new host with its own
            // engine (this program), journal and port, from the same runbooks.
            match crate::drill::offsite_unavailable() {
                Some(why) => report.skip_offsite(&why),
                None => {
                    let new_port =
                        crate::drill::free_port().map_err(|e| AppError::Refused(e.to_string()))?;
                    let engine = std::env::current_exe().map_err(|e| {
                        AppError::Refused(format!("cannot find this program's path: {e}"))
                    })?;
                    let runbooks = sandboxed
                        .catalog
                        .search_path
                        .iter()
                        .find(|d| d.join(format!("{CYCLE}.yaml")).is_file())
                        .cloned()
                        .unwrap_or_default();
                    set.extend([
                        "offsite=true".to_string(),
                        format!("offsite_work={}", dir.join("offsite").display()),
                        format!("new_host_dir={}", dir.join("new-host").display()),
                        format!("new_host_port={new_port}"),
                        format!("engine={}", engine.display()),
                        format!("runbooks_dir={}", runbooks.display()),
                    ]);
                }
            }
            set.extend(given.set.iter().cloned());
            let inputs = Inputs {
                vars,
                set,
                yes: true,
            };
            match sandboxed.run_observed(CYCLE, &inputs, false, Some(&mut report), None) {
                Ok(_) => {}
                Err(AppError::PlanRefused { step, message }) => {
                    let why = message.lines().next().unwrap_or_default();
                    report.refused(&step, why);
                }
                Err(e) => return Err(e),
            }
        }
        let report = report.finish();
        match self.cli.format {
            Format::Text => print!("{}", text_summary(&report)),
            Format::Json => println!(
                "{}",
                serde_json::to_string_pretty(&report).unwrap_or_default()
            ),
            Format::Junit => print!("{}", junit(&report)),
        }
        if keep {
            if text {
                println!(
                    "sandbox kept: {} (journal: RUNBOOK_STATE_DIR={}/state runbook runs)",
                    dir.display(),
                    dir.display()
                );
            }
        } else {
            let _ = std::fs::remove_dir_all(&dir);
        }
        Ok(if report.ok {
            Exit::Success
        } else {
            Exit::StepFailed
        })
    }

    fn journal_if_any(&self) -> Result<Option<Journal>, AppError> {
        // A state dir that is a file, or unwritable, is not an empty journal.
        crate::journal::check_state_dir(&self.state_dir)?;
        if self.state_dir.join("journal.db").exists() {
            Ok(Some(Journal::open(&self.state_dir)?))
        } else {
            Ok(None)
        }
    }

    fn runs(
        &self,
        status: Option<crate::cli::RunStatusArg>,
        since: Option<chrono::Duration>,
        runbook: Option<&str>,
    ) -> Result<Exit, AppError> {
        let mut runs = match self.journal_if_any()? {
            Some(j) => j.runs()?,
            None => Vec::new(),
        };
        let cutoff = since.map(|d| chrono::Utc::now() - d);
        runs.retain(|r| {
            status.is_none_or(|s| r.status == s.as_str())
                && runbook.is_none_or(|name| r.runbook == name)
                && cutoff.is_none_or(|c| {
                    chrono::DateTime::parse_from_rfc3339(&r.started_at).is_ok_and(|t| t >= c)
                })
        });
        if self.json() {
            println!(
                "{}",
                serde_json::to_string_pretty(&runs).unwrap_or_default()
            );
        } else {
            print!("{}", runs_text(&runs));
        }
        Ok(Exit::Success)
    }

    fn show(&self, run_id: &str) -> Result<Exit, AppError> {
        let journal = self.journal_if_any()?.ok_or_else(|| {
            AppError::Invalid(format!(
                "no run `{run_id}`: the journal in {} is empty",
                self.state_dir.display()
            ))
        })?;
        let record = journal.run(run_id)?;
        if self.json() {
            println!(
                "{}",
                serde_json::to_string_pretty(&record).unwrap_or_default()
            );
        } else {
            print!("{}", show_text(&record));
        }
        Ok(Exit::Success)
    }
}

fn exit_for(status: RunStatus, stop: Option<&Stop>) -> Exit {
    match (status, stop) {
        (RunStatus::Succeeded, _) => Exit::Success,
        (_, Some(Stop::NeedsOperator { .. })) => Exit::Refused,
        _ => Exit::StepFailed,
    }
}

/// The `--vars` values a resume or rollback must give the run's runbooks again: those
/// any of them declares as a param, except secrets (never stored): a value declared
/// secret anywhere in the call tree, or holding a secret value.
fn recorded_inputs(
    rb: &Runbook,
    frame: &Frame,
    inputs: &ParamInputs,
) -> indexmap::IndexMap<String, serde_json::Value> {
    let params = rb.call_tree_params();
    inputs
        .files
        .iter()
        .filter(|(k, v)| params.get(*k) == Some(&false) && !frame.redactor.finds_in_json(v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The names of the secrets the run was given (`--set`, `--vars`) for any runbook of
/// its call tree: declared secret, or holding a secret value. Resume asks for each.
fn given_secrets(rb: &Runbook, frame: &Frame, inputs: &ParamInputs) -> Vec<String> {
    let params = rb.call_tree_params();
    let mut names: Vec<String> = frame
        .secret_params()
        .filter(|n| inputs.sets.contains_key(*n) || inputs.files.contains_key(*n))
        .map(str::to_string)
        .collect();
    for (k, v) in &inputs.files {
        let secret = match params.get(k) {
            Some(declared) => *declared || frame.redactor.finds_in_json(v),
            None => false,
        };
        if secret && !names.contains(k) {
            names.push(k.clone());
        }
    }
    names
}
