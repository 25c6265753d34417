//! The one guard every writing action passes before it touches a path, in its
//! preflight (the plan) and again in `execute`, right before acting.
//!
//! Paths are judged as the kernel will resolve them, not as text:
//! - the runbook's `roots` and the state dir are resolved (symlinks followed: a root
//!   that is a symlink is the operator's own choice);
//! - a target is resolved component by component; a symlink *on the way* (any
//!   component but the last) that lies below a root is refused, even one pointing
//!   back inside the roots, since what is below it is not what the roots declare.
//!   Symlinks above the roots (`/srv` a link to `/data/srv`) are followed: they are
//!   how the host is laid out. The last component is judged as what it is: removing
//!   a symlink removes the link, never its target;
//! - nothing inside the state dir (journal, locks), nor anything that holds it, is a
//!   target of any writing action;
//! - a destructive walk of a tree (remove, retention, copy replacing a tree, move
//!   deleting its source, chown/chmod -R) stays on one filesystem: a tree with a mount
//!   point below it is refused before anything is touched (like `rm
//!   --one-file-system`, but refused outright rather than half done).

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use super::ActionCtx;

/// Why a path is not a valid target. Every message names the path as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("refusing to act on an empty path")]
    Empty,
    #[error("refusing to act on `/`")]
    FilesystemRoot,
    #[error("refusing to act on `{}`: it holds the runbook state dir `{}`", .target.display(), .state.display())]
    HoldsStateDir { target: PathBuf, state: PathBuf },
    #[error("refusing to act on `{}`: it is inside the runbook state dir `{}` (the journal and locks belong to the engine)", .target.display(), .state.display())]
    InStateDir { target: PathBuf, state: PathBuf },
    #[error("refusing to act on `{}`: the runbook declares no `roots`", .target.display())]
    NoRoots { target: PathBuf },
    #[error("refusing to act on `{}`: {} not below a declared root ({roots})", .target.display(), resolved_note(.target, .resolved))]
    NotBelowRoot {
        target: PathBuf,
        resolved: PathBuf,
        roots: String,
    },
    #[error("refusing to act on `{}`: `{}` on the way is a symlink (-> `{}`); destructive actions do not follow symlinks below a root", .target.display(), .link.display(), .points_to.display())]
    SymlinkOnTheWay {
        target: PathBuf,
        link: PathBuf,
        points_to: PathBuf,
    },
    #[error("refusing to act on `{}`: it is a mount point; destructive actions stay on one filesystem", .target.display())]
    IsMountPoint { target: PathBuf },
    #[error("refusing to act on `{}`: `{}` below it is a mount point (another filesystem); destructive actions stay on one filesystem", .target.display(), .mount.display())]
    MountBelow { target: PathBuf, mount: PathBuf },
    #[error("refusing to act on `{}`: too many symlinks to resolve it", .target.display())]
    SymlinkLoop { target: PathBuf },
}

fn resolved_note(target: &Path, resolved: &Path) -> String {
    if target == resolved {
        "it is".to_string()
    } else {
        format!("it resolves to `{}`, which is", resolved.display())
    }
}

/// How much of the target an action acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// The entry itself (a file replaced, a link removed, a directory listed).
    Entry,
    /// The entry and, when it is a directory, everything below it (a recursive walk):
    /// the tree must lie on one filesystem.
    Tree,
}

/// Where below a root the target may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Below {
    /// Strictly below: the root itself is never removed or replaced.
    Strictly,
    /// The root itself too (retention lists the root and deletes only below it).
    OrAt,
}

/// A target that passed the guard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cleared {
    /// The target with every component but the last resolved.
    pub resolved: PathBuf,
    /// The resolved root it lies below.
    pub root: PathBuf,
}

/// A path resolved as the kernel would, with every symlink followed on the way.
struct Resolution {
    path: PathBuf,
    /// Each symlink followed: where it is (itself resolved) and what it says.
    hops: Vec<(PathBuf, PathBuf)>,
}

const MAX_HOPS: usize = 40; // the kernel's own limit (ELOOP)

fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .unwrap_or_else(|_| PathBuf::from("/"))
            .join(path)
    }
}

/// Resolves `path` component by component. The last component is followed only when
/// `follow_last`. Components that do not exist are taken as written (the rest of the
/// path is then lexical: nothing below a missing entry can be a symlink).
fn resolve(path: &Path, follow_last: bool) -> Option<Resolution> {
    let mut queue: VecDeque<OsString> = VecDeque::new();
    let push_front = |queue: &mut VecDeque<OsString>, p: &Path| {
        for c in p.components().rev() {
            queue.push_front(c.as_os_str().to_os_string());
        }
    };
    push_front(&mut queue, &absolute(path));
    let mut out = PathBuf::from("/");
    let mut hops = Vec::new();
    while let Some(part) = queue.pop_front() {
        match Path::new(&part).components().next() {
            Some(Component::RootDir) => out = PathBuf::from("/"),
            Some(Component::ParentDir) => {
                out.pop();
            }
            Some(Component::Normal(name)) => {
                let candidate = out.join(name);
                let last = queue.is_empty();
                let is_link =
                    std::fs::symlink_metadata(&candidate).is_ok_and(|m| m.file_type().is_symlink());
                if is_link && (!last || follow_last) {
                    let text = std::fs::read_link(&candidate).ok()?;
                    hops.push((candidate, text.clone()));
                    if hops.len() > MAX_HOPS {
                        return None;
                    }
                    push_front(&mut queue, &text);
                } else {
                    out = candidate;
                }
            }
            _ => {}
        }
    }
    Some(Resolution { path: out, hops })
}

/// `path` absolute, with every symlink on the way (not the last component) resolved
/// as the kernel would; lexical where that fails (a symlink loop).
pub fn resolve_on_the_way(path: &Path) -> PathBuf {
    resolve(path, false).map_or_else(|| crate::world::normalize(path), |r| r.path)
}

/// A declared root or the state dir: where it is written, and what it resolves to.
struct Anchor {
    /// Its last component unresolved: a symlink found exactly here is the operator's.
    written: PathBuf,
    resolved: PathBuf,
}

fn anchor(path: &Path) -> Anchor {
    let written = resolve(path, false).map_or_else(|| crate::world::normalize(path), |r| r.path);
    let resolved = resolve(path, true).map_or_else(|| written.clone(), |r| r.path);
    Anchor { written, resolved }
}

fn shown(path: &Path) -> PathBuf {
    crate::world::normalize(path)
}

/// Every writing action's check: the target is not inside the state dir and does not
/// hold it (compared resolved, so a relative or symlinked spelling changes nothing).
/// Returns the target resolved up to its last component.
pub fn writable(path: &Path, ctx: &ActionCtx) -> Result<PathBuf, Refusal> {
    if path.as_os_str().is_empty() {
        return Err(Refusal::Empty);
    }
    let target = shown(path);
    let resolved = resolve(path, false)
        .ok_or_else(|| Refusal::SymlinkLoop {
            target: target.clone(),
        })?
        .path;
    let state = anchor(&ctx.state_dir);
    for s in [&state.resolved, &state.written] {
        if resolved.starts_with(s) {
            return Err(Refusal::InStateDir {
                target,
                state: state.resolved.clone(),
            });
        }
        if s.starts_with(&resolved) {
            return Err(Refusal::HoldsStateDir {
                target,
                state: state.resolved.clone(),
            });
        }
    }
    Ok(resolved)
}

/// A destructive or replacing action's check: [`writable`], and the target lies
/// below a declared root after resolution, with no symlink on the way below a root;
/// for [`Reach::Tree`], nothing below it is on another filesystem.
pub fn destructive(
    path: &Path,
    reach: Reach,
    below: Below,
    ctx: &ActionCtx,
) -> Result<Cleared, Refusal> {
    if path.as_os_str().is_empty() {
        return Err(Refusal::Empty);
    }
    let target = shown(path);
    let resolution = resolve(path, false).ok_or_else(|| Refusal::SymlinkLoop {
        target: target.clone(),
    })?;
    if resolution.path == Path::new("/") {
        return Err(Refusal::FilesystemRoot);
    }
    writable(path, ctx)?;
    if ctx.roots.is_empty() {
        return Err(Refusal::NoRoots { target });
    }
    let roots: Vec<Anchor> = ctx.roots.iter().map(|r| anchor(r)).collect();
    for (link, points_to) in &resolution.hops {
        let below_a_root = roots.iter().any(|r| {
            (link.starts_with(&r.resolved) && link != &r.resolved)
                || (link.starts_with(&r.written) && link != &r.written)
        });
        let is_a_root = roots.iter().any(|r| link == &r.written);
        if below_a_root && !is_a_root {
            return Err(Refusal::SymlinkOnTheWay {
                target,
                link: link.clone(),
                points_to: points_to.clone(),
            });
        }
    }
    let resolved = resolution.path;
    let root = roots.iter().map(|r| &r.resolved).find(|r| match below {
        Below::Strictly => resolved.starts_with(r) && &resolved != *r,
        Below::OrAt => resolved.starts_with(r),
    });
    let Some(root) = root.cloned() else {
        return Err(Refusal::NotBelowRoot {
            target,
            resolved,
            roots: roots
                .iter()
                .map(|r| r.resolved.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    if reach == Reach::Tree {
        one_filesystem(&target, &resolved)?;
    }
    Ok(Cleared { resolved, root })
}

/// Refuses a tree that is a mount point or has one below it. Both the mount table
/// (which also shows bind mounts of the same filesystem) and a walk comparing
/// `st_dev` (which needs no /proc) are consulted; neither follows symlinks.
fn one_filesystem(target: &Path, resolved: &Path) -> Result<(), Refusal> {
    let Ok(top) = std::fs::symlink_metadata(resolved) else {
        return Ok(()); // absent: nothing to walk
    };
    if !top.is_dir() {
        return Ok(());
    }
    let mounts = mount_points();
    if mounts.iter().any(|m| m == resolved)
        || resolved
            .parent()
            .and_then(|p| std::fs::symlink_metadata(p).ok())
            .is_some_and(|p| p.dev() != top.dev())
    {
        return Err(Refusal::IsMountPoint {
            target: target.to_path_buf(),
        });
    }
    if let Some(mount) = mounts
        .iter()
        .filter(|m| m.starts_with(resolved) && m.as_path() != resolved)
        .min()
    {
        return Err(Refusal::MountBelow {
            target: target.to_path_buf(),
            mount: mount.clone(),
        });
    }
    let walk = walkdir::WalkDir::new(resolved)
        .follow_links(false)
        .follow_root_links(false);
    for entry in walk.into_iter().flatten() {
        if entry.file_type().is_dir() && entry.metadata().is_ok_and(|m| m.dev() != top.dev()) {
            return Err(Refusal::MountBelow {
                target: target.to_path_buf(),
                mount: entry.into_path(),
            });
        }
    }
    Ok(())
}

/// The mount points of this process's mount namespace (empty without /proc).
fn mount_points() -> Vec<PathBuf> {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mount_field(field)))
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as octal escapes (`\040`).
fn unescape_mount_field(field: &str) -> OsString {
    use std::os::unix::ffi::OsStringExt;
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value = bytes[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            out.push(value as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    OsString::from_vec(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(
            unescape_mount_field(r"/mnt/with\040space"),
            OsString::from("/mnt/with space")
        );
        assert_eq!(unescape_mount_field(r"/a\\b"), OsString::from(r"/a\\b"));
    }

    #[test]
    fn resolution_follows_links_on_the_way_and_reports_them() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().canonicalize().unwrap();
        std::fs::create_dir_all(base.join("real/sub")).unwrap();
        std::os::unix::fs::symlink(base.join("real"), base.join("link")).unwrap();
        let r = resolve(&base.join("link/sub/../sub/x"), false).unwrap();
        assert_eq!(r.path, base.join("real/sub/x"));
        assert_eq!(r.hops, vec![(base.join("link"), base.join("real"))]);
        // The last component stays what it is unless asked.
        let r = resolve(&base.join("link"), false).unwrap();
        assert_eq!(r.path, base.join("link"));
        assert_eq!(
            resolve(&base.join("link"), true).unwrap().path,
            base.join("real")
        );
    }
}
