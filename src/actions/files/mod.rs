//! File actions: mkdir, copy, move, write-file, remove, chown, chmod, path-check.
//!
//! Every write goes to a temporary sibling first and is renamed into place after an
//! fsync, so an interrupted step leaves either the old state or the new one, never a
//! half-written file under the real name.

use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::ActionError;
use crate::world::{Node, World};

mod copy;
mod mkdir;
mod moving;
mod owner;
mod path_check;
mod remove;
pub(crate) mod room;
mod share;
pub(crate) mod staging;
mod tree;
mod write_file;

pub use copy::{Copy, CopyArgs, Overwrite};
pub use mkdir::{Mkdir, MkdirArgs};
pub use moving::{Move, MoveArgs};
pub use owner::{Chmod, ChmodArgs, Chown, ChownArgs, Owner};
pub use path_check::{PathCheck, PathCheckArgs};
pub use remove::{Remove, RemoveArgs};
pub use write_file::{WriteFile, WriteFileArgs};

pub(crate) fn show(p: &Path) -> String {
    format!("`{}`", p.display())
}

/// The parent of `path` must be (or be predicted to be) a directory; a symlink to a
/// directory is one (entries are created through it).
pub(crate) fn parent_is_dir(path: &Path, world: &World) -> Result<(), String> {
    let parent = crate::world::normalize(path)
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));
    match world.node_followed(&parent) {
        Node::Dir => Ok(()),
        Node::Missing => Err(format!(
            "parent directory {} does not exist (add a `mkdir` step before this one)",
            show(&parent)
        )),
        _ => Err(format!("{} is not a directory", show(&parent))),
    }
}

/// `path` as the kernel will reach it: its parent with every symlink and `..`
/// resolved (through the nearest ancestor that exists), then its own name, which is
/// not followed (the action acts on that entry itself).
pub(crate) fn resolved(path: &Path) -> PathBuf {
    let path = crate::world::normalize(path);
    let Some(name) = path.file_name() else {
        return path;
    };
    let parent = path.parent().unwrap_or(Path::new("/"));
    let existing = parent
        .ancestors()
        .find(|a| a.exists())
        .unwrap_or(Path::new("/"));
    let rest = parent.strip_prefix(existing).unwrap_or(Path::new(""));
    let base = fs::canonicalize(existing).unwrap_or_else(|_| existing.to_path_buf());
    crate::world::normalize(&base.join(rest)).join(name)
}

/// Refuses a copy or move of the directory `from` to a `to` inside it (judged on
/// resolved paths), which would copy the tree into itself.
pub(crate) fn not_inside_itself(from: &Path, to: &Path, world: &World) -> Result<(), String> {
    if world.node(from) != Node::Dir {
        return Ok(());
    }
    let (f, t) = (resolved(from), resolved(to));
    if t.starts_with(&f) && t != f {
        return Err(format!(
            "{} is inside {} (resolved: `{}` is below `{}`): a tree cannot be copied or moved into itself",
            show(to),
            show(from),
            t.display(),
            f.display()
        ));
    }
    Ok(())
}

/// A sibling name used while a step builds its result.
pub(crate) fn sibling(path: &Path, tag: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.runbook-{tag}"))
}

pub(crate) fn fsync_dir(dir: &Path) -> Result<(), ActionError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(ActionError::io(format!("fsync {}", dir.display())))
}

pub(crate) fn fsync_parent(path: &Path) -> Result<(), ActionError> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => fsync_dir(p),
        _ => fsync_dir(Path::new(".")),
    }
}

pub(crate) fn remove_any(path: &Path) -> std::io::Result<()> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
    }
}

pub(crate) fn mode_of(path: &Path) -> Option<u32> {
    fs::metadata(path)
        .ok()
        .map(|m| m.permissions().mode() & 0o7777)
}

/// Lower-case hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
