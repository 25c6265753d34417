//! `daemon-start` / `daemon-stop`: a long-running process kept by a pidfile — how a
//! host without systemd or Compose runs a service (and how the drill's sandbox runs
//! its stand-in service). The pidfile holds the pid and the process's start time, so a
//! reused pid is never mistaken for the service.

use std::fs;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;

use super::process::{display_argv, find_program};
use super::{Action, ActionCtx, ActionError, Effect, Outputs, Verdict, parse_duration};
use crate::world::{Node, OpaqueScope, World};

/// Start a program in the background, detached, recording it in a pidfile.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DaemonStartArgs {
    /// Program and arguments (no shell).
    pub argv: Vec<String>,
    /// Where the pid is kept; its directory must exist.
    pub pidfile: PathBuf,
    /// File that receives the program's stdout and stderr (appended).
    pub log: PathBuf,
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// Paths (files or directories, with everything below them) the started program
    /// creates or changes that later steps read: they are "unknown until" this step
    /// runs in the plan. Without it the program's own writes are not predicted.
    #[serde(default)]
    pub writes: Option<Vec<PathBuf>>,
    /// Wait until this `host:port` accepts TCP connections.
    #[serde(default)]
    pub wait_for_port: Option<String>,
    /// How long to wait for the port (default `30s`).
    #[serde(default)]
    pub timeout: Option<String>,
}

/// Stop a program started by `daemon-start`: SIGTERM, then SIGKILL after `timeout`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DaemonStopArgs {
    pub pidfile: PathBuf,
    /// How long to wait after SIGTERM before SIGKILL (default `10s`).
    #[serde(default)]
    pub timeout: Option<String>,
}

pub struct DaemonStart;
pub struct DaemonStop;

/// Field 22 of /proc/PID/stat: the start time in clock ticks since boot.
fn start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after it follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The process recorded in `pidfile`, when it is still that process and not a zombie.
pub fn running(pidfile: &Path) -> Option<i32> {
    let text = fs::read_to_string(pidfile).ok()?;
    let mut parts = text.split_whitespace();
    let pid: i32 = parts.next()?.parse().ok()?;
    let recorded: u64 = parts.next()?.parse().ok()?;
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let state = stat[stat.rfind(')')? + 2..].chars().next()?;
    (start_time(pid) == Some(recorded) && state != 'Z').then_some(pid)
}

fn timeout_of(text: Option<&str>, default: Duration) -> Result<Duration, String> {
    text.map_or(Ok(default), parse_duration)
}

fn resolve(addr: &str) -> Result<SocketAddr, String> {
    addr.to_socket_addrs()
        .map_err(|e| format!("`{addr}` is not a host:port ({e})"))?
        .next()
        .ok_or_else(|| format!("`{addr}` resolves to no address"))
}

impl Action for DaemonStart {
    type Args = DaemonStartArgs;
    const NAME: &'static str = "daemon-start";
    const SUMMARY: &'static str = "start a background program with a pidfile (no change when it runs); optionally wait for its port";
    const OUTPUTS: &'static [&'static str] = &["pid", "started"];

    fn effect(&self, _: &DaemonStartArgs) -> Effect {
        Effect::Idempotent
    }

    /// A started service writes its own data while it serves; that is not this step's
    /// effect on the runbook's files (a service already running writes as much), and
    /// taking it as opaque would make every later step unknown. So, as with
    /// `compose-start` and `systemd-start`, only what `writes:` declares is opaque
    /// (its pidfile and log are predicted).
    fn opaque(&self, args: &DaemonStartArgs) -> Option<OpaqueScope> {
        args.writes
            .as_ref()
            .map(|paths| OpaqueScope::Below(paths.clone()))
    }

    fn check_static(&self, args: &DaemonStartArgs) -> Result<(), (String, String)> {
        if args.argv.is_empty() {
            return Err(("argv".into(), "argv must name a program".into()));
        }
        if let Some(t) = args.timeout.as_deref().filter(|t| !t.contains("{{")) {
            parse_duration(t).map_err(|e| ("timeout".into(), e))?;
        }
        Ok(())
    }

    fn preflight(&self, args: &DaemonStartArgs, world: &mut World, ctx: &ActionCtx) -> Verdict {
        if let Some(pid) = running(&args.pidfile).filter(|_| !world.is_predicted(&args.pidfile)) {
            return Verdict::NoChange(format!("running as pid {pid} ({})", args.pidfile.display()));
        }
        if let Err(why) = find_program(&args.argv[0], world) {
            return Verdict::WouldFail(why);
        }
        // The program is started in `cwd`: a missing one would fail only at run time.
        if let Some(cwd) = &args.cwd
            && world.node_followed(cwd) != Node::Dir
        {
            return Verdict::WouldFail(format!(
                "working directory `{}` does not exist",
                cwd.display()
            ));
        }
        for (what, path) in [("pidfile", &args.pidfile), ("log", &args.log)] {
            let parent = crate::world::normalize(path)
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default();
            if let Err(e) = crate::actions::guard::writable(path, ctx) {
                return Verdict::WouldFail(e.to_string());
            }
            if world.node_followed(&parent) != Node::Dir {
                return Verdict::WouldFail(format!(
                    "the {what}'s directory `{}` does not exist",
                    parent.display()
                ));
            }
        }
        if let Some(Err(e)) = args.wait_for_port.as_deref().map(resolve) {
            return Verdict::WouldFail(e);
        }
        world.predict_file(&args.pidfile, None);
        world.predict_file(&args.log, None);
        Verdict::WillChange(format!(
            "start {} (pidfile {})",
            display_argv(&args.argv),
            args.pidfile.display()
        ))
    }

    fn execute(&self, args: &DaemonStartArgs, ctx: &ActionCtx) -> Result<Outputs, ActionError> {
        let mut out = Outputs::new();
        if let Some(pid) = running(&args.pidfile) {
            out.insert("pid".into(), json!(pid));
            out.insert("started".into(), json!(false));
            return Ok(out);
        }
        crate::actions::guard::writable(&args.pidfile, ctx)?;
        crate::actions::guard::writable(&args.log, ctx)?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&args.log)
            .map_err(ActionError::io(format!("open log {}", args.log.display())))?;
        let log_err = log.try_clone().map_err(ActionError::io("dup log"))?;
        let mut cmd = Command::new(&args.argv[0]);
        cmd.args(&args.argv[1..])
            .envs(&args.env)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        if let Some(cwd) = &args.cwd {
            cmd.current_dir(cwd);
        }
        // Its own session: it outlives this run and no terminal signal reaches it.
        // SAFETY: setsid is async-signal-safe and touches no memory.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(ActionError::io(format!(
            "start {}",
            display_argv(&args.argv)
        )))?;
        let pid = child.id() as i32;
        // The child is never waited for by us: leave it to init when this run exits.
        std::mem::forget(child);
        let started = start_time(pid).ok_or_else(|| {
            ActionError::Failed(format!(
                "{} exited at once; see {}",
                display_argv(&args.argv),
                args.log.display()
            ))
        })?;
        let partial = args.pidfile.with_extension("pid.partial");
        fs::write(&partial, format!("{pid} {started}\n"))
            .map_err(ActionError::io(format!("write {}", partial.display())))?;
        fs::rename(&partial, &args.pidfile)
            .map_err(ActionError::io(format!("write {}", args.pidfile.display())))?;
        if let Some(addr) = &args.wait_for_port {
            let addr = resolve(addr).map_err(ActionError::Failed)?;
            let limit = timeout_of(args.timeout.as_deref(), Duration::from_secs(30))
                .map_err(ActionError::Failed)?;
            let deadline = ctx
                .deadline
                .map_or(Instant::now() + limit, |d| d.min(Instant::now() + limit));
            loop {
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    break;
                }
                if running(&args.pidfile).is_none() {
                    return Err(ActionError::Failed(format!(
                        "{} exited before listening on {addr}; see {}",
                        display_argv(&args.argv),
                        args.log.display()
                    )));
                }
                if Instant::now() > deadline {
                    return Err(ActionError::Failed(format!(
                        "nothing listens on {addr} after {}; see {}",
                        humantime::format_duration(limit),
                        args.log.display()
                    )));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        out.insert("pid".into(), json!(pid));
        out.insert("started".into(), json!(true));
        Ok(out)
    }
}

impl Action for DaemonStop {
    type Args = DaemonStopArgs;
    const NAME: &'static str = "daemon-stop";
    const SUMMARY: &'static str = "stop a daemon-start program: SIGTERM, then SIGKILL after the timeout (no change when stopped)";
    const OUTPUTS: &'static [&'static str] = &["pid", "stopped"];

    fn effect(&self, _: &DaemonStopArgs) -> Effect {
        Effect::Idempotent
    }

    fn check_static(&self, args: &DaemonStopArgs) -> Result<(), (String, String)> {
        match args.timeout.as_deref().filter(|t| !t.contains("{{")) {
            Some(t) => parse_duration(t)
                .map(|_| ())
                .map_err(|e| ("timeout".into(), e)),
            None => Ok(()),
        }
    }

    fn preflight(&self, args: &DaemonStopArgs, world: &mut World, _: &ActionCtx) -> Verdict {
        match running(&args.pidfile) {
            Some(pid) if !world.is_predicted(&args.pidfile) => {
                world.predict_absent(&args.pidfile);
                Verdict::WillChange(format!("stop pid {pid} ({})", args.pidfile.display()))
            }
            _ if world.is_predicted(&args.pidfile)
                && world.node(&args.pidfile) != Node::Missing =>
            {
                world.predict_absent(&args.pidfile);
                Verdict::WillChange(format!("stop the process of {}", args.pidfile.display()))
            }
            _ => Verdict::NoChange(format!("not running ({})", args.pidfile.display())),
        }
    }

    fn execute(&self, args: &DaemonStopArgs, _: &ActionCtx) -> Result<Outputs, ActionError> {
        let mut out = Outputs::new();
        let Some(pid) = running(&args.pidfile) else {
            let _ = fs::remove_file(&args.pidfile);
            out.insert("pid".into(), json!(null));
            out.insert("stopped".into(), json!(false));
            return Ok(out);
        };
        let limit = timeout_of(args.timeout.as_deref(), Duration::from_secs(10))
            .map_err(ActionError::Failed)?;
        // SAFETY: signalling a pid we verified by its start time.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + limit;
        while running(&args.pidfile).is_some() {
            if Instant::now() > deadline {
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                std::thread::sleep(Duration::from_millis(100));
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if running(&args.pidfile).is_some() {
            return Err(ActionError::Failed(format!("pid {pid} did not stop")));
        }
        fs::remove_file(&args.pidfile).map_err(ActionError::io(format!(
            "remove {}",
            args.pidfile.display()
        )))?;
        out.insert("pid".into(), json!(pid));
        out.insert("stopped".into(), json!(true));
        Ok(out)
    }
}
