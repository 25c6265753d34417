//! Copying files and trees with their metadata, and comparing a copy with its source.

use std::collections::HashMap;
use std::fs::{self, File, FileTimes};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::owner::Owner;
use super::share::{LinkFrom, Tally};
use crate::actions::{ActionCtx, ActionError};

/// What a copy of `path` would read, found without reading any data.
#[derive(Debug, Default)]
pub(crate) struct Survey {
    pub files: u64,
    /// Sum of the files' lengths.
    pub bytes: u64,
    /// What the copy takes on disk: holes are not written, so a sparse file counts
    /// only its allocated blocks.
    pub allocated: u64,
    /// The first entry that is neither a file, a directory nor a symlink, and its kind.
    pub special: Option<(PathBuf, &'static str)>,
}

/// The kind of a FIFO, socket or device, which a copy never reads.
pub(crate) fn special_kind(ft: fs::FileType) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_fifo() {
        Some("a FIFO (named pipe)")
    } else if ft.is_socket() {
        Some("a socket")
    } else if ft.is_block_device() {
        Some("a block device")
    } else if ft.is_char_device() {
        Some("a character device")
    } else {
        None
    }
}

/// Surveys `path` (a file or a tree; symlinks are not followed) for a copy.
pub(crate) fn survey(path: &Path) -> Survey {
    let mut out = Survey::default();
    for entry in walkdir::WalkDir::new(path)
        .follow_root_links(false)
        .into_iter()
        .flatten()
    {
        let Ok(m) = entry.metadata() else { continue };
        if m.is_file() {
            out.files += 1;
            out.bytes += m.len();
            out.allocated += m.len().min(m.blocks() * 512);
        } else if let Some(kind) = special_kind(m.file_type())
            && out.special.is_none()
        {
            out.special = Some((entry.into_path(), kind));
        }
    }
    out
}

/// The refusal of a copy whose source holds a special file.
pub(crate) fn special_refusal(path: &Path, kind: &str) -> String {
    format!(
        "{} is {kind}: a copy takes only files, directories and symlinks (reading it could block or never end)",
        super::show(path)
    )
}

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

/// How a copy treats metadata, and where it reports progress.
#[derive(Default)]
pub(crate) struct CopyOptions {
    /// Give every copied entry this owner instead of the source's.
    pub owner: Option<Owner>,
    /// Advanced by the bytes of each copied file.
    pub progress: Option<indicatif::ProgressBar>,
    /// The phase (see `staging::phase`) reached once a tree copy is under way: the
    /// first file is copied, the rest not.
    pub phase: Option<&'static str>,
}

/// Copies extended attributes where the filesystems have them (a missing or
/// unsupported xattr is not an error: `cp -a` does the same).
fn copy_xattrs(src: &Path, dst: &Path) {
    let Ok(names) = xattr::list(src) else { return };
    for name in names {
        if let Ok(Some(value)) = xattr::get(src, &name) {
            let _ = xattr::set(dst, &name, &value);
        }
    }
}

/// Copies one file's bytes and metadata; the caller decides when to sync.
fn copy_file_data(
    src: &Path,
    dst: &Path,
    meta: &fs::Metadata,
    opts: &CopyOptions,
) -> Result<u64, ActionError> {
    if let Some(kind) = special_kind(meta.file_type()) {
        return Err(ActionError::Failed(special_refusal(src, kind)));
    }
    let bytes = copy_sparse(src, dst, meta).map_err(ActionError::io(format!(
        "copy {} to {}",
        src.display(),
        dst.display()
    )))?;
    fs::set_permissions(dst, meta.permissions())
        .map_err(ActionError::io(format!("chmod {}", dst.display())))?;
    copy_xattrs(src, dst);
    copy_times_and_owner(meta, dst)?;
    if let Some(owner) = &opts.owner {
        owner.apply(dst)?;
    }
    if let Some(bar) = &opts.progress {
        bar.inc(bytes);
    }
    Ok(bytes)
}

/// Copies the data segments of `src` into the new file `dst` and gives it `src`'s
/// length, so holes stay holes (as `cp -a` keeps them): SEEK_DATA/SEEK_HOLE find the
/// segments, copy_file_range copies each (reflinking where the filesystem can).
fn copy_sparse(src: &Path, dst: &Path, meta: &fs::Metadata) -> std::io::Result<u64> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let input = File::open(src)?;
    // Always a new file (its partial, or a name in a new tree): never an existing file
    // opened for writing, which could be an inode a snapshot shares (`link_from`).
    let output = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(meta.permissions().mode() & 0o777)
        .open(dst)?;
    let len = input.metadata()?.len();
    let fd_in = input.as_raw_fd();
    let mut pos: u64 = 0;
    while pos < len {
        let Some(data) = seek(fd_in, pos, libc::SEEK_DATA)? else {
            break; // only a hole is left
        };
        let hole = seek(fd_in, data, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        copy_range(&input, &output, data, hole.saturating_sub(data))?;
        pos = hole.max(data + 1);
    }
    output.set_len(len)?;
    Ok(len)
}

/// lseek for SEEK_DATA/SEEK_HOLE: None past the last data (ENXIO); a filesystem that
/// cannot tell holes answers as if the whole file were data.
fn seek(fd: std::os::fd::RawFd, from: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    // SAFETY: a valid open descriptor; lseek only moves its offset.
    let at = unsafe { libc::lseek(fd, from as libc::off_t, whence) };
    if at >= 0 {
        return Ok(Some(at as u64));
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENXIO) => Ok(None),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) if whence == libc::SEEK_DATA => Ok(Some(from)),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(None),
        _ => Err(err),
    }
}

/// Copies `len` bytes at offset `at` of `input` to the same offset of `output`:
/// copy_file_range, or read/write where the kernel or filesystems refuse it.
fn copy_range(input: &File, output: &File, at: u64, len: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let (mut off_in, mut off_out) = (at as libc::loff_t, at as libc::loff_t);
    let end = at + len;
    while (off_in as u64) < end {
        let want = ((end - off_in as u64).min(1 << 30)) as usize;
        // SAFETY: valid descriptors and offsets owned by this frame.
        let n = unsafe {
            libc::copy_file_range(
                input.as_raw_fd(),
                &mut off_in,
                output.as_raw_fd(),
                &mut off_out,
                want,
                0,
            )
        };
        if n > 0 {
            continue;
        }
        if n == 0 {
            return Ok(()); // the source shrank under us
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL | libc::EPERM) => {}
            Some(libc::EINTR) => continue,
            _ => return Err(err),
        }
        let mut buf = vec![0u8; 1 << 20];
        let mut pos = off_in as u64;
        while pos < end {
            let want = (end - pos).min(buf.len() as u64) as usize;
            let n = input.read_at(&mut buf[..want], pos)?;
            if n == 0 {
                return Ok(());
            }
            output.write_all_at(&buf[..n], pos)?;
            pos += n as u64;
        }
        return Ok(());
    }
    Ok(())
}

/// Copies one file and fsyncs it.
pub(crate) fn copy_file(
    src: &Path,
    dst: &Path,
    meta: &fs::Metadata,
    opts: &CopyOptions,
) -> Result<u64, ActionError> {
    let bytes = copy_file_data(src, dst, meta, opts)?;
    File::open(dst)
        .and_then(|f| f.sync_all())
        .map_err(ActionError::io(format!("fsync {}", dst.display())))?;
    Ok(bytes)
}

/// Copies a tree into `dst` (which must not exist), like `cp -a`: modes, times, owners,
/// xattrs, symlinks as symlinks, hard links as hard links. Returns (files, bytes).
/// Durability: one syncfs of the destination filesystem at the end instead of an fsync
/// per file (same guarantee once it returns, far fewer flushes).
pub(crate) fn copy_tree(
    src: &Path,
    dst: &Path,
    ctx: &ActionCtx,
    opts: &CopyOptions,
) -> Result<(u64, u64), ActionError> {
    copy_tree_sharing(src, dst, ctx, opts, None).map(|t| (t.files, t.bytes))
}

/// As [`copy_tree`], sharing the files that `link_from` (an earlier copy of the same
/// tree) already holds unchanged instead of copying them (see `share`).
pub(crate) fn copy_tree_sharing(
    src: &Path,
    dst: &Path,
    ctx: &ActionCtx,
    opts: &CopyOptions,
    mut link_from: Option<LinkFrom>,
) -> Result<Tally, ActionError> {
    let mut tally = Tally::default();
    let mut dirs = Vec::new();
    // (device, inode) of a multiply-linked file -> its first copy.
    let mut linked: HashMap<(u64, u64), PathBuf> = HashMap::new();
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
            if let Some(base) = &mut link_from {
                base.enter_dir(rel);
            }
            copy_xattrs(entry.path(), &target);
            dirs.push((target, meta));
        } else if ft.is_symlink() {
            let link = fs::read_link(entry.path()).map_err(ActionError::io(format!(
                "readlink {}",
                entry.path().display()
            )))?;
            std::os::unix::fs::symlink(&link, &target)
                .map_err(ActionError::io(format!("symlink {}", target.display())))?;
            copy_times_and_owner(&meta, &target)?;
            if let Some(owner) = &opts.owner {
                owner.apply(&target)?;
            }
        } else if ft.is_file() {
            let key = (meta.dev(), meta.ino());
            if meta.nlink() > 1 {
                if let Some(first) = linked.get(&key) {
                    fs::hard_link(first, &target)
                        .map_err(ActionError::io(format!("link {}", target.display())))?;
                    continue;
                }
                linked.insert(key, target.clone());
            }
            let shared = match &mut link_from {
                Some(base) => match base.candidate(entry.path(), rel, &meta) {
                    Some((old, old_meta)) => base.share(&old, &old_meta, &meta, &target)?,
                    None => None,
                },
                None => None,
            };
            let len = match shared {
                None => copy_file_data(entry.path(), &target, &meta, opts)?,
                Some(_) => {
                    if let Some(bar) = &opts.progress {
                        bar.inc(meta.len());
                    }
                    meta.len()
                }
            };
            tally.count(shared, len);
            if tally.files == 1
                && let Some(phase) = opts.phase
            {
                super::staging::phase(phase);
            }
        } else {
            let kind = special_kind(ft).unwrap_or("not a file, a directory nor a symlink");
            return Err(ActionError::Failed(special_refusal(entry.path(), kind)));
        }
    }
    // Directories last, deepest first: creating entries inside them changes their times.
    for (dir, meta) in dirs.iter().rev() {
        fs::set_permissions(dir, meta.permissions())
            .map_err(ActionError::io(format!("chmod {}", dir.display())))?;
        copy_times_and_owner(meta, dir)?;
        if let Some(owner) = &opts.owner {
            owner.apply(dir)?;
        }
    }
    syncfs(dst)?;
    Ok(tally)
}

/// Flushes the filesystem holding `path`.
pub(crate) fn syncfs(path: &Path) -> Result<(), ActionError> {
    let dir = File::open(path).map_err(ActionError::io(format!("open {}", path.display())))?;
    // SAFETY: a valid open descriptor; syncfs only flushes.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(ActionError::io(format!("syncfs {}", path.display()))(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}
