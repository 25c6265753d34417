//! Whether what a step writes fits: one check shared by every action that writes data
//! (copy, move across filesystems, write-file, sqlite-backup), counting what the
//! earlier steps of the same plan will write on the same filesystem.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::show;
use crate::world::{World, normalize};

/// Free bytes for an unprivileged writer on the filesystem holding `dir`.
#[allow(clippy::useless_conversion)] // the fields are u32 on 32-bit targets
pub(crate) fn free_bytes(dir: &Path) -> Option<u64> {
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: a plain C struct, filled by statvfs below.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (rc == 0).then(|| u64::from(st.f_bavail) * u64::from(st.f_frsize))
}

/// The nearest directory at or above `dir` that exists on disk.
pub(crate) fn existing_dir(dir: &Path) -> PathBuf {
    normalize(dir)
        .ancestors()
        .find(|a| a.is_dir())
        .map_or_else(|| PathBuf::from("/"), Path::to_path_buf)
}

/// The filesystem (st_dev) that an entry created at `path` lands on.
pub(crate) fn device_of(path: &Path) -> Option<u64> {
    let parent = normalize(path)
        .parent()
        .map_or_else(|| PathBuf::from("/"), Path::to_path_buf);
    std::fs::metadata(existing_dir(&parent))
        .ok()
        .map(|m| m.dev())
}

/// The filesystem (st_dev) that the existing entry `path` is on (not followed).
pub(crate) fn device_of_entry(path: &Path) -> Option<u64> {
    std::fs::symlink_metadata(path).ok().map(|m| m.dev())
}

/// Judges whether `need` more bytes (`what`, created at `dest`) fit on `dest`'s
/// filesystem after what the earlier steps of the plan write there, and, if they do,
/// counts them for the steps after. An unreadable filesystem is not judged.
pub(crate) fn reserve(world: &mut World, dest: &Path, need: u64, what: &str) -> Result<(), String> {
    let parent = normalize(dest)
        .parent()
        .map_or_else(|| PathBuf::from("/"), Path::to_path_buf);
    let dir = existing_dir(&parent);
    let (Some(dev), Some(free)) = (
        std::fs::metadata(&dir).ok().map(|m| m.dev()),
        free_bytes(&dir),
    ) else {
        return Ok(());
    };
    let earlier = world.bytes_written_on(dev);
    if earlier.saturating_add(need) > free {
        return Err(format!(
            "not enough room for {what} on the filesystem of {}: it needs {need} bytes ({free} bytes free, earlier steps write {earlier})",
            show(&dir)
        ));
    }
    world.will_write(dev, need);
    Ok(())
}
