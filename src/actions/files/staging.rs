//! The shared mechanics of multi-phase actions, so that every intermediate state an
//! interruption can leave is one that the next attempt recognises and finishes:
//!
//! - a result is built in a `.NAME.runbook-partial` sibling ([`Partial`]), which is
//!   renamed into place only when complete, and removed if the attempt fails (an
//!   error, not a kill: on SIGKILL nothing runs, and the next attempt discards it);
//! - a file or tree is never deleted in place: it is first renamed (atomically, in its
//!   own directory, so never across filesystems) to a `.NAME.runbook-deleting` sibling,
//!   the directory is fsynced, and only then is the tombstone deleted ([`delete`]). A
//!   half-deleted tree thus never carries its real name, and any later attempt that
//!   finds the tombstone finishes deleting it ([`sweep`]).
//!
//! [`phase`] names the points between phases so tests can kill the engine there.

use std::fs;
use std::path::{Path, PathBuf};

use super::{fsync_parent, remove_any, sibling};
use crate::actions::ActionError;

/// Fault injection inside an action: `RUNBOOK_FAILPOINT=phase:NAME` makes the engine
/// SIGKILL itself when the action reaches phase NAME (e.g. `move:source-deleting`).
/// Only the tests set it; it is the same death as `kill -9` at that instant, and the
/// executor's `before:KEY`/`after:KEY` points are its step-level counterpart.
pub(crate) fn phase(name: &str) {
    if std::env::var("RUNBOOK_FAILPOINT")
        .is_ok_and(|p| p.strip_prefix("phase:").is_some_and(|n| n == name))
    {
        // SAFETY: sends a signal to this very process.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

const PARTIAL: &str = "partial";
const DELETING: &str = "deleting";

/// The name a path takes while it is being deleted.
pub(crate) fn tombstone(path: &Path) -> PathBuf {
    sibling(path, DELETING)
}

/// The NAME buried in a tombstone's name (`.NAME.runbook-deleting`), if it is one.
pub(crate) fn buried_name(name: &str) -> Option<&str> {
    name.strip_prefix('.')?.strip_suffix(".runbook-deleting")
}

/// Deletes `path` through its tombstone ([`bury`], then [`Grave::delete`]).
pub(crate) fn delete(path: &Path, phase_name: &str) -> Result<(), ActionError> {
    match bury(path)? {
        Some(grave) => grave.delete(phase_name),
        None => Ok(()),
    }
}

/// A path renamed to its tombstone, not yet deleted.
pub(crate) struct Grave {
    path: PathBuf,
}

/// Renames `path` to its tombstone and fsyncs the directory: from here on, the real
/// name is free (or taken by the new result) whatever happens. None if `path` is gone.
pub(crate) fn bury(path: &Path) -> Result<Option<Grave>, ActionError> {
    // A tombstone of an earlier attempt goes first: rename() cannot replace a tree.
    sweep(path)?;
    let grave = tombstone(path);
    match fs::rename(path, &grave) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(ActionError::io(format!("rename {} aside", path.display()))(
                e,
            ));
        }
    }
    fsync_parent(path)?;
    Ok(Some(Grave { path: grave }))
}

impl Grave {
    /// Deletes the tombstone. `phase_name` fires once it is half-deleted (its first
    /// entry gone), the most awkward place for a kill.
    pub(crate) fn delete(self, phase_name: &str) -> Result<(), ActionError> {
        if self.path.is_dir()
            && let Some(Ok(first)) = fs::read_dir(&self.path)
                .map_err(ActionError::io(format!("list {}", self.path.display())))?
                .next()
        {
            remove_any(&first.path()).map_err(ActionError::io(format!(
                "remove {}",
                first.path().display()
            )))?;
        }
        phase(phase_name);
        finish(&self.path)
    }
}

/// Finishes deleting what an interrupted attempt left in `path`'s tombstone, if any.
pub(crate) fn sweep(path: &Path) -> Result<(), ActionError> {
    let grave = tombstone(path);
    if fs::symlink_metadata(&grave).is_ok() {
        finish(&grave)?;
    }
    Ok(())
}

fn finish(grave: &Path) -> Result<(), ActionError> {
    remove_any(grave).map_err(ActionError::io(format!("remove {}", grave.display())))?;
    fsync_parent(grave)
}

/// A result being built beside its destination. Dropped without [`Partial::commit`],
/// it removes what was built (with the side files named by `side_suffixes`).
pub(crate) struct Partial {
    path: PathBuf,
    side_suffixes: &'static [&'static str],
    committed: bool,
}

impl Partial {
    /// The partial of `dest`, with whatever an interrupted attempt left there discarded.
    pub(crate) fn fresh(dest: &Path) -> Result<Partial, ActionError> {
        Partial::fresh_with(dest, &[])
    }

    /// As [`Partial::fresh`], for a result that may grow side files (`-journal`...).
    pub(crate) fn fresh_with(
        dest: &Path,
        side_suffixes: &'static [&'static str],
    ) -> Result<Partial, ActionError> {
        let partial = Partial {
            path: sibling(dest, PARTIAL),
            side_suffixes,
            committed: false,
        };
        partial.discard()?;
        Ok(partial)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    fn discard(&self) -> Result<(), ActionError> {
        for suffix in std::iter::once(&"").chain(self.side_suffixes) {
            let p = PathBuf::from(format!("{}{suffix}", self.path.display()));
            remove_any(&p).map_err(ActionError::io(format!("remove {}", p.display())))?;
        }
        Ok(())
    }

    /// Renames the complete result to `dest` (replacing a file there).
    pub(crate) fn commit(mut self, dest: &Path) -> Result<(), ActionError> {
        fs::rename(&self.path, dest)
            .map_err(ActionError::io(format!("rename into {}", dest.display())))?;
        self.committed = true;
        Ok(())
    }

    /// Gives `dest` (which must not exist) the complete result as a second name, and
    /// keeps the partial's name until [`Linked::unlink`]: a kill in between leaves two
    /// names of one inode, which tells the next attempt that `dest` is this step's
    /// complete result and not a file that was there before.
    pub(crate) fn link(mut self, dest: &Path) -> Result<Linked, ActionError> {
        fs::hard_link(&self.path, dest)
            .map_err(ActionError::io(format!("link into {}", dest.display())))?;
        self.committed = true;
        Ok(Linked {
            path: std::mem::take(&mut self.path),
        })
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.committed {
            let _ = self.discard();
        }
    }
}

/// A partial whose result also has its real name (see [`Partial::link`]).
pub(crate) struct Linked {
    path: PathBuf,
}

impl Linked {
    pub(crate) fn unlink(self) -> Result<(), ActionError> {
        fs::remove_file(&self.path)
            .map_err(ActionError::io(format!("remove {}", self.path.display())))?;
        fsync_parent(&self.path)
    }
}

/// True when `a` and `b` are two names of one inode.
pub(crate) fn same_inode(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (fs::symlink_metadata(a), fs::symlink_metadata(b)) {
        (Ok(ma), Ok(mb)) => ma.dev() == mb.dev() && ma.ino() == mb.ino(),
        _ => false,
    }
}

/// Removes the partial of `dest` (and its side files) that an interrupted attempt
/// left, and makes that durable.
pub(crate) fn sweep_partial(
    dest: &Path,
    side_suffixes: &'static [&'static str],
) -> Result<(), ActionError> {
    Partial::fresh_with(dest, side_suffixes)?;
    fsync_parent(dest)
}

/// The partial of `dest` (for code that only needs its name).
pub(crate) fn partial_of(dest: &Path) -> PathBuf {
    sibling(dest, PARTIAL)
}
