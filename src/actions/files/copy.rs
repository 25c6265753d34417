//! `copy`: a file or tree, atomically, keeping metadata.

use std::fs::{self};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::owner::Owner;
use super::share::{self, LinkFrom, Tally};
use super::staging::{self, Partial, same_inode};
use super::tree::{
    CopyOptions, copy_file, copy_tree_sharing, same_copy, special_refusal, survey, tree_size,
};
use super::{fsync_parent, mode_of, not_inside_itself, parent_is_dir, room, show};
use crate::actions::guard::{self, Below, Reach, Refusal};
use crate::actions::{Action, ActionCtx, ActionError, Effect, Mode, Outputs, Verdict};
use crate::world::{Node, World};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;

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
    /// Owner for every copied entry (`uid:gid` or names), like `cp -a` then `chown -R`.
    #[serde(default)]
    pub owner: Option<String>,
    /// With `overwrite: replace`: move the replaced destination here instead of deleting
    /// it (a safety copy; must not exist yet).
    #[serde(default)]
    pub keep_replaced: Option<PathBuf>,
    /// A missing source is no change instead of a failure (the procedure's "registry,
    /// if the file exists"); the output `copied` says which happened.
    #[serde(default)]
    pub if_exists: bool,
    /// An earlier copy of the same tree (rsync's `--link-dest`): each file it holds
    /// unchanged at the same relative path (same size, mtime to the nanosecond, mode,
    /// owner, xattrs) is hard-linked from it (reflinked where a hard link is refused),
    /// the rest is copied. Missing, or `""`, means a full copy (the first snapshot).
    /// Not with `owner` or `mode`: a shared file's metadata is the earlier copy's too.
    #[serde(default)]
    pub link_from: Option<PathBuf>,
}

impl CopyArgs {
    /// `link_from`, unless it is unset or rendered empty (no earlier copy).
    fn link_from(&self) -> Option<&Path> {
        self.link_from
            .as_deref()
            .filter(|p| !p.as_os_str().is_empty())
    }
}

pub struct Copy;

impl Action for Copy {
    type Args = CopyArgs;
    const NAME: &'static str = "copy";
    const OUTPUTS: &'static [&'static str] = &[
        "path",
        "files",
        "bytes",
        "changed",
        "copied",
        "linked",
        "linked_bytes",
        "reflinked",
        "reflinked_bytes",
        "copied_files",
        "copied_bytes",
    ];
    const SUMMARY: &'static str = "copy a file or tree atomically (temp sibling + fsync + rename), keeping modes, times, owners";

    fn effect(&self, _: &CopyArgs) -> Effect {
        Effect::Idempotent
    }

    fn check_static(&self, args: &CopyArgs) -> Result<(), (String, String)> {
        if let Some(o) = args.owner.as_deref().filter(|o| !o.contains("{{")) {
            Owner::parse(o).map_err(|e| ("owner".into(), e))?;
        }
        if args.link_from.is_some() && (args.owner.is_some() || args.mode.is_some()) {
            return Err((
                "link_from".into(),
                "`link_from` does not go with `owner` or `mode`: a file shared with the earlier copy cannot be given other metadata without changing that copy too".into(),
            ));
        }
        if args.keep_replaced.is_some() && args.overwrite == Overwrite::Never {
            return Err((
                "keep_replaced".into(),
                "`keep_replaced` needs `overwrite: replace`".into(),
            ));
        }
        match &args.mode {
            Some(m) => m.check_static().map_err(|e| ("mode".into(), e)),
            None => Ok(()),
        }
    }

    fn preflight(&self, args: &CopyArgs, world: &mut World, ctx: &ActionCtx) -> Verdict {
        if let Some(Err(e)) = args.mode.as_ref().map(Mode::bits) {
            return Verdict::WouldFail(e);
        }
        if let Err(e) = guard::writable(&args.to, ctx) {
            return Verdict::WouldFail(e.to_string());
        }
        // What the copy reads, when it is on disk now (a predicted source is judged
        // when the run gets there: preflight runs again right before execute).
        let surveyed = (!world.is_predicted(&args.from) && world.node(&args.from) != Node::Missing)
            .then(|| survey(&args.from));
        let what = match world.node(&args.from) {
            Node::Missing if args.if_exists => {
                return Verdict::NoChange(format!(
                    "source {} does not exist; nothing to copy (if_exists)",
                    show(&args.from)
                ));
            }
            Node::Missing => {
                return Verdict::WouldFail(format!("source {} does not exist", show(&args.from)));
            }
            _ if let Some((path, kind)) = surveyed.as_ref().and_then(|s| s.special.as_ref()) => {
                return Verdict::WouldFail(special_refusal(path, kind));
            }
            Node::Dir if world.is_predicted(&args.from) => "tree".to_string(),
            Node::Dir => {
                // The survey walked it already (the source is on disk here).
                let (files, bytes) = surveyed
                    .as_ref()
                    .map_or_else(|| tree_size(&args.from), |s| (s.files, s.bytes));
                format!("tree ({files} files, {bytes} bytes)")
            }
            Node::File { len: Some(len) } => format!("file ({len} bytes)"),
            _ => "file".to_string(),
        };
        if let Err(e) = not_inside_itself(&args.from, &args.to, world) {
            return Verdict::WouldFail(e);
        }
        if let Err(e) = parent_is_dir(&args.to, world) {
            return Verdict::WouldFail(e);
        }
        // What sharing with `link_from` changes: the description, and the room needed.
        let mut allocated = surveyed.as_ref().map(|s| s.allocated);
        let note = match args.link_from() {
            // Rendered empty: the runbook found no earlier copy (the first snapshot).
            None if args.link_from.is_some() => {
                ": in full (`link_from` is empty: no earlier copy to share with)".to_string()
            }
            None => String::new(),
            Some(base) => match sharing_preview(args, base, world, surveyed.as_ref()) {
                Err(e) => return Verdict::WouldFail(e),
                Ok(Sharing::Judged {
                    files,
                    bytes,
                    copy_allocated,
                    copy_files,
                }) => {
                    allocated = Some(copy_allocated);
                    format!(
                        ": {files} unchanged files ({bytes} bytes) shared with {}, {copy_files} files copied",
                        show(base)
                    )
                }
                Ok(Sharing::Missing) => format!(
                    ": in full (`link_from` {} does not exist: no earlier copy to share with)",
                    show(base)
                ),
                Ok(Sharing::Later) => format!(
                    ": unchanged files shared with {} (judged when the run gets there)",
                    show(base)
                ),
            },
        };
        let verdict = if world.node(&args.to) == Node::Missing {
            Verdict::WillChange(format!(
                "copy {what} {} to {}{note}",
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
        } else if let Err(e) = guard_replace(args, ctx) {
            Verdict::WouldFail(e.to_string())
        } else if let Some(e) = args
            .keep_replaced
            .as_ref()
            .filter(|_| !world.is_predicted(&args.to))
            .and_then(|keep| foreign_safety_copy(keep, &args.to, world))
        {
            Verdict::WouldFail(e)
        } else {
            Verdict::WillChange(format!(
                "replace {} with a copy of {what} {}{note}",
                show(&args.to),
                show(&args.from)
            ))
        };
        let writes = matches!(&verdict, Verdict::WillChange(_));
        if let (true, Some(need)) = (writes, allocated)
            && let Err(e) = room::reserve(world, &args.to, need, "the copy")
        {
            return Verdict::WouldFail(e);
        }
        if !matches!(verdict, Verdict::WouldFail(_)) {
            world.predict_copy(&args.from, &args.to);
        }
        verdict
    }

    fn execute(&self, args: &CopyArgs, ctx: &ActionCtx) -> Result<Outputs, ActionError> {
        guard::writable(&args.to, ctx)?;
        if args.if_exists && fs::symlink_metadata(&args.from).is_err() {
            let mut out = Outputs::new();
            out.insert("path".into(), json!(args.to));
            out.insert("copied".into(), json!(false));
            return Ok(out);
        }
        let meta = fs::symlink_metadata(&args.from)
            .map_err(ActionError::io(format!("source {}", args.from.display())))?;
        let owner = args
            .owner
            .as_deref()
            .map(Owner::parse)
            .transpose()
            .map_err(ActionError::Failed)?;
        not_inside_itself(&args.from, &args.to, &World::real()).map_err(ActionError::Failed)?;
        if let Some(base) = args.link_from() {
            link_from_allowed(&args.from, base, meta.is_dir()).map_err(ActionError::Failed)?;
        }
        let mut out = Outputs::new();
        out.insert("path".into(), json!(args.to));
        // An attempt killed while deleting the tree it replaced left its tombstone.
        staging::sweep(&args.to)?;
        let exists = fs::symlink_metadata(&args.to).is_ok();
        if exists && is_done(args, owner.as_ref()) {
            let (files, bytes) = if meta.is_dir() {
                tree_size(&args.to)
            } else {
                (1, meta.len())
            };
            // Finished by an interrupted attempt: what it shared is what still shares
            // an inode with `link_from` (a reflink cannot be told from a copy).
            let (linked, linked_bytes) = args
                .link_from()
                .map_or((0, 0), |base| hard_linked(&args.to, base));
            let tally = Tally {
                files,
                bytes,
                linked,
                linked_bytes,
                ..Tally::default()
            };
            insert_tally(&mut out, &tally);
            out.insert("changed".into(), json!(false));
            out.insert("copied".into(), json!(true));
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
            guard_replace(args, ctx)?;
            if let Some(e) = args
                .keep_replaced
                .as_ref()
                .and_then(|keep| foreign_safety_copy(keep, &args.to, &World::real()))
            {
                return Err(ActionError::Failed(e));
            }
        }
        // Removed again if this attempt fails; an interrupted attempt's is discarded.
        let partial = Partial::fresh(&args.to)?;
        let mut opts = CopyOptions {
            owner,
            progress: None,
            phase: Some("copy:copying"),
        };
        let tally = if meta.is_dir() {
            if ctx.progress {
                let (_, total) = tree_size(&args.from);
                opts.progress = progress_bar(total, &args.to);
            }
            let base = args.link_from().and_then(LinkFrom::open);
            let copied = copy_tree_sharing(&args.from, partial.path(), ctx, &opts, base)?;
            if let Some(bar) = &opts.progress {
                bar.finish_and_clear();
            }
            copied
        } else if meta.file_type().is_symlink() {
            let link = fs::read_link(&args.from).map_err(ActionError::io("readlink"))?;
            std::os::unix::fs::symlink(link, partial.path()).map_err(ActionError::io("symlink"))?;
            Tally {
                files: 1,
                ..Tally::default()
            }
        } else {
            let bytes = copy_file(&args.from, partial.path(), &meta, &opts)?;
            Tally {
                files: 1,
                bytes,
                ..Tally::default()
            }
        };
        if let Some(mode) = &args.mode {
            let bits = mode.bits().map_err(ActionError::Failed)?;
            fs::set_permissions(partial.path(), fs::Permissions::from_mode(bits)).map_err(
                ActionError::io(format!("chmod {}", partial.path().display())),
            )?;
        }
        staging::phase("copy:copied");
        match (exists, &args.keep_replaced) {
            (false, _) => partial.commit(&args.to)?,
            (true, Some(keep)) if !meta.is_dir() => {
                // A hard link keeps the old file while rename swaps the new one in
                // atomically. An interrupted attempt may have made that link already.
                if !same_inode(keep, &args.to) {
                    fs::hard_link(&args.to, keep)
                        .map_err(ActionError::io(format!("keep {}", keep.display())))?;
                }
                staging::phase("copy:kept");
                partial.commit(&args.to)?;
                fsync_parent(keep)?;
            }
            (true, Some(keep)) => {
                fs::rename(&args.to, keep)
                    .map_err(ActionError::io(format!("move aside to {}", keep.display())))?;
                fsync_parent(keep)?;
                // A kill here leaves `to` missing and the old tree at `keep`: the next
                // attempt copies into the free name, as this one goes on to do.
                staging::phase("copy:kept");
                partial.commit(&args.to)?;
            }
            (true, None) if !meta.is_dir() => partial.commit(&args.to)?,
            (true, None) => {
                // rename() cannot replace a non-empty directory: the old one goes to its
                // tombstone first, and is deleted once the new one has its name.
                let grave = staging::bury(&args.to)?;
                staging::phase("copy:old-aside");
                partial.commit(&args.to)?;
                fsync_parent(&args.to)?;
                if let Some(grave) = grave {
                    grave.delete("copy:old-deleting")?;
                }
            }
        }
        fsync_parent(&args.to)?;
        insert_tally(&mut out, &tally);
        out.insert("changed".into(), json!(true));
        out.insert("copied".into(), json!(true));
        Ok(out)
    }
}

fn insert_tally(out: &mut Outputs, t: &Tally) {
    let (copied_files, copied_bytes) = t.copied();
    out.insert("files".into(), json!(t.files));
    out.insert("bytes".into(), json!(t.bytes));
    out.insert("linked".into(), json!(t.linked));
    out.insert("linked_bytes".into(), json!(t.linked_bytes));
    out.insert("reflinked".into(), json!(t.reflinked));
    out.insert("reflinked_bytes".into(), json!(t.reflinked_bytes));
    out.insert("copied_files".into(), json!(copied_files));
    out.insert("copied_bytes".into(), json!(copied_bytes));
}

/// What the plan can say about sharing with `link_from`.
enum Sharing {
    Judged {
        files: u64,
        bytes: u64,
        copy_files: u64,
        copy_allocated: u64,
    },
    Missing,
    Later,
}

fn sharing_preview(
    args: &CopyArgs,
    base: &Path,
    world: &World,
    surveyed: Option<&super::tree::Survey>,
) -> Result<Sharing, String> {
    if world.is_predicted(&args.from) || world.is_predicted(base) {
        return Ok(Sharing::Later);
    }
    let is_dir = world.node(&args.from) == Node::Dir;
    link_from_allowed(&args.from, base, is_dir)?;
    match world.node_followed(base) {
        Node::Missing => Ok(Sharing::Missing),
        Node::Dir => {
            let (files, bytes, copy_allocated) = share::preview(&args.from, base)
                .ok_or_else(|| format!("cannot read `link_from` {}", show(base)))?;
            let all = surveyed.map_or_else(|| tree_size(&args.from).0, |s| s.files);
            Ok(Sharing::Judged {
                files,
                bytes,
                copy_files: all.saturating_sub(files),
                copy_allocated,
            })
        }
        _ => Err(format!("`link_from` {} is not a directory", show(base))),
    }
}

/// `link_from` shares files of a tree copy, and never the source's own files: a
/// snapshot hard-linked to the live data would change whenever the data does.
fn link_from_allowed(from: &Path, base: &Path, from_is_dir: bool) -> Result<(), String> {
    if !from_is_dir {
        return Err(format!(
            "`link_from` shares the files of a tree copy; {} is not a directory",
            show(from)
        ));
    }
    let (f, b) = (super::resolved(from), super::resolved(base));
    if b.starts_with(&f) || f.starts_with(&b) {
        return Err(format!(
            "`link_from` {} is {} the source {} (resolved: `{}`, `{}`): a copy shares files with an earlier copy, never with its source",
            show(base),
            if b == f {
                "the same directory as"
            } else if b.starts_with(&f) {
                "inside"
            } else {
                "around"
            },
            show(from),
            b.display(),
            f.display()
        ));
    }
    Ok(())
}

/// Files (and their bytes) below `to` that are the same inode as `base`'s file at the
/// same relative path.
fn hard_linked(to: &Path, base: &Path) -> (u64, u64) {
    let mut out = (0, 0);
    for entry in walkdir::WalkDir::new(to).into_iter().flatten() {
        if !entry.file_type().is_file() {
            continue;
        }
        let rel = entry.path().strip_prefix(to).unwrap_or(Path::new(""));
        if same_inode(entry.path(), &base.join(rel)) {
            out.0 += 1;
            out.1 += entry.metadata().map(|m| m.len()).unwrap_or(0);
        }
    }
    out
}

/// Replacing `to` deletes it (a tree: everything below it) or moves it aside to
/// `keep_replaced`: both must pass the destructive guard.
fn guard_replace(args: &CopyArgs, ctx: &ActionCtx) -> Result<(), Refusal> {
    guard::destructive(&args.to, Reach::Tree, Below::Strictly, ctx)?;
    if let Some(keep) = &args.keep_replaced {
        guard::destructive(keep, Reach::Entry, Below::Strictly, ctx)?;
    }
    Ok(())
}

/// The refusal of a `keep_replaced` path that already holds something: unless it is
/// the hard link to the very file being replaced that an interrupted attempt of this
/// step made (two names of one inode), it is a safety copy not to be overwritten.
fn foreign_safety_copy(
    keep: &std::path::Path,
    to: &std::path::Path,
    world: &World,
) -> Option<String> {
    if world.node(keep) == Node::Missing || same_inode(keep, to) {
        return None;
    }
    Some(format!(
        "`keep_replaced` {} already exists; refusing to overwrite a safety copy",
        keep.display()
    ))
}

/// The destination already is what this step makes: the same copy, with the owner
/// and mode asked for.
fn is_done(args: &CopyArgs, owner: Option<&Owner>) -> bool {
    if !same_copy(&args.from, &args.to) {
        return false;
    }
    let owner_ok = owner.is_none_or(|o| {
        walkdir::WalkDir::new(&args.to)
            .into_iter()
            .flatten()
            .all(|e| e.metadata().is_ok_and(|m| o.matches(&m)))
    });
    let mode_ok = args
        .mode
        .as_ref()
        .is_none_or(|m| m.bits().ok() == mode_of(&args.to));
    owner_ok && mode_ok
}

/// A progress bar on stderr for copies large enough to wait for; indicatif draws
/// nothing when stderr is not a terminal.
fn progress_bar(total: u64, to: &std::path::Path) -> Option<indicatif::ProgressBar> {
    const WORTH_SHOWING: u64 = 64 << 20;
    if total < WORTH_SHOWING {
        return None;
    }
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style);
    }
    bar.set_message(format!("copy to {}", to.display()));
    Some(bar)
}
