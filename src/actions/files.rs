//! File actions: mkdir, copy, write-file, remove.
//!
//! Every write goes to a temporary sibling first and is renamed into place after an
//! fsync, so an interrupted step leaves either the old state or the new one, never a
//! half-written file under the real name.

use std::fs::{self, File, FileTimes};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::{Action, ActionCtx, ActionError, Effect, Mode, Outputs, Verdict, check_destructive};
use crate::world::{Node, World};

pub(crate) fn show(p: &Path) -> String {
    format!("`{}`", p.display())
}

/// The parent of `path` must be (or be predicted to be) a directory.
pub(crate) fn parent_is_dir(path: &Path, world: &World) -> Result<(), String> {
    let parent = crate::world::normalize(path)
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));
    match world.node(&parent) {
        Node::Dir => Ok(()),
        Node::Missing => Err(format!(
            "parent directory {} does not exist (add a `mkdir` step before this one)",
            show(&parent)
        )),
        _ => Err(format!("{} is not a directory", show(&parent))),
    }
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

fn mode_of(path: &Path) -> Option<u32> {
    fs::metadata(path)
        .ok()
        .map(|m| m.permissions().mode() & 0o7777)
}

// ---------------------------------------------------------------------------- mkdir

/// Create a directory and its missing parents.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MkdirArgs {
    /// Directory to create.
    pub path: PathBuf,
    /// Octal mode for the directory (e.g. "0750"); default: per umask.
    #[serde(default)]
    pub mode: Option<Mode>,
}

pub struct Mkdir;

impl Action for Mkdir {
    type Args = MkdirArgs;
    const NAME: &'static str = "mkdir";
    const OUTPUTS: &'static [&'static str] = &["path", "created"];
    const SUMMARY: &'static str = "create a directory (and its parents); no change if it exists";

    fn effect(&self, _: &MkdirArgs) -> Effect {
        Effect::Idempotent
    }

    fn check_static(&self, args: &MkdirArgs) -> Result<(), (String, String)> {
        match &args.mode {
            Some(m) => m.check_static().map_err(|e| ("mode".into(), e)),
            None => Ok(()),
        }
    }

    fn preflight(&self, args: &MkdirArgs, world: &mut World, _: &ActionCtx) -> Verdict {
        let want = match args.mode.as_ref().map(Mode::bits).transpose() {
            Ok(m) => m,
            Err(e) => return Verdict::WouldFail(e),
        };
        let verdict = match world.node(&args.path) {
            Node::Dir => match want {
                Some(bits)
                    if !world.is_predicted(&args.path) && mode_of(&args.path) != Some(bits) =>
                {
                    Verdict::WillChange(format!("set mode {bits:04o} on {}", show(&args.path)))
                }
                _ => Verdict::NoChange(format!("{} exists", show(&args.path))),
            },
            Node::Missing => {
                let blocked = args
                    .path
                    .ancestors()
                    .skip(1)
                    .find(|a| world.node(a) != Node::Missing)
                    .filter(|a| world.node(a) != Node::Dir);
                match blocked {
                    Some(a) => Verdict::WouldFail(format!("{} is not a directory", show(a))),
                    None => Verdict::WillChange(format!("create {}", show(&args.path))),
                }
            }
            _ => Verdict::WouldFail(format!(
                "{} exists and is not a directory",
                show(&args.path)
            )),
        };
        if !matches!(verdict, Verdict::WouldFail(_)) {
            world.predict_dir(&args.path);
        }
        verdict
    }

    fn execute(&self, args: &MkdirArgs, _: &ActionCtx) -> Result<Outputs, ActionError> {
        let existed = args.path.is_dir();
        fs::create_dir_all(&args.path)
            .map_err(ActionError::io(format!("create {}", args.path.display())))?;
        if let Some(mode) = &args.mode {
            let bits = mode.bits().map_err(ActionError::Failed)?;
            fs::set_permissions(&args.path, fs::Permissions::from_mode(bits))
                .map_err(ActionError::io(format!("chmod {}", args.path.display())))?;
        }
        fsync_parent(&args.path)?;
        let mut out = Outputs::new();
        out.insert("path".into(), json!(args.path));
        out.insert("created".into(), json!(!existed));
        Ok(out)
    }
}

// ----------------------------------------------------------------------------- copy

/// What to do when the destination exists and differs from the source.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Overwrite {
    /// Fail (the default): nothing is overwritten by accident.
    #[default]
    Never,
    /// Replace it atomically; the destination must be below a declared root.
    Replace,
}

/// Copy a file or a directory tree, keeping modes, times, owners and symlinks.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CopyArgs {
    /// Source file or directory.
    pub from: PathBuf,
    /// Destination path (the copy itself, not the directory to put it in). Its parent
    /// must exist.
    pub to: PathBuf,
    /// `never` (default) or `replace`.
    #[serde(default)]
    pub overwrite: Overwrite,
    /// Octal mode for the copied file (or the top directory of a tree).
    #[serde(default)]
    pub mode: Option<Mode>,
}

pub struct Copy;

/// Counts files and bytes below `path` (read-only).
fn tree_size(path: &Path) -> (u64, u64) {
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

fn same_file_content(a: &Path, b: &Path) -> bool {
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
fn same_copy(from: &Path, to: &Path) -> bool {
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

fn copy_times_and_owner(meta: &fs::Metadata, dst: &Path) -> Result<(), ActionError> {
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
fn copy_file(src: &Path, dst: &Path, meta: &fs::Metadata) -> Result<u64, ActionError> {
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
fn copy_tree(src: &Path, dst: &Path, ctx: &ActionCtx) -> Result<(u64, u64), ActionError> {
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

impl Action for Copy {
    type Args = CopyArgs;
    const NAME: &'static str = "copy";
    const OUTPUTS: &'static [&'static str] = &["path", "files", "bytes", "changed"];
    const SUMMARY: &'static str = "copy a file or tree atomically (temp sibling + fsync + rename), keeping modes, times, owners";

    fn effect(&self, _: &CopyArgs) -> Effect {
        Effect::Idempotent
    }

    fn check_static(&self, args: &CopyArgs) -> Result<(), (String, String)> {
        match &args.mode {
            Some(m) => m.check_static().map_err(|e| ("mode".into(), e)),
            None => Ok(()),
        }
    }

    fn preflight(&self, args: &CopyArgs, world: &mut World, ctx: &ActionCtx) -> Verdict {
        if let Some(Err(e)) = args.mode.as_ref().map(Mode::bits) {
            return Verdict::WouldFail(e);
        }
        let what = match world.node(&args.from) {
            Node::Missing => {
                return Verdict::WouldFail(format!("source {} does not exist", show(&args.from)));
            }
            Node::Dir if world.is_predicted(&args.from) => "tree".to_string(),
            Node::Dir => {
                let (files, bytes) = tree_size(&args.from);
                format!("tree ({files} files, {bytes} bytes)")
            }
            Node::File { len: Some(len) } => format!("file ({len} bytes)"),
            _ => "file".to_string(),
        };
        if let Err(e) = parent_is_dir(&args.to, world) {
            return Verdict::WouldFail(e);
        }
        let verdict = if world.node(&args.to) == Node::Missing {
            Verdict::WillChange(format!(
                "copy {what} {} to {}",
                show(&args.from),
                show(&args.to)
            ))
        } else if !world.is_predicted(&args.from)
            && !world.is_predicted(&args.to)
            && same_copy(&args.from, &args.to)
        {
            Verdict::NoChange(format!(
                "{} already holds a copy of {}",
                show(&args.to),
                show(&args.from)
            ))
        } else if args.overwrite == Overwrite::Never {
            Verdict::WouldFail(format!(
                "{} exists and differs from {}; set `overwrite: replace` to replace it",
                show(&args.to),
                show(&args.from)
            ))
        } else if let Err(e) = check_destructive(&args.to, ctx) {
            Verdict::WouldFail(e)
        } else {
            Verdict::WillChange(format!(
                "replace {} with a copy of {what} {}",
                show(&args.to),
                show(&args.from)
            ))
        };
        if !matches!(verdict, Verdict::WouldFail(_)) {
            world.predict_copy(&args.from, &args.to);
        }
        verdict
    }

    fn execute(&self, args: &CopyArgs, ctx: &ActionCtx) -> Result<Outputs, ActionError> {
        let meta = fs::symlink_metadata(&args.from)
            .map_err(ActionError::io(format!("source {}", args.from.display())))?;
        let mut out = Outputs::new();
        out.insert("path".into(), json!(args.to));
        let exists = fs::symlink_metadata(&args.to).is_ok();
        if exists && same_copy(&args.from, &args.to) {
            let (files, bytes) = if meta.is_dir() {
                tree_size(&args.to)
            } else {
                (1, meta.len())
            };
            out.insert("files".into(), json!(files));
            out.insert("bytes".into(), json!(bytes));
            out.insert("changed".into(), json!(false));
            return Ok(out);
        }
        if exists {
            if args.overwrite == Overwrite::Never {
                return Err(ActionError::Failed(format!(
                    "{} exists and differs from {}; set `overwrite: replace` to replace it",
                    args.to.display(),
                    args.from.display()
                )));
            }
            check_destructive(&args.to, ctx).map_err(ActionError::Failed)?;
        }
        let partial = sibling(&args.to, "partial");
        // A partial copy left by an interrupted attempt is ours to discard.
        remove_any(&partial).map_err(ActionError::io(format!("remove {}", partial.display())))?;
        let (files, bytes) = if meta.is_dir() {
            copy_tree(&args.from, &partial, ctx)?
        } else if meta.file_type().is_symlink() {
            let link = fs::read_link(&args.from).map_err(ActionError::io("readlink"))?;
            std::os::unix::fs::symlink(link, &partial).map_err(ActionError::io("symlink"))?;
            (1, 0)
        } else {
            (1, copy_file(&args.from, &partial, &meta)?)
        };
        if let Some(mode) = &args.mode {
            let bits = mode.bits().map_err(ActionError::Failed)?;
            fs::set_permissions(&partial, fs::Permissions::from_mode(bits))
                .map_err(ActionError::io(format!("chmod {}", partial.display())))?;
        }
        if exists && meta.is_dir() {
            // rename() cannot replace a non-empty directory: move the old one aside first.
            let old = sibling(&args.to, "old");
            remove_any(&old).map_err(ActionError::io(format!("remove {}", old.display())))?;
            fs::rename(&args.to, &old)
                .map_err(ActionError::io(format!("move aside {}", args.to.display())))?;
            fs::rename(&partial, &args.to).map_err(ActionError::io(format!(
                "rename into {}",
                args.to.display()
            )))?;
            remove_any(&old).map_err(ActionError::io(format!("remove {}", old.display())))?;
        } else {
            fs::rename(&partial, &args.to).map_err(ActionError::io(format!(
                "rename into {}",
                args.to.display()
            )))?;
        }
        fsync_parent(&args.to)?;
        out.insert("files".into(), json!(files));
        out.insert("bytes".into(), json!(bytes));
        out.insert("changed".into(), json!(true));
        Ok(out)
    }
}

// ------------------------------------------------------------------------ write-file

/// Write a file from a template, atomically.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteFileArgs {
    /// File to write; its parent must exist.
    pub path: PathBuf,
    /// The content (a template).
    pub content: String,
    /// Octal mode (default "0644").
    #[serde(default)]
    pub mode: Option<Mode>,
}

pub struct WriteFile;

impl WriteFile {
    fn bits(args: &WriteFileArgs) -> Result<u32, String> {
        args.mode.as_ref().map_or(Ok(0o644), Mode::bits)
    }
}

impl Action for WriteFile {
    type Args = WriteFileArgs;
    const NAME: &'static str = "write-file";
    const OUTPUTS: &'static [&'static str] = &["path", "bytes", "sha256"];
    const SUMMARY: &'static str =
        "write a file from a template, atomically; no change if it already holds that content";

    fn effect(&self, _: &WriteFileArgs) -> Effect {
        Effect::Idempotent
    }

    fn check_static(&self, args: &WriteFileArgs) -> Result<(), (String, String)> {
        match &args.mode {
            Some(m) => m.check_static().map_err(|e| ("mode".into(), e)),
            None => Ok(()),
        }
    }

    fn preflight(&self, args: &WriteFileArgs, world: &mut World, _: &ActionCtx) -> Verdict {
        let bits = match Self::bits(args) {
            Ok(b) => b,
            Err(e) => return Verdict::WouldFail(e),
        };
        if let Err(e) = parent_is_dir(&args.path, world) {
            return Verdict::WouldFail(e);
        }
        let len = args.content.len();
        let verdict = match world.node(&args.path) {
            Node::Missing => {
                Verdict::WillChange(format!("create {} ({len} bytes)", show(&args.path)))
            }
            Node::File { .. } => {
                let same = !world.is_predicted(&args.path)
                    && fs::read(&args.path).is_ok_and(|c| c == args.content.as_bytes())
                    && mode_of(&args.path) == Some(bits);
                if same {
                    Verdict::NoChange(format!("{} already holds this content", show(&args.path)))
                } else {
                    Verdict::WillChange(format!("rewrite {} ({len} bytes)", show(&args.path)))
                }
            }
            _ => Verdict::WouldFail(format!("{} exists and is not a file", show(&args.path))),
        };
        if !matches!(verdict, Verdict::WouldFail(_)) {
            world.predict_file(&args.path, Some(len as u64));
        }
        verdict
    }

    fn execute(&self, args: &WriteFileArgs, _: &ActionCtx) -> Result<Outputs, ActionError> {
        let bits = Self::bits(args).map_err(ActionError::Failed)?;
        let partial = sibling(&args.path, "partial");
        let mut f = File::create(&partial)
            .map_err(ActionError::io(format!("create {}", partial.display())))?;
        f.write_all(args.content.as_bytes())
            .and_then(|()| f.set_permissions(fs::Permissions::from_mode(bits)))
            .and_then(|()| f.sync_all())
            .map_err(ActionError::io(format!("write {}", partial.display())))?;
        fs::rename(&partial, &args.path).map_err(ActionError::io(format!(
            "rename into {}",
            args.path.display()
        )))?;
        fsync_parent(&args.path)?;
        let mut out = Outputs::new();
        out.insert("path".into(), json!(args.path));
        out.insert("bytes".into(), json!(args.content.len()));
        out.insert(
            "sha256".into(),
            json!(hex(&Sha256::digest(args.content.as_bytes()))),
        );
        Ok(out)
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// --------------------------------------------------------------------------- remove

/// Remove a file or a directory tree below one of the runbook's `roots`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoveArgs {
    /// What to remove. Refused when empty, `/`, the state dir, or not below a root.
    pub path: PathBuf,
}

pub struct Remove;

impl Action for Remove {
    type Args = RemoveArgs;
    const NAME: &'static str = "remove";
    const OUTPUTS: &'static [&'static str] = &["path", "removed"];
    const SUMMARY: &'static str = "remove a file or tree, only below the runbook's declared roots";

    fn effect(&self, _: &RemoveArgs) -> Effect {
        Effect::Idempotent
    }

    fn preflight(&self, args: &RemoveArgs, world: &mut World, ctx: &ActionCtx) -> Verdict {
        if let Err(e) = check_destructive(&args.path, ctx) {
            return Verdict::WouldFail(e);
        }
        let verdict = match world.node(&args.path) {
            Node::Missing => Verdict::NoChange(format!("{} does not exist", show(&args.path))),
            Node::Dir => Verdict::WillChange(format!("remove tree {}", show(&args.path))),
            _ => Verdict::WillChange(format!("remove {}", show(&args.path))),
        };
        world.predict_absent(&args.path);
        verdict
    }

    fn execute(&self, args: &RemoveArgs, ctx: &ActionCtx) -> Result<Outputs, ActionError> {
        let target = check_destructive(&args.path, ctx).map_err(ActionError::Failed)?;
        let existed = fs::symlink_metadata(&target).is_ok();
        remove_any(&target).map_err(ActionError::io(format!("remove {}", target.display())))?;
        if existed {
            fsync_parent(&target)?;
        }
        let mut out = Outputs::new();
        out.insert("path".into(), json!(target));
        out.insert("removed".into(), json!(existed));
        Ok(out)
    }
}
