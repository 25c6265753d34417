//! `exec`: run a program from an argv list. Never a shell string.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;

use super::{
    Action, ActionCtx, ActionError, Effect, Outputs, Verdict, parse_duration, writes_scope,
};
use crate::world::{Node, OpaqueScope, World};

/// Run a program. Its stdout and stderr are captured as outputs.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecArgs {
    /// Program and arguments, one list item each; no shell is involved.
    pub argv: Vec<String>,
    /// Extra environment variables for the program (the engine's own are inherited).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (default: the engine's).
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// Kill the program after this long (`30s`, `5m`).
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

pub struct Exec;

/// The argv as a person would type it, for plans and errors.
pub fn display_argv(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// What runs when `program` is started, found as execvp finds it: a path must be an
/// executable file; a name is the first executable file of that name in a `PATH`
/// directory (files there without execute permission are skipped, as execvp skips
/// them). Err says why nothing would run, in the words the plan and the run report.
pub fn find_program(program: &str, world: &World) -> Result<PathBuf, String> {
    if program.contains('/') {
        let p = PathBuf::from(program);
        return match runnable(&p, world) {
            Runnable::Yes => Ok(p),
            Runnable::Missing => Err(format!("program `{program}` not found")),
            Runnable::Dir => Err(format!("`{program}` is a directory, not a program")),
            Runnable::NotExecutable => Err(format!(
                "`{program}` is not executable (no execute permission)"
            )),
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut not_executable = None;
    for candidate in std::env::split_paths(&path).map(|dir| dir.join(program)) {
        match runnable(&candidate, world) {
            Runnable::Yes => return Ok(candidate),
            Runnable::NotExecutable if not_executable.is_none() => {
                not_executable = Some(candidate);
            }
            _ => {}
        }
    }
    Err(match not_executable {
        Some(file) => format!(
            "`{program}` is not executable: `{}` is on PATH without execute permission",
            file.display()
        ),
        None => format!("program `{program}` not found"),
    })
}

#[derive(PartialEq, Eq)]
enum Runnable {
    Yes,
    Missing,
    Dir,
    NotExecutable,
}

/// Whether exec would run `path`. A file an earlier step of the plan writes counts as
/// runnable: the world does not know the mode it will have.
fn runnable(path: &Path, world: &World) -> Runnable {
    // A program that is there now and that no earlier step touches is taken as it is:
    // that an opaque step removes it is too unlikely to make every later `exec`
    // unknown. Only a program that would not run asks what earlier steps may change.
    if !world.overlaid(path) && real_runnable(path) == Runnable::Yes {
        return Runnable::Yes;
    }
    if world.is_predicted(path) {
        return match world.node_followed(path) {
            Node::Missing => Runnable::Missing,
            Node::Dir => Runnable::Dir,
            Node::File { .. } | Node::Other => Runnable::Yes,
        };
    }
    real_runnable(path)
}

fn real_runnable(path: &Path) -> Runnable {
    // Followed through symlinks, as exec follows them.
    match std::fs::metadata(path) {
        Err(_) => Runnable::Missing,
        Ok(m) if m.is_dir() => Runnable::Dir,
        Ok(_) if !executable(path) => Runnable::NotExecutable,
        Ok(_) => Runnable::Yes,
    }
}

/// access(X_OK): what the kernel checks when it runs the file, for this process's user
/// (root too needs an execute bit on a file).
fn executable(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    unsafe { libc::access(c.as_ptr(), libc::X_OK) == 0 }
}

impl Action for Exec {
    type Args = ExecArgs;
    const NAME: &'static str = "exec";
    const OUTPUTS: &'static [&'static str] = &["exit_code", "stdout", "stderr"];
    const SUMMARY: &'static str =
        "run a program from an argv list (no shell); stdout, stderr and exit code become outputs";

    fn effect(&self, _: &ExecArgs) -> Effect {
        Effect::NotIdempotent
    }

    /// Any program may write anything: only its `writes:` narrows that.
    fn opaque(&self, args: &ExecArgs) -> Option<OpaqueScope> {
        Some(writes_scope(&args.writes))
    }

    fn check_static(&self, args: &ExecArgs) -> Result<(), (String, String)> {
        if args.argv.is_empty() {
            return Err(("argv".into(), "argv must name a program".into()));
        }
        if let Some(t) = args.timeout.as_deref().filter(|t| !t.contains("{{")) {
            parse_duration(t).map_err(|e| ("timeout".into(), e))?;
        }
        Ok(())
    }

    fn preflight(&self, args: &ExecArgs, world: &mut World, _: &ActionCtx) -> Verdict {
        let Some(program) = args.argv.first() else {
            return Verdict::WouldFail("argv is empty".into());
        };
        if let Some(Err(e)) = args.timeout.as_deref().map(parse_duration) {
            return Verdict::WouldFail(e);
        }
        if let Err(why) = find_program(program, world) {
            return Verdict::WouldFail(why);
        }
        if let Some(cwd) = &args.cwd
            && world.node_followed(cwd) != Node::Dir
        {
            return Verdict::WouldFail(format!(
                "working directory `{}` does not exist",
                cwd.display()
            ));
        }
        Verdict::WillChange(format!("run {}", display_argv(&args.argv)))
    }

    fn execute(&self, args: &ExecArgs, ctx: &ActionCtx) -> Result<Outputs, ActionError> {
        let deadline = step_deadline(args.timeout.as_deref(), ctx)?;
        let captured = run_argv(&args.argv, &args.env, args.cwd.as_deref(), deadline)?;
        captured.expect_exit(&args.argv, &args.expect_exit)?;
        Ok(captured.outputs())
    }
}

/// What a finished program left behind.
#[derive(Debug, Clone)]
pub struct Captured {
    pub stdout: String,
    pub stderr: String,
    /// None when it was killed by a signal.
    pub code: Option<i32>,
}

impl Captured {
    /// Fails unless the exit code is one of `expected`; the error names the program,
    /// its status and the last lines of its stderr.
    pub fn expect_exit(&self, argv: &[String], expected: &[i32]) -> Result<(), ActionError> {
        if self.code.is_some_and(|c| expected.contains(&c)) {
            return Ok(());
        }
        let status = self.code.map_or_else(
            || "killed by a signal".to_string(),
            |c| format!("exit code {c}"),
        );
        Err(ActionError::Failed(format!(
            "{} failed with {status}{}",
            display_argv(argv),
            self.stderr_tail()
        )))
    }

    /// `: line | line` of the last five stderr lines, or nothing.
    pub fn stderr_tail(&self) -> String {
        let tail: Vec<&str> = self.stderr.lines().rev().take(5).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        if tail.is_empty() {
            String::new()
        } else {
            format!(": {}", tail.join(" | "))
        }
    }

    /// `exit_code`, `stdout`, `stderr` (final newlines trimmed): `exec`'s outputs.
    pub fn outputs(&self) -> Outputs {
        let mut out = Outputs::new();
        out.insert("exit_code".into(), json!(self.code));
        out.insert("stdout".into(), json!(self.stdout.trim_end_matches('\n')));
        out.insert("stderr".into(), json!(self.stderr.trim_end_matches('\n')));
        out
    }
}

/// The earlier of an action's own `timeout` (from now) and the step's deadline.
pub fn step_deadline(
    timeout: Option<&str>,
    ctx: &ActionCtx,
) -> Result<Option<Instant>, ActionError> {
    let own = timeout
        .map(parse_duration)
        .transpose()
        .map_err(ActionError::Failed)?
        .map(|d| Instant::now() + d);
    Ok(match (own, ctx.deadline) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    })
}

/// Runs `argv` (no shell) with stdin closed, stdout and stderr captured, `env` added
/// to the engine's environment, in `cwd`. Past `deadline` the program is stopped and
/// the result is [`ActionError::TimedOut`]. Any exit code is returned, not judged.
///
/// The program runs in a process group of its own, and the whole group is ended
/// (SIGTERM, a short grace, SIGKILL) when the program exits or times out: what it
/// started in the background never outlives the step, so a retry cannot overlap it.
/// The group is ended before the program is reaped, so its id cannot be reused by
/// then. (`daemon-start` is the action for programs meant to outlive a step.)
///
/// The program inherits the run locks ([`crate::lock::run_lock_fds`]): should the
/// engine itself be killed, the locks stay held until the group's last process ends.
pub fn run_argv(
    argv: &[String],
    env: &BTreeMap<String, String>,
    cwd: Option<&Path>,
    deadline: Option<Instant>,
) -> Result<Captured, ActionError> {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let (program, rest) = argv
        .split_first()
        .ok_or_else(|| ActionError::Failed("argv is empty".into()))?;
    let mut cmd = Command::new(program);
    cmd.args(rest)
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if let Some(cwd) = cwd {
        cmd.current_dir(cwd);
    }
    let lock_fds = crate::lock::run_lock_fds();
    if !lock_fds.is_empty() {
        // SAFETY: between fork and exec only fcntl runs (async-signal-safe), on
        // descriptors the parent holds open; no allocation happens here.
        unsafe {
            cmd.pre_exec(move || {
                for fd in &lock_fds {
                    if libc::fcntl(*fd, libc::F_SETFD, 0) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(ActionError::io(format!("start {}", display_argv(argv))))?;
    let pid = child.id() as i32;
    crate::lock::note_step_group(Some(pid));
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let mut timed_out = None;
    loop {
        if exited_unreaped(pid) {
            break;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            timed_out = Some(started.elapsed());
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    end_group(pid);
    let status = child.wait().map_err(ActionError::io("wait"))?;
    crate::lock::note_step_group(None);
    if let Some(after) = timed_out {
        return Err(ActionError::TimedOut(after));
    }
    let collect = |rx: std::sync::mpsc::Receiver<Vec<u8>>| {
        // A process that left the group (its own session) may hold the pipe open:
        // what was written up to now is enough.
        rx.recv_timeout(std::time::Duration::from_secs(2))
            .unwrap_or_default()
    };
    Ok(Captured {
        stdout: String::from_utf8_lossy(&collect(stdout)).into_owned(),
        stderr: String::from_utf8_lossy(&collect(stderr)).into_owned(),
        code: status.code(),
    })
}

/// Reads a pipe to its end on a thread of its own; the bytes arrive on the channel.
fn drain(pipe: Option<impl std::io::Read + Send + 'static>) -> std::sync::mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = std::sync::mpsc::channel();
    if let Some(mut pipe) = pipe {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
    } else {
        let _ = tx.send(Vec::new());
    }
    rx
}

/// True once `pid` (our child) has exited; it is left a zombie, not reaped, so that
/// its pid (its group's id) stays taken while the group is ended.
fn exited_unreaped(pid: i32) -> bool {
    // SAFETY: waitid writes only into `info`, which is ours and zeroed.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let rc = libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        );
        rc == 0 && info.si_pid() == pid
    }
}

/// The live (not zombie) members of process group `pgid`, from /proc.
pub fn group_members(pgid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
                return false;
            };
            let mut fields = rest.split_whitespace();
            let state = fields.next();
            let pgrp = fields.nth(1).and_then(|f| f.parse::<i32>().ok());
            state != Some("Z") && pgrp == Some(pgid)
        })
        .collect()
}

/// Ends every process of group `pgid`: SIGTERM, up to half a second to go, SIGKILL.
fn end_group(pgid: i32) {
    let wait_gone = |limit: std::time::Duration| {
        let until = Instant::now() + limit;
        while !group_members(pgid).is_empty() {
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        true
    };
    if group_members(pgid).is_empty() {
        return;
    }
    // SAFETY: signals the group this step created (its leader is our unreaped child).
    unsafe { libc::kill(-pgid, libc::SIGTERM) };
    if !wait_gone(std::time::Duration::from_millis(500)) {
        // SAFETY: as above.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        wait_gone(std::time::Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_display_quotes_what_a_shell_would_split() {
        let argv = vec!["sh".into(), "-c".into(), "echo 'hi' > x".into(), "".into()];
        assert_eq!(display_argv(&argv), r#"sh -c 'echo '\''hi'\'' > x' ''"#);
        assert!(find_program("sh", &World::real()).is_ok());
        assert_eq!(
            find_program("/nonexistent/prog", &World::real()),
            Err("program `/nonexistent/prog` not found".to_string())
        );
        assert_eq!(
            find_program("/tmp", &World::real()),
            Err("`/tmp` is a directory, not a program".to_string())
        );
        assert!(Path::new("/bin").exists());
    }
}
