//! Service control: Docker Compose services (`compose-stop`, `compose-start`), systemd
//! units (`systemd-stop`, `systemd-start`), and a command inside a running container
//! (`docker-exec`).
//!
//! Every command is an argv list. The plan only reads: `config --services`, `ps`,
//! `docker inspect`, `systemctl is-active` / `show`; it never starts or stops anything.
//!
//! Compose is `docker compose` (the v2 plugin) when `docker compose version` works,
//! else `docker-compose` (v1) when it is on `PATH`; detected once per process.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value as Json, json};

use super::process::{Captured, display_argv, find_program, run_argv, step_deadline};
use super::{
    Action, ActionCtx, ActionError, Effect, Outputs, Verdict, parse_duration, writes_scope,
};
use crate::world::{Node, OpaqueScope, World, normalize};

/// How long a service action waits by default (its `timeout`).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// A bound on the read-only queries the plan makes.
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often `compose-start` and `systemd-start` look again while waiting.
const POLL: Duration = Duration::from_millis(250);

fn no_env() -> &'static BTreeMap<String, String> {
    static EMPTY: BTreeMap<String, String> = BTreeMap::new();
    &EMPTY
}

fn query_deadline() -> Option<Instant> {
    Some(Instant::now() + QUERY_TIMEOUT)
}

/// The action's own deadline: its `timeout` (default two minutes), capped by the step's.
fn deadline(timeout: Option<&str>, ctx: &ActionCtx) -> Result<Instant, ActionError> {
    let own = match timeout {
        Some(t) => parse_duration(t).map_err(ActionError::Failed)?,
        None => DEFAULT_TIMEOUT,
    };
    let own = Instant::now() + own;
    Ok(ctx.deadline.map_or(own, |d| d.min(own)))
}

fn check_timeout(timeout: &Option<String>) -> Result<(), (String, String)> {
    if let Some(t) = timeout.as_deref().filter(|t| !t.contains("{{")) {
        parse_duration(t).map_err(|e| ("timeout".into(), e))?;
    }
    Ok(())
}

fn argv(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

/// Runs a read-only query; its stdout, or an error with the command and its stderr.
fn query(argv: &[String], cwd: Option<&Path>) -> Result<String, String> {
    let captured = run_argv(argv, no_env(), cwd, query_deadline()).map_err(|e| e.to_string())?;
    captured
        .expect_exit(argv, &[0])
        .map_err(|e| e.to_string())?;
    Ok(captured.stdout)
}

fn quoted_list(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

// ------------------------------------------------------------------ containers

/// One container as `docker inspect` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    pub name: String,
    /// `created`, `running`, `paused`, `restarting`, `removing`, `exited`, `dead`.
    pub status: String,
    /// The healthcheck's status (`starting`, `healthy`, `unhealthy`) when it has one.
    pub health: Option<String>,
    pub exit_code: i64,
}

impl Container {
    fn from_inspect(v: &Json) -> Container {
        let state = &v["State"];
        Container {
            name: v["Name"]
                .as_str()
                .unwrap_or("")
                .trim_start_matches('/')
                .to_string(),
            status: state["Status"].as_str().unwrap_or("unknown").to_string(),
            health: state["Health"]["Status"].as_str().map(str::to_string),
            exit_code: state["ExitCode"].as_i64().unwrap_or(0),
        }
    }

    /// One word: `stopped`, `running`, `starting`, `healthy`, `unhealthy`, `paused`,
    /// `restarting`.
    pub fn word(&self) -> &str {
        match self.status.as_str() {
            "running" => self.health.as_deref().unwrap_or("running"),
            "created" | "exited" | "dead" | "removing" => "stopped",
            other => other,
        }
    }

    pub fn is_running(&self) -> bool {
        matches!(self.status.as_str(), "running" | "paused" | "restarting")
    }

    /// Running, and healthy when it has a healthcheck.
    pub fn is_ready(&self) -> bool {
        self.status == "running" && matches!(self.health.as_deref(), None | Some("healthy"))
    }

    fn describe(&self) -> String {
        match self.status.as_str() {
            "exited" => format!("exited with code {}", self.exit_code),
            _ => self.word().to_string(),
        }
    }
}

/// The containers of one compose service (usually one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceState {
    pub containers: Vec<Container>,
}

impl ServiceState {
    /// `absent` when it has no container; the containers' word when they agree, else
    /// their words joined by `+`.
    pub fn word(&self) -> String {
        let words: BTreeSet<&str> = self.containers.iter().map(Container::word).collect();
        if words.is_empty() {
            "absent".into()
        } else {
            words.into_iter().collect::<Vec<_>>().join("+")
        }
    }

    fn describe(&self) -> String {
        let all: BTreeSet<String> = self.containers.iter().map(Container::describe).collect();
        if all.is_empty() {
            "no container".into()
        } else {
            all.into_iter().collect::<Vec<_>>().join(", ")
        }
    }

    pub fn any_running(&self) -> bool {
        self.containers.iter().any(Container::is_running)
    }

    pub fn all_running(&self) -> bool {
        !self.containers.is_empty() && self.containers.iter().all(Container::is_running)
    }

    pub fn ready(&self) -> bool {
        !self.containers.is_empty() && self.containers.iter().all(Container::is_ready)
    }
}

/// `docker inspect` of these containers (names or ids). Containers that vanished
/// between listing and inspecting are left out.
fn inspect(ids: &[String]) -> Result<Vec<Json>, String> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut cmd = argv(&["docker", "inspect", "--type", "container", "--"]);
    cmd.extend(ids.iter().cloned());
    let captured = run_argv(&cmd, no_env(), None, query_deadline()).map_err(|e| e.to_string())?;
    match serde_json::from_str::<Vec<Json>>(&captured.stdout) {
        Ok(list) => Ok(list),
        Err(_) => Err(captured.expect_exit(&cmd, &[0]).err().map_or_else(
            || "`docker inspect` printed no JSON".into(),
            |e| e.to_string(),
        )),
    }
}

// ---------------------------------------------------------------------- compose

/// The compose command: `docker compose` (v2 plugin) or `docker-compose` (v1).
pub fn compose_command() -> Result<&'static [String], String> {
    static TOOL: OnceLock<Result<Vec<String>, String>> = OnceLock::new();
    TOOL.get_or_init(detect_compose)
        .as_ref()
        .map(Vec::as_slice)
        .map_err(Clone::clone)
}

fn detect_compose() -> Result<Vec<String>, String> {
    let real = World::real();
    if find_program("docker", &real).is_ok() {
        let v2 = argv(&["docker", "compose", "version"]);
        if run_argv(&v2, no_env(), None, query_deadline()).is_ok_and(|c| c.code == Some(0)) {
            return Ok(argv(&["docker", "compose"]));
        }
    }
    if find_program("docker-compose", &real).is_ok() {
        return Ok(argv(&["docker-compose"]));
    }
    Err("neither `docker compose` (the Compose v2 plugin) nor `docker-compose` (v1) is installed; install one of them".into())
}

/// Services of a Docker Compose project, to stop or start.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ComposeArgs {
    /// The project's directory: compose runs there (as `cd DIR && docker compose ...`),
    /// so it finds `compose.yaml`/`docker-compose.yml` and `.env` as it would for you.
    #[serde(default)]
    pub project_dir: Option<PathBuf>,
    /// The compose file (`-f FILE`), when it is not the default one of `project_dir`.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// The project name (`-p NAME`); default: compose's own (the directory's name).
    #[serde(default)]
    pub project: Option<String>,
    /// The services to act on, as named in the compose file; at least one.
    pub services: Vec<String>,
    /// How long the step may take, including waiting for the services (`30s`, `2m`;
    /// default `2m`).
    #[serde(default)]
    pub timeout: Option<String>,
}

struct Project<'a> {
    args: &'a ComposeArgs,
    tool: &'static [String],
}

impl<'a> Project<'a> {
    fn new(args: &'a ComposeArgs) -> Result<Project<'a>, String> {
        Ok(Project {
            args,
            tool: compose_command()?,
        })
    }

    fn argv(&self, sub: &[&str], services: &[String]) -> Vec<String> {
        compose_argv(self.tool, self.args, sub, services)
    }

    fn run(
        &self,
        sub: &[&str],
        services: &[String],
        deadline: Option<Instant>,
    ) -> Result<Captured, ActionError> {
        run_argv(
            &self.argv(sub, services),
            no_env(),
            self.args.project_dir.as_deref(),
            deadline,
        )
    }

    fn query(&self, sub: &[&str], services: &[String]) -> Result<String, String> {
        query(&self.argv(sub, services), self.args.project_dir.as_deref())
    }

    /// The services the compose file defines.
    fn defined_services(&self) -> Result<Vec<String>, String> {
        Ok(self
            .query(&["config", "--services"], &[])?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect())
    }

    /// The state of each of `services` now (one-off `run` containers left out).
    fn states(&self, services: &[String]) -> Result<BTreeMap<String, ServiceState>, String> {
        let ids = self.container_ids(services)?;
        Ok(self.states_of(&ids, services)?.0)
    }

    /// The ids of the services' containers, stopped ones too (`ps -a -q`).
    fn container_ids(&self, services: &[String]) -> Result<Vec<String>, String> {
        Ok(self
            .query(&["ps", "-a", "-q"], services)?
            .split_whitespace()
            .map(str::to_string)
            .collect())
    }

    /// The state of each service from its containers' `docker inspect` (one quick
    /// `docker` call; compose itself is slow to start), and whether every id was
    /// still there.
    fn states_of(
        &self,
        ids: &[String],
        services: &[String],
    ) -> Result<(BTreeMap<String, ServiceState>, bool), String> {
        let mut out: BTreeMap<String, ServiceState> = services
            .iter()
            .map(|s| (s.clone(), ServiceState::default()))
            .collect();
        let found = inspect(ids)?;
        let complete = found.len() == ids.len();
        for v in found {
            let labels = &v["Config"]["Labels"];
            if labels["com.docker.compose.oneoff"].as_str() == Some("True") {
                continue;
            }
            if let Some(state) = labels["com.docker.compose.service"]
                .as_str()
                .and_then(|s| out.get_mut(s))
            {
                state.containers.push(Container::from_inspect(&v));
            }
        }
        for state in out.values_mut() {
            state.containers.sort_by(|a, b| a.name.cmp(&b.name));
        }
        Ok((out, complete))
    }

    /// The key under which the plan records a service's predicted state.
    fn key(&self, service: &str) -> String {
        let place = self
            .args
            .file
            .as_deref()
            .or(self.args.project_dir.as_deref())
            .map(|p| normalize(p).display().to_string())
            .unwrap_or_default();
        format!(
            "compose:{place}:{}:{service}",
            self.args.project.as_deref().unwrap_or("")
        )
    }
}

/// `<tool> [-f FILE] [-p NAME] <sub...> [-- SERVICE...]`.
pub fn compose_argv(
    tool: &[String],
    args: &ComposeArgs,
    sub: &[&str],
    services: &[String],
) -> Vec<String> {
    let mut out = tool.to_vec();
    if let Some(file) = &args.file {
        out.push("-f".into());
        out.push(normalize(file).display().to_string());
    }
    if let Some(project) = &args.project {
        out.push("-p".into());
        out.push(project.clone());
    }
    out.extend(sub.iter().map(|s| s.to_string()));
    if !services.is_empty() {
        out.push("--".into());
        out.extend(services.iter().cloned());
    }
    out
}

fn check_compose_static(args: &ComposeArgs) -> Result<(), (String, String)> {
    if args.project_dir.is_none() && args.file.is_none() {
        return Err((
            "project_dir".into(),
            "give `project_dir` (the directory holding the compose file) or `file`".into(),
        ));
    }
    if args.services.is_empty() {
        return Err((
            "services".into(),
            "name at least one service (the plan must say what it stops or starts)".into(),
        ));
    }
    for (i, s) in args.services.iter().enumerate() {
        if s.is_empty() || (s.starts_with('-') && !s.contains("{{")) {
            return Err((
                format!("services[{i}]"),
                format!("`{s}` is not a service name"),
            ));
        }
    }
    check_timeout(&args.timeout)
}

/// What the plan knows of the services before acting: the project, each service's
/// state (predicted by an earlier step, or read now).
struct Judged<'a> {
    project: Project<'a>,
    states: BTreeMap<String, ServiceState>,
    /// Services whose state an earlier step of the plan predicts.
    predicted: BTreeMap<String, String>,
    /// The compose file is written by an earlier step: nothing could be asked yet.
    deferred: bool,
}

/// The read-only part shared by both preflights.
fn judge<'a>(args: &'a ComposeArgs, world: &World) -> Result<Judged<'a>, String> {
    if let Some(Err(e)) = args.timeout.as_deref().map(parse_duration) {
        return Err(e);
    }
    let project = Project::new(args)?;
    if let Some(dir) = &args.project_dir
        && world.node_followed(dir) != Node::Dir
    {
        return Err(format!(
            "project directory `{}` does not exist",
            dir.display()
        ));
    }
    if let Some(file) = &args.file
        && !matches!(world.node_followed(file), Node::File { .. })
    {
        return Err(format!("compose file `{}` does not exist", file.display()));
    }
    let predicted: BTreeMap<String, String> = args
        .services
        .iter()
        .filter_map(|s| {
            world
                .predicted_state(&project.key(s))
                .map(|w| (s.clone(), w.to_string()))
        })
        .collect();
    let written_earlier = [&args.file, &args.project_dir]
        .into_iter()
        .flatten()
        .any(|p| world.is_predicted(p));
    if written_earlier {
        // The compose file comes from an earlier step: nothing to ask compose yet.
        return Ok(Judged {
            project,
            states: BTreeMap::new(),
            predicted,
            deferred: true,
        });
    }
    // Two independent reads; compose (v1 is Python) is slow to start, so at once.
    let (defined, states) = std::thread::scope(|scope| {
        let states = scope.spawn(|| project.states(&args.services));
        let defined = project.defined_services();
        (defined, states.join().expect("the state query panicked"))
    });
    let defined = defined?;
    let unknown: Vec<String> = args
        .services
        .iter()
        .filter(|s| !defined.contains(s))
        .cloned()
        .collect();
    if !unknown.is_empty() {
        return Err(format!(
            "{} not in the compose file (it defines: {})",
            if unknown.len() == 1 {
                format!("service {} is", quoted_list(&unknown))
            } else {
                format!("services {} are", quoted_list(&unknown))
            },
            quoted_list(&defined)
        ));
    }
    let states = states?;
    Ok(Judged {
        project,
        states,
        predicted,
        deferred: false,
    })
}

impl Judged<'_> {
    /// Whether `service` runs (before this step), and how to describe it; None when
    /// that is known only when the step runs.
    fn running(&self, service: &str) -> Option<(bool, String)> {
        if let Some(word) = self.predicted.get(service) {
            return Some((word != "stopped", format!("{word} after an earlier step")));
        }
        self.states
            .get(service)
            .filter(|_| !self.deferred)
            .map(|state| (state.any_running(), state.describe()))
    }

    /// The verdict when the compose file does not exist yet.
    fn deferred(&self, verb: &str, args: &ComposeArgs) -> Option<Verdict> {
        let unknown: Vec<String> = args
            .services
            .iter()
            .filter(|s| self.running(s).is_none())
            .cloned()
            .collect();
        (!unknown.is_empty()).then(|| {
            Verdict::WillChange(format!(
                "{verb} {} (the compose file comes from an earlier step, so it is read when this step runs)",
                quoted_list(&unknown)
            ))
        })
    }

    fn record(&self, world: &mut World, service: &str, word: &str) {
        world.predict_state(self.project.key(service), word);
        if let Some(state) = self.states.get(service) {
            for c in &state.containers {
                world.predict_state(format!("container:{}", c.name), word);
            }
        }
    }
}

fn states_outputs(services: &[String], states: &BTreeMap<String, ServiceState>) -> Outputs {
    let mut out = Outputs::new();
    out.insert("services".into(), json!(services));
    let words: serde_json::Map<String, Json> = services
        .iter()
        .map(|s| {
            let word = states
                .get(s)
                .map_or_else(|| "absent".into(), ServiceState::word);
            (s.clone(), json!(word))
        })
        .collect();
    out.insert("states".into(), Json::Object(words));
    out
}

fn summary_of(states: &BTreeMap<String, ServiceState>) -> String {
    states
        .iter()
        .map(|(s, st)| format!("`{s}` {}", st.describe()))
        .collect::<Vec<_>>()
        .join(", ")
}

pub struct ComposeStop;

/// What a compose step wants its services to be.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Goal {
    Stopped,
    Running,
}

/// The plan of compose-stop and compose-start: read-only (`config --services`, `ps`,
/// `docker inspect`), and the services' new state predicted for the steps after.
fn compose_preflight(args: &ComposeArgs, world: &mut World, goal: Goal) -> Verdict {
    let (verb, state, done_word, extra) = match goal {
        Goal::Stopped => ("stop", "stopped", "already stopped", ""),
        Goal::Running => (
            "start",
            "running",
            "already running",
            " and wait until ready",
        ),
    };
    let judged = match judge(args, world) {
        Ok(j) => j,
        Err(e) => return Verdict::WouldFail(e),
    };
    let verdict = judged.deferred(verb, args);
    for s in &args.services {
        judged.record(world, s, state);
    }
    if let Some(v) = verdict {
        return v;
    }
    let mut todo = Vec::new();
    let mut already = Vec::new();
    for s in &args.services {
        let (running, how) = judged.running(s).unwrap_or_default();
        let line = format!("`{s}` ({how})");
        if running == (goal == Goal::Running) {
            already.push(line);
        } else {
            todo.push(line);
        }
    }
    if todo.is_empty() {
        Verdict::NoChange(format!("{done_word}: {}", already.join(", ")))
    } else if already.is_empty() {
        Verdict::WillChange(format!("{verb} {}{extra}", todo.join(", ")))
    } else {
        Verdict::WillChange(format!(
            "{verb} {}{extra}; {done_word}: {}",
            todo.join(", "),
            already.join(", ")
        ))
    }
}

impl Action for ComposeStop {
    type Args = ComposeArgs;
    const NAME: &'static str = "compose-stop";
    const OUTPUTS: &'static [&'static str] = &["services", "states"];
    const SUMMARY: &'static str =
        "stop Docker Compose services (`docker compose stop`); no change when already stopped";

    fn effect(&self, _: &ComposeArgs) -> Effect {
        Effect::Idempotent
    }

    fn check_static(&self, args: &ComposeArgs) -> Result<(), (String, String)> {
        check_compose_static(args)
    }

    fn preflight(&self, args: &ComposeArgs, world: &mut World, _: &ActionCtx) -> Verdict {
        compose_preflight(args, world, Goal::Stopped)
    }

    fn execute(&self, args: &ComposeArgs, ctx: &ActionCtx) -> Result<Outputs, ActionError> {
        let deadline = deadline(args.timeout.as_deref(), ctx)?;
        let project = Project::new(args).map_err(ActionError::Failed)?;
        // `stop` keeps containers, so their ids hold for the check after it.
        let ids = project
            .container_ids(&args.services)
            .map_err(ActionError::Failed)?;
        let before = project
            .states_of(&ids, &args.services)
            .map_err(ActionError::Failed)?
            .0;
        let running: Vec<String> = before
            .iter()
            .filter(|(_, st)| st.any_running())
            .map(|(s, _)| s.clone())
            .collect();
        if !running.is_empty() {
            let captured = project.run(&["stop"], &running, Some(deadline))?;
            captured.expect_exit(&project.argv(&["stop"], &running), &[0])?;
        }
        let after = project
            .states_of(&ids, &args.services)
            .map_err(ActionError::Failed)?
            .0;
        if after.values().any(ServiceState::any_running) {
            return Err(ActionError::Failed(format!(
                "still running after `stop`: {}; check `docker ps` and run the step again",
                summary_of(&after)
            )));
        }
        Ok(states_outputs(&args.services, &after))
    }
}

pub struct ComposeStart;

impl Action for ComposeStart {
    type Args = ComposeArgs;
    const NAME: &'static str = "compose-start";
    const OUTPUTS: &'static [&'static str] = &["services", "states"];
    const SUMMARY: &'static str = "start Docker Compose services (`docker compose up -d`) and wait until they run and are healthy";

    fn effect(&self, _: &ComposeArgs) -> Effect {
        Effect::Idempotent
    }

    fn check_static(&self, args: &ComposeArgs) -> Result<(), (String, String)> {
        check_compose_static(args)
    }

    fn preflight(&self, args: &ComposeArgs, world: &mut World, _: &ActionCtx) -> Verdict {
        compose_preflight(args, world, Goal::Running)
    }

    fn execute(&self, args: &ComposeArgs, ctx: &ActionCtx) -> Result<Outputs, ActionError> {
        let deadline = deadline(args.timeout.as_deref(), ctx)?;
        let project = Project::new(args).map_err(ActionError::Failed)?;
        let mut ids = project
            .container_ids(&args.services)
            .map_err(ActionError::Failed)?;
        let before = project
            .states_of(&ids, &args.services)
            .map_err(ActionError::Failed)?
            .0;
        let stopped: Vec<String> = before
            .iter()
            .filter(|(_, st)| !st.all_running())
            .map(|(s, _)| s.clone())
            .collect();
        if !stopped.is_empty() {
            let captured = project.run(&["up", "-d"], &stopped, Some(deadline))?;
            captured.expect_exit(&project.argv(&["up", "-d"], &stopped), &[0])?;
            // `up` may have created or recreated containers.
            ids = project
                .container_ids(&args.services)
                .map_err(ActionError::Failed)?;
        }
        let started = Instant::now();
        loop {
            let (mut states, complete) = project
                .states_of(&ids, &args.services)
                .map_err(ActionError::Failed)?;
            if !complete || states.values().any(|st| st.containers.is_empty()) {
                // A container was replaced meanwhile: ask compose again.
                ids = project
                    .container_ids(&args.services)
                    .map_err(ActionError::Failed)?;
                states = project
                    .states_of(&ids, &args.services)
                    .map_err(ActionError::Failed)?
                    .0;
            }
            if states.values().all(ServiceState::ready) {
                return Ok(states_outputs(&args.services, &states));
            }
            // A container that stopped after `up` crashed or exited; waiting is useless.
            let dead: Vec<String> = states
                .iter()
                .filter(|(_, st)| !st.any_running())
                .map(|(s, st)| format!("`{s}` {}", st.describe()))
                .collect();
            if !dead.is_empty() {
                return Err(ActionError::Failed(format!(
                    "not running after `up -d`: {}; see `docker logs` of its container",
                    dead.join(", ")
                )));
            }
            if Instant::now() + POLL > deadline {
                return Err(ActionError::Failed(format!(
                    "not ready after {}: {}",
                    humantime::format_duration(Duration::from_secs(started.elapsed().as_secs())),
                    summary_of(&states)
                )));
            }
            std::thread::sleep(POLL);
        }
    }
}

// ---------------------------------------------------------------------- systemd

/// Stop or start a systemd unit (`systemctl stop|start UNIT`).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SystemdArgs {
    /// The unit, e.g. `atocore` or `atocore.service`.
    pub unit: String,
    /// How long the step may take, including waiting for the unit (`30s`, `2m`;
    /// default `2m`).
    #[serde(default)]
    pub timeout: Option<String>,
}

/// `systemctl <verb> -- UNIT`.
pub fn systemctl_argv(verb: &str, unit: &str) -> Vec<String> {
    argv(&["systemctl", verb, "--", unit])
}

/// Whether `systemctl` can act on this host; else why not and what to use instead.
pub fn systemd_usable(alternative: &str) -> Result<(), String> {
    if find_program("systemctl", &World::real()).is_err() {
        return Err(format!(
            "systemctl not found: this host has no systemd; use {alternative} for a Docker Compose service"
        ));
    }
    // What sd_booted(3) checks: systemd is PID 1 only when this directory exists.
    if !Path::new("/run/systemd/system").is_dir() {
        return Err(format!(
            "systemd is not running on this host (PID 1 is not systemd, so systemctl cannot act); use {alternative} for a Docker Compose service"
        ));
    }
    Ok(())
}

/// `active`, `inactive`, `failed`, `activating`, ... and the load state (`loaded`,
/// `not-found`, `masked`).
fn unit_state(unit: &str) -> Result<(String, String), String> {
    // `is-active` exits 3 for an inactive unit: the word on stdout is the answer.
    let captured = run_argv(
        &systemctl_argv("is-active", unit),
        no_env(),
        None,
        query_deadline(),
    )
    .map_err(|e| e.to_string())?;
    let active = captured.stdout.trim().to_string();
    if active.is_empty() {
        return Err(format!(
            "`systemctl is-active {unit}` answered nothing{}",
            captured.stderr_tail()
        ));
    }
    let load = query(
        &argv(&[
            "systemctl",
            "show",
            "--property=LoadState",
            "--value",
            "--",
            unit,
        ]),
        None,
    )?;
    Ok((active, load.trim().to_string()))
}

fn is_up(active: &str) -> bool {
    matches!(
        active,
        "active" | "activating" | "reloading" | "deactivating"
    )
}

fn judge_unit(
    args: &SystemdArgs,
    world: &World,
    alternative: &str,
) -> Result<(bool, String), String> {
    if let Some(Err(e)) = args.timeout.as_deref().map(parse_duration) {
        return Err(e);
    }
    systemd_usable(alternative)?;
    let (active, load) = unit_state(&args.unit)?;
    if load == "not-found" {
        return Err(format!(
            "unit `{}` is not known to systemd (`systemctl list-units --all` lists them)",
            args.unit
        ));
    }
    if let Some(word) = world.predicted_state(&format!("systemd:{}", args.unit)) {
        return Ok((word != "inactive", format!("{word} after an earlier step")));
    }
    Ok((is_up(&active), active))
}

fn unit_outputs(unit: &str, active: &str) -> Outputs {
    let mut out = Outputs::new();
    out.insert("unit".into(), json!(unit));
    out.insert("state".into(), json!(active));
    out
}

fn check_unit_static(args: &SystemdArgs) -> Result<(), (String, String)> {
    if args.unit.is_empty() || (args.unit.starts_with('-') && !args.unit.contains("{{")) {
        return Err(("unit".into(), format!("`{}` is not a unit name", args.unit)));
    }
    check_timeout(&args.timeout)
}

/// The plan of systemd-stop and systemd-start: `systemctl is-active` (read-only), and
/// the unit's new state predicted for the steps after.
fn systemd_preflight(args: &SystemdArgs, world: &mut World, goal: Goal) -> Verdict {
    let (verb, state, alternative) = match goal {
        Goal::Stopped => ("stop", "inactive", "compose-stop"),
        Goal::Running => ("start", "active", "compose-start"),
    };
    match judge_unit(args, world, alternative) {
        Err(e) => Verdict::WouldFail(e),
        Ok((up, how)) => {
            world.predict_state(format!("systemd:{}", args.unit), state);
            if up == (goal == Goal::Running) {
                Verdict::NoChange(format!("unit `{}` is already {how}", args.unit))
            } else {
                Verdict::WillChange(format!("{verb} unit `{}` ({how})", args.unit))
            }
        }
    }
}

pub struct SystemdStop;

impl Action for SystemdStop {
    type Args = SystemdArgs;
    const NAME: &'static str = "systemd-stop";
    const OUTPUTS: &'static [&'static str] = &["unit", "state"];
    const SUMMARY: &'static str =
        "stop a systemd unit (`systemctl stop`); no change when it is not active";

    fn effect(&self, _: &SystemdArgs) -> Effect {
        Effect::Idempotent
    }

    fn check_static(&self, args: &SystemdArgs) -> Result<(), (String, String)> {
        check_unit_static(args)
    }

    fn preflight(&self, args: &SystemdArgs, world: &mut World, _: &ActionCtx) -> Verdict {
        systemd_preflight(args, world, Goal::Stopped)
    }

    fn execute(&self, args: &SystemdArgs, ctx: &ActionCtx) -> Result<Outputs, ActionError> {
        let deadline = deadline(args.timeout.as_deref(), ctx)?;
        systemd_usable("compose-stop").map_err(ActionError::Failed)?;
        let (active, _) = unit_state(&args.unit).map_err(ActionError::Failed)?;
        if is_up(&active) {
            let cmd = systemctl_argv("stop", &args.unit);
            run_argv(&cmd, no_env(), None, Some(deadline))?.expect_exit(&cmd, &[0])?;
        }
        let (after, _) = unit_state(&args.unit).map_err(ActionError::Failed)?;
        if is_up(&after) {
            return Err(ActionError::Failed(format!(
                "unit `{}` is still {after} after `systemctl stop`; see `systemctl status {}`",
                args.unit, args.unit
            )));
        }
        Ok(unit_outputs(&args.unit, &after))
    }
}

pub struct SystemdStart;

impl Action for SystemdStart {
    type Args = SystemdArgs;
    const NAME: &'static str = "systemd-start";
    const OUTPUTS: &'static [&'static str] = &["unit", "state"];
    const SUMMARY: &'static str =
        "start a systemd unit (`systemctl start`) and wait until it is active";

    fn effect(&self, _: &SystemdArgs) -> Effect {
        Effect::Idempotent
    }

    fn check_static(&self, args: &SystemdArgs) -> Result<(), (String, String)> {
        check_unit_static(args)
    }

    fn preflight(&self, args: &SystemdArgs, world: &mut World, _: &ActionCtx) -> Verdict {
        systemd_preflight(args, world, Goal::Running)
    }

    fn execute(&self, args: &SystemdArgs, ctx: &ActionCtx) -> Result<Outputs, ActionError> {
        let deadline = deadline(args.timeout.as_deref(), ctx)?;
        systemd_usable("compose-start").map_err(ActionError::Failed)?;
        let (active, _) = unit_state(&args.unit).map_err(ActionError::Failed)?;
        if active != "active" {
            let cmd = systemctl_argv("start", &args.unit);
            run_argv(&cmd, no_env(), None, Some(deadline))?.expect_exit(&cmd, &[0])?;
        }
        loop {
            let (now, _) = unit_state(&args.unit).map_err(ActionError::Failed)?;
            if now == "active" {
                return Ok(unit_outputs(&args.unit, &now));
            }
            if now == "failed" || Instant::now() + POLL > deadline {
                return Err(ActionError::Failed(format!(
                    "unit `{}` is {now}, not active, after `systemctl start`; see `systemctl status {}`",
                    args.unit, args.unit
                )));
            }
            std::thread::sleep(POLL);
        }
    }
}

// ------------------------------------------------------------------ docker-exec

/// Run a program inside a running container (`docker exec`).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DockerExecArgs {
    /// The container's name or id (`docker ps` lists them).
    pub container: String,
    /// Program and arguments inside the container, one list item each; no shell.
    pub argv: Vec<String>,
    /// Environment variables for the program. Their values reach `docker` through its
    /// environment (`-e NAME`), never its command line.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The user (`-u`), e.g. `1000` or `app:app`; default: the container's.
    #[serde(default)]
    pub user: Option<String>,
    /// Give up after this long (`30s`, `5m`). The program inside the container is not
    /// killed with `docker exec`; the error says so.
    #[serde(default)]
    pub timeout: Option<String>,
    /// The paths (files or directories, with everything below them) this step may
    /// create, change or remove. Without it the plan cannot tell what the step does to
    /// files, so every later step that reads a path is "unknown until" it runs; with
    /// it, only those paths are. `[]`: it writes no file.
    #[serde(default)]
    pub writes: Option<Vec<PathBuf>>,
    /// Exit codes that count as success (default `[0]`).
    #[serde(default = "default_exit")]
    pub expect_exit: Vec<i32>,
}

fn default_exit() -> Vec<i32> {
    vec![0]
}

/// `docker exec [-u USER] [-e NAME]... -- CONTAINER ARGV...`.
pub fn docker_exec_argv(args: &DockerExecArgs) -> Vec<String> {
    let mut out = argv(&["docker", "exec"]);
    if let Some(user) = &args.user {
        out.push("-u".into());
        out.push(user.clone());
    }
    for name in args.env.keys() {
        out.push("-e".into());
        out.push(name.clone());
    }
    out.push(args.container.clone());
    out.extend(args.argv.iter().cloned());
    out
}

/// Whether the container exists and runs, or why not.
fn container_running(name: &str) -> Result<Container, String> {
    let found = inspect(&[name.to_string()]).map_err(|e| {
        format!("container `{name}` does not exist (`docker ps -a` lists containers): {e}")
    })?;
    let Some(v) = found.first() else {
        return Err(format!(
            "container `{name}` does not exist (`docker ps -a` lists containers)"
        ));
    };
    let c = Container::from_inspect(v);
    if c.status != "running" {
        return Err(format!(
            "container `{name}` is not running ({}); start it first (compose-start)",
            c.describe()
        ));
    }
    Ok(c)
}

pub struct DockerExec;

impl Action for DockerExec {
    type Args = DockerExecArgs;
    const NAME: &'static str = "docker-exec";
    const OUTPUTS: &'static [&'static str] = &["exit_code", "stdout", "stderr"];
    const SUMMARY: &'static str = "run a program inside a running container (`docker exec`); stdout, stderr and exit code become outputs";

    fn effect(&self, _: &DockerExecArgs) -> Effect {
        Effect::NotIdempotent
    }

    /// A program in a container writes where its volumes are mounted, which the plan
    /// does not know: only `writes:` narrows that.
    fn opaque(&self, args: &DockerExecArgs) -> Option<OpaqueScope> {
        Some(writes_scope(&args.writes))
    }

    fn check_static(&self, args: &DockerExecArgs) -> Result<(), (String, String)> {
        if args.container.is_empty() {
            return Err(("container".into(), "name the container".into()));
        }
        if args.argv.is_empty() {
            return Err(("argv".into(), "argv must name a program".into()));
        }
        for name in args.env.keys() {
            if name.is_empty() || name.contains('=') {
                return Err((
                    format!("env.{name}"),
                    "an environment variable name must be non-empty and have no `=`".into(),
                ));
            }
        }
        check_timeout(&args.timeout)
    }

    fn preflight(&self, args: &DockerExecArgs, world: &mut World, _: &ActionCtx) -> Verdict {
        if let Some(Err(e)) = args.timeout.as_deref().map(parse_duration) {
            return Verdict::WouldFail(e);
        }
        if let Err(why) = find_program("docker", world) {
            return Verdict::WouldFail(why);
        }
        let run = format!(
            "run {} in container `{}`",
            display_argv(&args.argv),
            args.container
        );
        match world.predicted_state(&format!("container:{}", args.container)) {
            Some("stopped") => {
                return Verdict::WouldFail(format!(
                    "container `{}` is stopped by an earlier step",
                    args.container
                ));
            }
            Some(_) => return Verdict::WillChange(run),
            None => {}
        }
        match container_running(&args.container) {
            Ok(_) => Verdict::WillChange(run),
            Err(e) => Verdict::WouldFail(e),
        }
    }

    fn execute(&self, args: &DockerExecArgs, ctx: &ActionCtx) -> Result<Outputs, ActionError> {
        let deadline = step_deadline(args.timeout.as_deref(), ctx)?;
        let cmd = docker_exec_argv(args);
        let captured = match run_argv(&cmd, &args.env, None, deadline) {
            Err(ActionError::TimedOut(after)) => {
                return Err(ActionError::Failed(format!(
                    "timed out after {}; the program may still be running inside container `{}` (stopping `docker exec` does not stop it): check with `docker top {}`",
                    humantime::format_duration(Duration::from_secs(after.as_secs())),
                    args.container,
                    args.container
                )));
            }
            other => other?,
        };
        captured.expect_exit(&cmd, &args.expect_exit)?;
        Ok(captured.outputs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compose_args(yaml: &str) -> ComposeArgs {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn compose_argv_puts_file_and_project_first_and_services_after_a_double_dash() {
        let args = compose_args("{file: /srv/app/compose.yaml, project: app, services: [web, db]}");
        let v2 = argv(&["docker", "compose"]);
        assert_eq!(
            compose_argv(&v2, &args, &["stop"], &args.services),
            argv(&[
                "docker",
                "compose",
                "-f",
                "/srv/app/compose.yaml",
                "-p",
                "app",
                "stop",
                "--",
                "web",
                "db"
            ])
        );
        let args = compose_args("{project_dir: /srv/app, services: [web]}");
        assert_eq!(
            compose_argv(
                &argv(&["docker-compose"]),
                &args,
                &["config", "--services"],
                &[]
            ),
            argv(&["docker-compose", "config", "--services"])
        );
    }

    #[test]
    fn systemctl_and_docker_exec_argv() {
        assert_eq!(
            systemctl_argv("stop", "atocore.service"),
            argv(&["systemctl", "stop", "--", "atocore.service"])
        );
        let args: DockerExecArgs = serde_yaml::from_str(
            "{container: atocore, argv: [python, -m, atocore.ops.backup], user: '1000', env: {TOKEN: s3cret, A: b}}",
        )
        .unwrap();
        let cmd = docker_exec_argv(&args);
        assert_eq!(
            cmd,
            argv(&[
                "docker",
                "exec",
                "-u",
                "1000",
                "-e",
                "A",
                "-e",
                "TOKEN",
                "atocore",
                "python",
                "-m",
                "atocore.ops.backup"
            ])
        );
        assert!(!cmd.iter().any(|a| a.contains("s3cret")), "a value on argv");
    }

    #[test]
    fn service_words() {
        let c = |status: &str, health: Option<&str>| Container {
            name: "x".into(),
            status: status.into(),
            health: health.map(str::to_string),
            exit_code: 0,
        };
        let st = |cs: Vec<Container>| ServiceState { containers: cs };
        assert_eq!(st(vec![]).word(), "absent");
        assert_eq!(st(vec![c("exited", None)]).word(), "stopped");
        assert_eq!(st(vec![c("running", None)]).word(), "running");
        assert_eq!(st(vec![c("running", Some("starting"))]).word(), "starting");
        assert!(!st(vec![c("running", Some("starting"))]).ready());
        assert!(st(vec![c("running", Some("healthy"))]).ready());
        assert_eq!(
            st(vec![c("running", None), c("exited", None)]).word(),
            "running+stopped"
        );
        assert!(st(vec![c("running", None), c("exited", None)]).any_running());
        assert!(!st(vec![c("running", None), c("exited", None)]).all_running());
    }
}
