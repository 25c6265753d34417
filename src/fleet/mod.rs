//! `runbook fleet`: one runbook on many hosts over SSH. Each host runs the same
//! engine (installed by digest) on the same runbook files (by digest), with its
//! journal on that host; the controller schedules hosts (`scheduler`), records which
//! run on which host belongs to the fleet run (`record`), and shows the hosts'
//! progress (`output`). `fleet resume` asks each unfinished host's journal how far
//! it got and continues there.

pub mod bundle;
pub mod cli;
pub mod host;
pub mod inventory;
pub mod output;
pub mod plan;
pub mod record;
pub mod scheduler;

use std::path::Path;
use std::sync::Mutex;

use indexmap::IndexMap;
use serde_json::Value as Json;

use crate::catalog::Catalog;
use crate::cli::{Cli, Inputs};
use crate::exit::Exit;
use crate::render::Format;
use bundle::Bundle;
use cli::{FleetCommand, Target, Window};
use host::{Engine, HostRun, Job, Outcome, Report, Shipment};
use inventory::{Host, Inventory};
use record::{FleetRun, HostState, HostStatus, Line, Writer};
use scheduler::{FailLimit, Scheduler};

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The inventory, a vars file, `--limit`, the runbook: nothing was started.
    #[error("{0}")]
    Invalid(String),
    /// Refused before anything ran on any host.
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Internal(String),
}

impl FleetError {
    pub fn exit(&self) -> Exit {
        match self {
            FleetError::Invalid(_) => Exit::Invalid,
            FleetError::Refused(_) => Exit::Refused,
            FleetError::Internal(_) => Exit::Internal,
        }
    }
}

pub fn dispatch(cli: &Cli, command: &FleetCommand, state_dir: &Path) -> Result<Exit, FleetError> {
    let ctx = Ctx { cli, state_dir };
    match command {
        FleetCommand::Plan { target } => plan::plan(&ctx, target),
        FleetCommand::Run { target, window } => ctx.run(target, window),
        FleetCommand::Install { target } => ctx.install(target),
        FleetCommand::Runs => ctx.runs(),
        FleetCommand::Show { fleet_run_id } => ctx.show(fleet_run_id),
        FleetCommand::Resume {
            fleet_run_id,
            inputs,
            engine,
            parallel,
            max_fail,
        } => ctx.resume(
            fleet_run_id,
            inputs,
            engine.as_deref(),
            *parallel,
            *max_fail,
        ),
        FleetCommand::Schema => {
            print!("{}", inventory::schema_text());
            Ok(Exit::Success)
        }
    }
}

pub struct Ctx<'a> {
    pub cli: &'a Cli,
    pub state_dir: &'a Path,
}

/// The runbook to send, with what its params say about secrets.
pub struct Loaded {
    pub bundle: Bundle,
    /// Every param of the runbook and the runbooks it calls: name -> secret.
    pub params: std::collections::BTreeMap<String, bool>,
}

/// The values given on the controller: `--vars` files, then `--set`.
pub struct Given {
    files: IndexMap<String, Json>,
    sets: IndexMap<String, Json>,
}

impl Ctx<'_> {
    pub fn load(&self, name: &str) -> Result<Loaded, FleetError> {
        let catalog = Catalog {
            search_path: self.cli.path.clone(),
        };
        let templates = crate::template::Templates::new();
        let rb = crate::load::Loader::new(&catalog, &templates)
            .load(name)
            .map_err(|e| FleetError::Invalid(e.to_string()))?;
        Ok(Loaded {
            bundle: Bundle::of(&rb, &catalog.search_path)?,
            params: rb.call_tree_params(),
        })
    }

    pub fn given(&self, inputs: &Inputs, loaded: &Loaded) -> Result<Given, FleetError> {
        let mut p = crate::params::ParamInputs::default();
        for f in &inputs.vars {
            p.add_file(f)
                .map_err(|e| FleetError::Invalid(e.to_string()))?;
        }
        for s in &inputs.set {
            p.add_set(s)
                .map_err(|e| FleetError::Invalid(e.to_string()))?;
        }
        // Values reach the hosts as a vars file, where unknown keys are ignored; a
        // `--set` of a name no runbook declares is a typo, refused here as `run` does.
        for k in p.sets.keys() {
            if !loaded.params.contains_key(k) {
                let hint =
                    crate::diagnostic::did_you_mean(k, loaded.params.keys().map(String::as_str))
                        .map(|h| format!("; {h}"))
                        .unwrap_or_default();
                return Err(FleetError::Invalid(format!(
                    "--set {k}: `{}` declares no param `{k}`{hint}",
                    loaded.bundle.name
                )));
            }
        }
        Ok(Given {
            files: p.files,
            sets: p
                .sets
                .into_iter()
                .map(|(k, v)| (k, Json::String(v)))
                .collect(),
        })
    }

    fn format(&self) -> Format {
        self.cli.format
    }

    fn hosts(&self, target: &Target) -> Result<Vec<Host>, FleetError> {
        let inv = Inventory::load(&target.hosts)?;
        let hosts = inv.select(&target.limit)?;
        if hosts.is_empty() {
            return Err(FleetError::Invalid("--limit selects no host".into()));
        }
        Ok(hosts)
    }

    fn lock(&self, id: &str) -> Result<crate::lock::HeldLock, FleetError> {
        let path = record::lock_path(self.state_dir, id);
        crate::lock::acquire_file(&path, &format!("{id} {}", std::process::id()), std::time::Duration::ZERO)
            .map_err(|e| match e {
                crate::lock::LockError::TimedOut { holder, .. } => FleetError::Refused(format!(
                    "fleet run {id} is being run by another controller ({holder}); wait for it (`runbook fleet show {id}`)"
                )),
                other => FleetError::Internal(other.to_string()),
            })
    }

    fn run(&self, target: &Target, window: &Window) -> Result<Exit, FleetError> {
        let hosts = self.hosts(target)?;
        let loaded = self.load(&target.name)?;
        let given = self.given(&target.inputs, &loaded)?;
        let engine = Engine::resolve(target.engine.as_deref(), self.state_dir, true)?;
        let stage = Shipment::prepare(self.state_dir, &engine, &loaded.bundle)?;
        let id = format!("fleet-{}", crate::app::new_run_id());
        let mut writer = Writer::create(self.state_dir, &id)?;
        let _lock = self.lock(&id)?;
        let recorded: Vec<Host> = hosts
            .iter()
            .map(|h| {
                let mut h = h.clone();
                h.spec.vars = host_values(&given, &h.spec.vars, &IndexMap::new(), &loaded, false);
                h
            })
            .collect();
        writer.append(&Line::FleetStarted(Box::new(record::Header {
            format: record::FORMAT.into(),
            id: id.clone(),
            runbook: loaded.bundle.name.clone(),
            digest: loaded.bundle.digest.clone(),
            files: loaded.bundle.files.clone(),
            engine_sha256: engine.sha256.clone(),
            engine_version: engine.version.clone(),
            started_at: record::now(),
            parallel: window.parallel.max(1),
            max_fail: window.max_fail,
            hosts: recorded,
            secrets: secrets_given(&given, &hosts, &loaded),
        })))?;
        if self.format() == Format::Text && !self.cli.quiet {
            println!(
                "fleet run {id}: {} on {} host(s)",
                loaded.bundle.name,
                hosts.len()
            );
        }
        let shipment = Shipment {
            engine: &engine,
            bundle: &loaded.bundle,
            stage,
        };
        let jobs: Vec<(usize, Job)> = (0..hosts.len()).map(|i| (i, Job::Start)).collect();
        let values: Vec<IndexMap<String, Json>> = hosts
            .iter()
            .map(|h| host_values(&given, &h.spec.vars, &IndexMap::new(), &loaded, true))
            .collect();
        let rows = drive(
            &hosts,
            &values,
            &loaded,
            &shipment,
            jobs,
            IndexMap::new(),
            window.parallel,
            window.max_fail,
            writer,
            self,
            &id,
        )?;
        Ok(exit_of(&rows))
    }

    fn resume(
        &self,
        id: &str,
        inputs: &Inputs,
        engine: Option<&Path>,
        parallel: Option<usize>,
        max_fail: Option<FailLimit>,
    ) -> Result<Exit, FleetError> {
        let run = FleetRun::read(self.state_dir, id)?;
        let _lock = self.lock(id)?;
        let loaded = self.load(&run.header.runbook)?;
        if loaded.bundle.digest != run.header.digest {
            return Err(FleetError::Refused(format!(
                "the runbook files changed since fleet run {id} started (the hosts' runs use the files it sent):\n{}put them back as they were to resume; a new `fleet run` uses the new ones",
                loaded.bundle.diff_from(&run.header.files)
            )));
        }
        let engine = Engine::resolve(engine, self.state_dir, true)?;
        if engine.sha256 != run.header.engine_sha256 {
            return Err(FleetError::Refused(format!(
                "the engine {} (sha256 {}) is not the one fleet run {id} installed (sha256 {}): pass that build with --engine",
                engine.path.display(),
                &engine.sha256[..16],
                &run.header.engine_sha256[..16]
            )));
        }
        let given = self.given(inputs, &loaded)?;
        let missing: Vec<&str> = run
            .header
            .secrets
            .iter()
            .filter(|k| !given.files.contains_key(*k) && !given.sets.contains_key(*k))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            return Err(FleetError::Invalid(format!(
                "fleet run {id} was given the secret(s) {}, which its record does not keep: give them again (--vars FILE or --set NAME=...)",
                missing
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let stage = Shipment::prepare(self.state_dir, &engine, &loaded.bundle)?;
        let shipment = Shipment {
            engine: &engine,
            bundle: &loaded.bundle,
            stage,
        };
        let mut writer = Writer::open(self.state_dir, id, false)?;
        writer.append(&Line::FleetResumed { at: record::now() })?;
        let mut done = IndexMap::new();
        let mut jobs = Vec::new();
        for (i, h) in run.header.hosts.iter().enumerate() {
            let state = &run.states[&h.name];
            match (&state.status, &state.run_id) {
                (HostStatus::Succeeded, _) => {
                    done.insert(i, state.clone());
                }
                (_, Some(run_id)) => jobs.push((i, Job::Continue(run_id.clone()))),
                (_, None) => jobs.push((i, Job::Start)),
            }
        }
        if self.format() == Format::Text && !self.cli.quiet {
            println!(
                "fleet resume {id}: {} of {} host(s) to continue, {} succeeded before",
                jobs.len(),
                run.header.hosts.len(),
                done.len()
            );
        }
        let values: Vec<IndexMap<String, Json>> = run
            .header
            .hosts
            .iter()
            .map(|h| host_values(&given, &IndexMap::new(), &h.spec.vars, &loaded, true))
            .collect();
        let rows = drive(
            &run.header.hosts,
            &values,
            &loaded,
            &shipment,
            jobs,
            done,
            parallel.unwrap_or(run.header.parallel),
            max_fail.or(run.header.max_fail),
            writer,
            self,
            id,
        )?;
        Ok(exit_of(&rows))
    }

    fn install(&self, target: &Target) -> Result<Exit, FleetError> {
        let hosts = self.hosts(target)?;
        let loaded = self.load(&target.name)?;
        let engine = Engine::resolve(target.engine.as_deref(), self.state_dir, true)?;
        let stage = Shipment::prepare(self.state_dir, &engine, &loaded.bundle)?;
        let shipment = Shipment {
            engine: &engine,
            bundle: &loaded.bundle,
            stage,
        };
        let results: Vec<Result<(), String>> = std::thread::scope(|s| {
            let handles: Vec<_> = hosts
                .iter()
                .map(|h| {
                    let shipment = &shipment;
                    s.spawn(move || host::install(h, shipment).map_err(|e| e.to_string()))
                })
                .collect();
            handles
                .into_iter()
                .map(|t| {
                    t.join()
                        .unwrap_or_else(|_| Err("install thread panicked".into()))
                })
                .collect()
        });
        let mut failed = 0;
        for (h, r) in hosts.iter().zip(&results) {
            match r {
                Ok(()) => println!(
                    "{}: engine {} and {} ({}) installed in {}",
                    h.name,
                    &engine.sha256[..16],
                    loaded.bundle.name,
                    &loaded.bundle.digest[..16],
                    h.spec.dir.display()
                ),
                Err(e) => {
                    failed += 1;
                    println!("{}: not installed: {e}", h.name);
                }
            }
        }
        Ok(if failed == 0 {
            Exit::Success
        } else {
            Exit::StepFailed
        })
    }

    fn runs(&self) -> Result<Exit, FleetError> {
        let runs = FleetRun::all(self.state_dir)?;
        if self.format() == Format::Json {
            let rows: Vec<Json> = runs
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "id": r.header.id,
                        "runbook": r.header.runbook,
                        "status": r.status().as_str(),
                        "started_at": r.header.started_at,
                        "hosts": r.header.hosts.len(),
                    })
                })
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&rows).unwrap_or_default()
            );
        } else if runs.is_empty() {
            println!("no fleet runs in {}", record::dir(self.state_dir).display());
        } else {
            let w = runs.iter().map(|r| r.header.id.len()).max().unwrap_or(2);
            println!(
                "{:<w$}  {:<11}  {:<24}  {:>5}  RUNBOOK",
                "ID", "STATUS", "STARTED", "HOSTS"
            );
            for r in &runs {
                println!(
                    "{:<w$}  {:<11}  {:<24}  {:>5}  {}",
                    r.header.id,
                    r.status().as_str(),
                    r.header.started_at,
                    r.header.hosts.len(),
                    r.header.runbook
                );
            }
        }
        Ok(Exit::Success)
    }

    fn show(&self, id: &str) -> Result<Exit, FleetError> {
        let run = FleetRun::read(self.state_dir, id)?;
        let rows: Vec<HostState> = run.states.values().cloned().collect();
        if self.format() == Format::Json {
            let value = serde_json::json!({
                "id": run.header.id,
                "runbook": run.header.runbook,
                "digest": run.header.digest,
                "status": run.status().as_str(),
                "started_at": run.header.started_at,
                "hosts": rows,
            });
            println!(
                "{}",
                serde_json::to_string_pretty(&value).unwrap_or_default()
            );
        } else if self.format() == Format::Junit {
            print!(
                "{}",
                output::junit(&run.header.id, &run.header.runbook, &rows)
            );
        } else {
            println!(
                "fleet run {} of {} ({}), started {}",
                run.header.id,
                run.header.runbook,
                run.status().as_str(),
                run.header.started_at
            );
            print!(
                "{}",
                output::table(&run.header.id, &run.header.runbook, &rows)
            );
        }
        Ok(Exit::Success)
    }
}

/// A host's values: `--vars` files, then the host's (or the recorded) vars, then
/// `--set`. With `secrets` false the secret params are left out (for the record).
pub(crate) fn host_values(
    given: &Given,
    host_vars: &IndexMap<String, Json>,
    recorded: &IndexMap<String, Json>,
    loaded: &Loaded,
    secrets: bool,
) -> IndexMap<String, Json> {
    let mut v = recorded.clone();
    v.extend(given.files.clone());
    v.extend(host_vars.clone());
    v.extend(given.sets.clone());
    if !secrets {
        v.retain(|k, _| !loaded.params.get(k).copied().unwrap_or(false));
    }
    v
}

/// The secret params among the values given (files, `--set`, any host's vars).
fn secrets_given(given: &Given, hosts: &[Host], loaded: &Loaded) -> Vec<String> {
    let mut names: Vec<String> = given
        .files
        .keys()
        .chain(given.sets.keys())
        .chain(hosts.iter().flat_map(|h| h.spec.vars.keys()))
        .filter(|k| loaded.params.get(*k).copied().unwrap_or(false))
        .cloned()
        .collect();
    names.sort();
    names.dedup();
    names
}

fn exit_of(rows: &[HostState]) -> Exit {
    if output::overall(rows) == HostStatus::Succeeded {
        Exit::Success
    } else {
        Exit::StepFailed
    }
}

/// Runs `jobs` through the scheduler, a thread per running host; records each
/// host's end; shows progress; returns every host's row (`done` ones as given).
#[allow(clippy::too_many_arguments)]
fn drive(
    hosts: &[Host],
    values: &[IndexMap<String, Json>],
    loaded: &Loaded,
    shipment: &Shipment,
    jobs: Vec<(usize, Job)>,
    done: IndexMap<usize, HostState>,
    parallel: usize,
    max_fail: Option<FailLimit>,
    writer: Writer,
    ctx: &Ctx,
    id: &str,
) -> Result<Vec<HostState>, FleetError> {
    let names: Vec<String> = hosts.iter().map(|h| h.name.clone()).collect();
    let mut ui = output::Ui::new(ctx.format(), ctx.cli.quiet, names);
    for (&i, state) in &done {
        ui.before(i, state);
    }
    let record = Mutex::new(writer);
    let mut job_of: IndexMap<usize, Job> = jobs.into_iter().collect();
    let mut sched = Scheduler::new(job_of.keys().copied().collect(), parallel, max_fail);
    let mut rows: IndexMap<usize, HostState> = done;
    enum Msg {
        Report(usize, Report),
        Done(usize, Outcome),
    }
    let (tx, rx) = std::sync::mpsc::channel::<Msg>();
    let record_ref = &record;
    std::thread::scope(|s| -> Result<(), FleetError> {
        loop {
            while let Some(i) = sched.start_next() {
                let job = job_of.swap_remove(&i).expect("a job per scheduled host");
                let tx = tx.clone();
                let host = &hosts[i];
                let vars = values[i].clone();
                let secrets: IndexMap<String, Json> = vars
                    .iter()
                    .filter(|(k, _)| loaded.params.get(*k).copied().unwrap_or(false))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                ui.doing(i, "connecting");
                s.spawn(move || {
                    let report_tx = tx.clone();
                    let report_fn = move |r: Report| {
                        let _ = report_tx.send(Msg::Report(i, r));
                    };
                    let run = HostRun {
                        host,
                        shipment,
                        record: record_ref,
                        vars,
                        secrets,
                        report: &report_fn,
                    };
                    let outcome = run.go(job);
                    let _ = tx.send(Msg::Done(i, outcome));
                });
            }
            if sched.done() {
                break;
            }
            match rx.recv() {
                Ok(Msg::Report(i, Report::Event(v))) => ui.event(i, v),
                Ok(Msg::Report(i, Report::Doing(what))) => ui.doing(i, &what),
                Ok(Msg::Done(i, o)) => {
                    record.lock().unwrap_or_else(|e| e.into_inner()).append(
                        &Line::HostFinished {
                            host: hosts[i].name.clone(),
                            run_id: o.run_id.clone(),
                            status: o.status,
                            failed_step: o.failed_step.clone(),
                            error: o.error.clone(),
                            duration_secs: o.duration.as_secs_f64(),
                            at: record::now(),
                        },
                    )?;
                    sched.finish(i, o.status == HostStatus::Succeeded);
                    ui.finished(i, &o);
                    rows.insert(i, o.state(&hosts[i].name));
                }
                Err(_) => break,
            }
        }
        Ok(())
    })?;
    for i in sched.not_started() {
        let o = Outcome {
            status: HostStatus::NotStarted,
            run_id: None,
            failed_step: None,
            error: Some(format!(
                "not started: --max-fail {} reached",
                max_fail.map_or("-".into(), FailLimit::text)
            )),
            duration: std::time::Duration::ZERO,
        };
        ui.finished(i, &o);
        rows.insert(
            i,
            HostState {
                duration_secs: None,
                ..o.state(&hosts[i].name)
            },
        );
    }
    rows.sort_keys();
    let rows: Vec<HostState> = rows.into_values().collect();
    record
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .append(&Line::FleetFinished {
            status: output::overall(&rows),
            at: record::now(),
        })?;
    ui.summary(id, &loaded.bundle.name, &rows);
    Ok(rows)
}
