//! File locks held with flock: the run lock (one file per lock name under
//! `<state dir>/locks`, for the whole run) and step locks (any file, for one step).
//! The kernel drops a flock when its process dies, so a lock left by a killed run is
//! no lock at all; the file's text only says who holds it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("lock `{name}` is held by {holder}; wait for it to finish (`runbook runs` shows it)")]
    Held { name: String, holder: String },
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
    _file: File,
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
            return Ok(Err(describe_holder(&text)));
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(e),
    }
    file.set_len(0)?;
    file.rewind()?;
    writeln!(file, "{holder}")?;
    file.sync_all()?;
    Ok(Ok(HeldLock { _file: file }))
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
    match try_take(&path, &format!("{run_id} {}", std::process::id())).map_err(io)? {
        Ok(held) => Ok(held),
        Err(holder) => Err(LockError::Held {
            name: name.to_string(),
            holder,
        }),
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
            Err(holder) if started.elapsed() >= timeout => {
                return Err(LockError::TimedOut {
                    path: path.to_path_buf(),
                    holder,
                    waited: started.elapsed(),
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn describe_holder(text: &str) -> String {
    let mut parts = text.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some(run), Some(pid)) => format!("run {run}, pid {pid}"),
        _ => "another process".to_string(),
    }
}

/// True when a live process holds lock `name` for `run_id` (read-only check: the lock
/// file is only opened, never created).
pub fn held_by(state_dir: &Path, name: &str, run_id: &str) -> bool {
    let Ok(mut file) = File::open(lock_path(state_dir, name)) else {
        return false;
    };
    let mut text = String::new();
    let _ = file.read_to_string(&mut text);
    text.split_whitespace().next() == Some(run_id) && is_locked(&file)
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
