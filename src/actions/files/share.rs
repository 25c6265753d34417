//! Sharing the unchanged files of a tree copy with an earlier copy of the same tree
//! (`copy`'s `link_from`, rsync's `--link-dest`): an incremental snapshot costs the
//! files that changed, not the whole tree.
//!
//! A file is shared only when the earlier copy's file at the same relative path is what
//! copying it again would make: a regular file (reached through real directories, never
//! a symlink) with the same size, modification time to the nanosecond, mode, owner and
//! extended attributes, and not the source file itself. It is then a hard link to the
//! earlier file; where the kernel refuses the link (another filesystem, too many links,
//! protected hard links) a reflink (FICLONE: shared extents, a new inode); where that
//! is refused too, the caller copies the file as usual.
//!
//! Sharing is safe only as long as nothing ever writes through a shared inode: a
//! snapshot's files are never opened for writing, chmodded or chowned after the copy
//! (a restore copies out of a snapshot, deleting a snapshot only unlinks), and the copy
//! itself gives a shared file no metadata (which is why `link_from` does not go with
//! `owner` or `mode`).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::actions::ActionError;

/// How one file was shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shared {
    /// A hard link: one inode, no new data, no new inode.
    Linked,
    /// A reflink: a new inode whose data extents are the earlier file's.
    Reflinked,
}

/// Files and bytes of a tree copy by how they got there.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tally {
    pub files: u64,
    pub bytes: u64,
    pub linked: u64,
    pub linked_bytes: u64,
    pub reflinked: u64,
    pub reflinked_bytes: u64,
}

impl Tally {
    pub(crate) fn count(&mut self, how: Option<Shared>, len: u64) {
        self.files += 1;
        self.bytes += len;
        match how {
            Some(Shared::Linked) => {
                self.linked += 1;
                self.linked_bytes += len;
            }
            Some(Shared::Reflinked) => {
                self.reflinked += 1;
                self.reflinked_bytes += len;
            }
            None => {}
        }
    }

    /// Files and bytes that were written anew.
    pub(crate) fn copied(&self) -> (u64, u64) {
        (
            self.files - self.linked - self.reflinked,
            self.bytes - self.linked_bytes - self.reflinked_bytes,
        )
    }
}

/// The earlier copy a tree copy shares its unchanged files with, walked alongside the
/// source.
pub(crate) struct LinkFrom {
    base: PathBuf,
    /// Relative directories whose counterpart below `base` is a real directory (not a
    /// symlink): only files below those are candidates, so a symlink in the earlier
    /// copy can never lead the copy to a file outside it.
    dirs: HashSet<PathBuf>,
    /// (dev, ino) of an earlier file -> (dev, ino) of the source file it was shared for:
    /// one earlier inode never stands for two different source files, or the copy
    /// would hard-link files the source keeps apart.
    used: HashMap<(u64, u64), (u64, u64)>,
    /// The identity this process gives the files it creates, for the owner comparison.
    euid: u32,
    egid: u32,
}

impl LinkFrom {
    /// None when `base` is not a directory (the first snapshot: everything is copied).
    /// A symlink at `base` itself is followed, as a `from` path is.
    pub(crate) fn open(base: &Path) -> Option<LinkFrom> {
        let base = fs::canonicalize(base).ok()?;
        if !base.is_dir() {
            return None;
        }
        // SAFETY: geteuid/getegid cannot fail and touch no memory.
        let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
        Some(LinkFrom {
            base,
            dirs: HashSet::from([PathBuf::new()]),
            used: HashMap::new(),
            euid,
            egid,
        })
    }

    /// Records the source directory `rel` (walked before its contents).
    pub(crate) fn enter_dir(&mut self, rel: &Path) {
        let parent_ok = rel.parent().is_none_or(|p| self.dirs.contains(p));
        if parent_ok
            && !rel.as_os_str().is_empty()
            && fs::symlink_metadata(self.base.join(rel)).is_ok_and(|m| m.is_dir())
        {
            self.dirs.insert(rel.to_path_buf());
        }
    }

    /// The earlier file that copying the source file `src` (at `rel`, with `meta`)
    /// would reproduce, with its metadata.
    pub(crate) fn candidate(
        &self,
        src: &Path,
        rel: &Path,
        meta: &fs::Metadata,
    ) -> Option<(PathBuf, fs::Metadata)> {
        let parent = rel.parent().unwrap_or(Path::new(""));
        if !self.dirs.contains(parent) {
            return None;
        }
        let path = self.base.join(rel);
        let old = fs::symlink_metadata(&path).ok()?;
        let same_owner = |old_id: u32, src_id: u32, ours: u32| {
            // What the copy gives it: the source's id where it may set it (root),
            // otherwise its own.
            old_id == src_id || (self.euid != 0 && old_id == ours)
        };
        let unchanged = old.is_file()
            && (old.dev(), old.ino()) != (meta.dev(), meta.ino())
            && old.len() == meta.len()
            && old.mtime() == meta.mtime()
            && old.mtime_nsec() == meta.mtime_nsec()
            && old.mode() == meta.mode()
            && same_owner(old.uid(), meta.uid(), self.euid)
            && same_owner(old.gid(), meta.gid(), self.egid)
            && same_xattrs(src, &path);
        unchanged.then_some((path, old))
    }

    /// Makes `dst` (which must not exist) share `old`, the candidate for the source
    /// file with `meta`; None when it cannot be shared and must be copied.
    pub(crate) fn share(
        &mut self,
        old: &Path,
        old_meta: &fs::Metadata,
        meta: &fs::Metadata,
        dst: &Path,
    ) -> Result<Option<Shared>, ActionError> {
        let key = (old_meta.dev(), old_meta.ino());
        let source = (meta.dev(), meta.ino());
        if self.used.get(&key).is_some_and(|s| *s != source) {
            return Ok(None);
        }
        let how = match fs::hard_link(old, dst) {
            Ok(()) => Some(Shared::Linked),
            Err(e) if refused(&e) => reflink(old, dst, meta)?.then_some(Shared::Reflinked),
            Err(e) => return Err(ActionError::io(format!("link {}", dst.display()))(e)),
        };
        if how == Some(Shared::Linked) {
            self.used.insert(key, source);
        }
        Ok(how)
    }
}

/// A refusal that a copy works around: another filesystem, too many links, a
/// filesystem without hard links or one that protects them, or an earlier file
/// deleted since it was judged.
fn refused(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EXDEV
                | libc::EMLINK
                | libc::EPERM
                | libc::EOPNOTSUPP
                | libc::EACCES
                | libc::ENOENT
        )
    )
}

/// The extended attributes of `a` and `b` are the same (both have none, mostly).
fn same_xattrs(a: &Path, b: &Path) -> bool {
    let attrs = |p: &Path| -> Option<Vec<(std::ffi::OsString, Option<Vec<u8>>)>> {
        let mut names: Vec<_> = xattr::list(p).ok()?.collect();
        names.sort();
        Some(
            names
                .into_iter()
                .map(|n| {
                    let v = xattr::get(p, &n).ok().flatten();
                    (n, v)
                })
                .collect(),
        )
    };
    match (attrs(a), attrs(b)) {
        (Some(x), Some(y)) => x == y,
        // A filesystem without xattrs on both sides: nothing to differ.
        (None, None) => true,
        _ => false,
    }
}

/// Creates `dst` as a reflink of `old` and gives it the source's metadata; false (and
/// no `dst`) where the filesystem cannot clone.
fn reflink(old: &Path, dst: &Path, meta: &fs::Metadata) -> Result<bool, ActionError> {
    use std::os::unix::fs::OpenOptionsExt;
    // Gone since it was judged (a retention run deleting the earlier snapshot): copy.
    let Ok(input) = File::open(old) else {
        return Ok(false);
    };
    let output = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)
        .map_err(ActionError::io(format!("create {}", dst.display())))?;
    // SAFETY: two valid descriptors; FICLONE only makes `output` share `input`'s extents.
    let rc = unsafe { libc::ioctl(output.as_raw_fd(), libc::FICLONE, input.as_raw_fd()) };
    if rc != 0 {
        drop(output);
        fs::remove_file(dst).map_err(ActionError::io(format!("remove {}", dst.display())))?;
        return Ok(false);
    }
    drop(output);
    fs::set_permissions(dst, meta.permissions())
        .map_err(ActionError::io(format!("chmod {}", dst.display())))?;
    super::tree::copy_times_and_owner(meta, dst)?;
    Ok(true)
}

/// What a copy of the tree `from` sharing with `link_from` would share, judged without
/// writing anything (the plan): (files, bytes) that would be shared, and the bytes on
/// disk of the files that would be copied.
pub(crate) fn preview(from: &Path, link_from: &Path) -> Option<(u64, u64, u64)> {
    let mut base = LinkFrom::open(link_from)?;
    let (mut files, mut bytes, mut allocated) = (0, 0, 0);
    for entry in walkdir::WalkDir::new(from).into_iter().flatten() {
        let rel = entry.path().strip_prefix(from).unwrap_or(Path::new(""));
        let Ok(meta) = entry.path().symlink_metadata() else {
            continue;
        };
        if meta.is_dir() {
            base.enter_dir(rel);
        } else if meta.is_file() {
            let shared = base
                .candidate(entry.path(), rel, &meta)
                .filter(|(_, old)| {
                    let key = (old.dev(), old.ino());
                    let source = (meta.dev(), meta.ino());
                    let free = base.used.get(&key).is_none_or(|s| *s == source);
                    base.used.insert(key, source);
                    free
                })
                .is_some();
            if shared {
                files += 1;
                bytes += meta.len();
            } else {
                allocated += meta.len().min(meta.blocks() * 512);
            }
        }
    }
    Some((files, bytes, allocated))
}
