//! Run locks: one file per lock name under `<state dir>/locks`, held with flock for
//! the whole run. The kernel drops a flock when its process dies, so a lock left by a
//! killed run is no lock at all; the file's text only says who holds it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("lock `{name}` is held by {holder}; wait for it to finish (`runbook runs` shows it)")]
    Held { name: String, holder: String },
    #[error("lock `{name}`: {source}")]
    Io {
        name: String,
        source: std::io::Error,
    },
}

/// A held lock; released on drop (or by the kernel when the process dies).
#[derive(Debug)]
pub struct RunLock {
    _file: File,
    pub name: String,
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

pub fn acquire(state_dir: &Path, name: &str, run_id: &str) -> Result<RunLock, LockError> {
    let io = |source| LockError::Io {
        name: name.to_string(),
        source,
    };
    let path = lock_path(state_dir, name);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let holder = describe_holder(&text);
            return Err(LockError::Held {
                name: name.to_string(),
                holder,
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
    }
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    writeln!(file, "{run_id} {}", std::process::id()).map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(RunLock {
        _file: file,
        name: name.to_string(),
    })
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
    if text.split_whitespace().next() != Some(run_id) {
        return false;
    }
    match file.try_lock_shared() {
        Ok(()) => {
            let _ = file.unlock();
            false
        }
        Err(_) => true,
    }
}

/// Who holds lock `name` now, if anyone (for plans).
pub fn holder(state_dir: &Path, name: &str) -> Option<String> {
    let mut file = File::open(lock_path(state_dir, name)).ok()?;
    let mut text = String::new();
    let _ = file.read_to_string(&mut text);
    match file.try_lock_shared() {
        Ok(()) => {
            let _ = file.unlock();
            None
        }
        Err(_) => Some(describe_holder(&text)),
    }
}
