//! File locks held with flock: the run lock (one file per lock name under
//! `<state dir>/locks`, for the whole run) and step locks (any file, for one step).
//! The kernel drops a flock when its process dies, so a lock left by a killed run is
//! no lock at all; the file's text only says who holds it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("lock `{name}` is held by {holder}; {next}")]
    Held {
        name: String,
        holder: String,
        /// What to do about it.
        next: String,
    },
    #[error("lock {} is held by {holder} (waited {})", path.display(), humantime::format_duration(Duration::from_millis(waited.as_millis() as u64)))]
    TimedOut {
        path: PathBuf,
        holder: String,
        waited: Duration,
    },
    #[error("lock {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A held lock; released on drop (or by the kernel when the process dies).
#[derive(Debug)]
pub struct HeldLock {
    file: File,
    /// A run lock, which step processes inherit (see [`run_lock_fds`]).
    shared: bool,
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        if self.shared {
            let fd = self.file.as_raw_fd();
            run_locks().retain(|l| l.fd != fd);
        }
    }
}

/// A run lock this process holds, as step processes see it.
struct RunLock {
    fd: RawFd,
    /// The file's text while no step process runs: `RUN_ID ENGINE_PID`.
    holder: String,
}

/// The run locks held now, and the step that runs now. Process-wide on purpose: a flock
/// belongs to an open file description, which `exec` children inherit, and the
/// executor runs one step at a time.
static RUN_LOCKS: Mutex<Vec<RunLock>> = Mutex::new(Vec::new());
static CURRENT_STEP: Mutex<Option<String>> = Mutex::new(None);

fn run_locks() -> std::sync::MutexGuard<'static, Vec<RunLock>> {
    RUN_LOCKS.lock().unwrap_or_else(|e| e.into_inner())
}

/// The descriptors of the run locks, for a step's child to inherit: its `pre_exec`
/// clears their close-on-exec flag in the child only. The child and everything it
/// starts then share the lock's open file description, so the kernel keeps the lock
/// held until the last of them exits, even when the engine itself is SIGKILLed: a
/// resume cannot overlap a step's leftovers. (`daemon-start` daemons, meant to
/// outlive their step, do not inherit it.)
pub fn run_lock_fds() -> Vec<RawFd> {
    run_locks().iter().map(|l| l.fd).collect()
}

/// The step the executor runs now (None between steps), named in the lock files
/// while its processes run.
pub fn set_current_step(step: Option<&str>) {
    *CURRENT_STEP.lock().unwrap_or_else(|e| e.into_inner()) = step.map(str::to_string);
}

/// Says in every run lock's file that process group `pgid` of the current step runs
/// (`Some`), or that it has ended (`None`), so that a run refused by a lock left held
/// by a killed engine's step names that step and group. Best effort: the text is
/// only a description; the flock itself is what excludes.
pub fn note_step_group(pgid: Option<i32>) {
    let step = CURRENT_STEP
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_else(|| "-".to_string());
    for lock in run_locks().iter() {
        let text = match pgid {
            Some(g) => format!("{} {step} {g}\n", lock.holder),
            None => format!("{}\n", lock.holder),
        };
        // SAFETY: `fd` belongs to a HeldLock that is alive while it is listed here;
        // ManuallyDrop keeps this borrowed File from closing it.
        let file = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(lock.fd) });
        use std::os::unix::fs::FileExt;
        let _ = file.set_len(0);
        let _ = file.write_all_at(text.as_bytes(), 0);
    }
}

fn lock_path(state_dir: &Path, name: &str) -> PathBuf {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    state_dir.join("locks").join(format!("{safe}.lock"))
}

/// Tries once; on success writes `holder` into the file. Err(Some(text)) when held.
fn try_take(path: &Path, holder: &str) -> Result<Result<HeldLock, String>, std::io::Error> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Ok(Err(text));
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(e),
    }
    file.set_len(0)?;
    file.rewind()?;
    writeln!(file, "{holder}")?;
    file.sync_all()?;
    Ok(Ok(HeldLock {
        file,
        shared: false,
    }))
}

/// The run lock `name`; refused at once when held.
pub fn acquire(state_dir: &Path, name: &str, run_id: &str) -> Result<HeldLock, LockError> {
    let path = lock_path(state_dir, name);
    let io = |source| LockError::Io {
        path: path.clone(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let holder = format!("{run_id} {}", std::process::id());
    match try_take(&path, &holder).map_err(io)? {
        Ok(mut held) => {
            held.shared = true;
            run_locks().push(RunLock {
                fd: held.file.as_raw_fd(),
                holder,
            });
            Ok(held)
        }
        Err(text) => {
            let (holder, next) = holder_and_next(&text);
            Err(LockError::Held {
                name: name.to_string(),
                holder,
                next,
            })
        }
    }
}

/// A step lock on any file, waiting up to `timeout` for its holder.
pub fn acquire_file(path: &Path, holder: &str, timeout: Duration) -> Result<HeldLock, LockError> {
    let started = Instant::now();
    loop {
        match try_take(path, holder).map_err(|source| LockError::Io {
            path: path.to_path_buf(),
            source,
        })? {
            Ok(held) => return Ok(held),
            Err(text) if started.elapsed() >= timeout => {
                return Err(LockError::TimedOut {
                    path: path.to_path_buf(),
                    holder: describe_holder(&text),
                    waited: started.elapsed(),
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn describe_holder(text: &str) -> String {
    holder_and_next(text).0
}

/// Who holds a lock, from its file's text, and what the refused operator can do.
fn holder_and_next(text: &str) -> (String, String) {
    let wait = "wait for it to finish (`runbook runs` shows it)".to_string();
    let parts: Vec<&str> = text.split_whitespace().collect();
    match parts[..] {
        [run, pid, step, pgid, ..] if !engine_alive(pid) => (
            format!(
                "process group {pgid}, started by step `{step}` of run {run}, whose engine (pid {pid}) is gone"
            ),
            format!(
                "the step's processes still run; wait for them to end, or end them with `kill -TERM -- -{pgid}`, then try again"
            ),
        ),
        [run, pid, ..] => (format!("run {run}, pid {pid}"), wait),
        _ => ("another process".to_string(), wait),
    }
}

/// True when `pid` is a live process (a zombie counts as gone).
fn engine_alive(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let rest = &stat[stat.rfind(')')? + 2..];
            rest.split_whitespace().next().map(|state| state != "Z")
        })
        .unwrap_or(false)
}

/// True when a live process holds lock `name` for `run_id` (read-only check: the lock
/// file is only opened, never created).
pub fn held_by(state_dir: &Path, name: &str, run_id: &str) -> bool {
    let Ok(mut file) = File::open(lock_path(state_dir, name)) else {
        return false;
    };
    let mut text = String::new();
    let _ = file.read_to_string(&mut text);
    let mut words = text.split_whitespace();
    // After a SIGKILL a step's leftovers may hold the lock: the run is then
    // interrupted (its engine is gone), though a resume must still wait for them.
    words.next() == Some(run_id) && words.next().is_some_and(engine_alive) && is_locked(&file)
}

/// Who holds the run lock `name` now, if anyone (read-only, for plans).
pub fn holder(state_dir: &Path, name: &str) -> Option<String> {
    holder_at(&lock_path(state_dir, name))
}

/// Who holds the lock file at `path` now, if anyone (read-only: never creates it).
pub fn holder_at(path: &Path) -> Option<String> {
    let mut file = File::open(path).ok()?;
    let mut text = String::new();
    let _ = file.read_to_string(&mut text);
    is_locked(&file).then(|| describe_holder(&text))
}

fn is_locked(file: &File) -> bool {
    match file.try_lock_shared() {
        Ok(()) => {
            let _ = file.unlock();
            false
        }
        Err(_) => true,
    }
}
