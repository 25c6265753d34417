//! Copying files and trees with their metadata, and comparing a copy with its source.

use std::fs::{self, File, FileTimes};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::fsync_dir;
use crate::actions::{ActionCtx, ActionError};

/// Counts files and bytes below `path` (read-only).
pub(crate) fn tree_size(path: &Path) -> (u64, u64) {
    let mut files = 0;
    let mut bytes = 0;
    for entry in walkdir::WalkDir::new(path).into_iter().flatten() {
        if entry.file_type().is_file() {
            files += 1;
            bytes += entry.metadata().map(|m| m.len()).unwrap_or(0);
        }
    }
    (files, bytes)
}

pub(crate) fn same_file_content(a: &Path, b: &Path) -> bool {
    let (Ok(ma), Ok(mb)) = (fs::metadata(a), fs::metadata(b)) else {
        return false;
    };
    if ma.len() != mb.len() {
        return false;
    }
    let (Ok(mut fa), Ok(mut fb)) = (File::open(a), File::open(b)) else {
        return false;
    };
    let mut ba = vec![0u8; 1 << 16];
    let mut bb = vec![0u8; 1 << 16];
    loop {
        let n = match fa.read(&mut ba) {
            Ok(n) => n,
            Err(_) => return false,
        };
        if n == 0 {
            return true;
        }
        if fb.read_exact(&mut bb[..n]).is_err() || ba[..n] != bb[..n] {
            return false;
        }
    }
}

/// Relative path, file type bits, size, mtime and symlink target of one tree entry.
type TreeEntry = (PathBuf, u32, u64, i64, Option<PathBuf>);

/// A copy made by this action is "the same" as its source: same relative paths and
/// types, same file sizes and modification times (the copy keeps times), same symlink
/// targets. Single files are compared byte for byte.
pub(crate) fn same_copy(from: &Path, to: &Path) -> bool {
    let (Ok(mf), Ok(mt)) = (fs::symlink_metadata(from), fs::symlink_metadata(to)) else {
        return false;
    };
    if mf.is_file() {
        return mt.is_file() && same_file_content(from, to);
    }
    if !(mf.is_dir() && mt.is_dir()) {
        return false;
    }
    let listing = |root: &Path| -> Option<Vec<TreeEntry>> {
        let mut out = Vec::new();
        for entry in walkdir::WalkDir::new(root).sort_by_file_name() {
            let entry = entry.ok()?;
            let m = entry.metadata().ok()?;
            let rel = entry.path().strip_prefix(root).ok()?.to_path_buf();
            let link = entry
                .path_is_symlink()
                .then(|| fs::read_link(entry.path()).ok())
                .flatten();
            let (len, mtime) = if m.is_file() {
                (m.len(), m.mtime())
            } else {
                (0, 0)
            };
            out.push((rel, m.mode() & 0o170000, len, mtime, link));
        }
        Some(out)
    };
    matches!((listing(from), listing(to)), (Some(a), Some(b)) if a == b)
}

pub(crate) fn copy_times_and_owner(meta: &fs::Metadata, dst: &Path) -> Result<(), ActionError> {
    // Ownership is kept when we may set it (root); otherwise the copy is ours, as cp -a.
    let _ = std::os::unix::fs::lchown(dst, Some(meta.uid()), Some(meta.gid()));
    if !meta.file_type().is_symlink() {
        let times = FileTimes::new()
            .set_accessed(meta.accessed().map_err(ActionError::io("read atime"))?)
            .set_modified(meta.modified().map_err(ActionError::io("read mtime"))?);
        File::options()
            .read(true)
            .open(dst)
            .and_then(|f| f.set_times(times))
            .map_err(ActionError::io(format!("set times on {}", dst.display())))?;
    }
    Ok(())
}

/// Copies one file (the kernel's copy_file_range through std::fs::copy), then fsyncs it.
pub(crate) fn copy_file(src: &Path, dst: &Path, meta: &fs::Metadata) -> Result<u64, ActionError> {
    let bytes = fs::copy(src, dst).map_err(ActionError::io(format!(
        "copy {} to {}",
        src.display(),
        dst.display()
    )))?;
    fs::set_permissions(dst, meta.permissions())
        .map_err(ActionError::io(format!("chmod {}", dst.display())))?;
    copy_times_and_owner(meta, dst)?;
    File::open(dst)
        .and_then(|f| f.sync_all())
        .map_err(ActionError::io(format!("fsync {}", dst.display())))?;
    Ok(bytes)
}

/// Copies a tree into `dst` (which must not exist); returns (files, bytes).
pub(crate) fn copy_tree(
    src: &Path,
    dst: &Path,
    ctx: &ActionCtx,
) -> Result<(u64, u64), ActionError> {
    let mut files = 0;
    let mut bytes = 0;
    let mut dirs = Vec::new();
    for entry in walkdir::WalkDir::new(src) {
        let entry =
            entry.map_err(|e| ActionError::Failed(format!("walk {}: {e}", src.display())))?;
        if ctx.deadline.is_some_and(|d| std::time::Instant::now() > d) {
            return Err(ActionError::Failed(
                "step timeout reached during copy".into(),
            ));
        }
        let rel = entry.path().strip_prefix(src).unwrap_or(Path::new(""));
        let target = dst.join(rel);
        let meta = entry
            .path()
            .symlink_metadata()
            .map_err(ActionError::io(format!("stat {}", entry.path().display())))?;
        let ft = meta.file_type();
        if ft.is_dir() {
            fs::create_dir(&target)
                .map_err(ActionError::io(format!("mkdir {}", target.display())))?;
            dirs.push((target, meta));
        } else if ft.is_symlink() {
            let link = fs::read_link(entry.path()).map_err(ActionError::io(format!(
                "readlink {}",
                entry.path().display()
            )))?;
            std::os::unix::fs::symlink(&link, &target)
                .map_err(ActionError::io(format!("symlink {}", target.display())))?;
            copy_times_and_owner(&meta, &target)?;
        } else if ft.is_file() {
            bytes += copy_file(entry.path(), &target, &meta)?;
            files += 1;
        } else {
            return Err(ActionError::Failed(format!(
                "{} is neither a file, a directory nor a symlink",
                entry.path().display()
            )));
        }
    }
    // Directories last, deepest first: creating entries inside them changes their times.
    for (dir, meta) in dirs.iter().rev() {
        fs::set_permissions(dir, meta.permissions())
            .map_err(ActionError::io(format!("chmod {}", dir.display())))?;
        copy_times_and_owner(meta, dir)?;
        fsync_dir(dir)?;
    }
    Ok((files, bytes))
}
