//! `move`: rename, surviving EXDEV (the procedure's authors were bitten by exactly
//! that): across filesystems it copies, syncs, renames into place, then deletes the
//! source.

use std::fs;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;

use super::tree::{CopyOptions, copy_file, copy_tree, same_copy};
use super::{fsync_parent, parent_is_dir, remove_any, show, sibling};
use crate::actions::guard::{self, Below, Reach};
use crate::actions::{Action, ActionCtx, ActionError, Effect, Outputs, Verdict};
use crate::world::{Node, World};

/// Move (rename) a file or tree; works across filesystems.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MoveArgs {
    /// What to move; it must be below a declared root (it disappears).
    pub from: PathBuf,
    /// The new path (not a directory to move into); it must not exist and its parent must.
    pub to: PathBuf,
    /// A missing `from` (and missing `to`) is no change instead of a failure, e.g. a
    /// database's `-wal` file, which exists only after an unclean stop.
    #[serde(default)]
    pub if_exists: bool,
}

pub struct Move;

fn outputs(args: &MoveArgs, moved: bool, across: bool) -> Outputs {
    let mut out = Outputs::new();
    out.insert("path".into(), json!(args.to));
    out.insert("moved".into(), json!(moved));
    out.insert("across_filesystems".into(), json!(across));
    out
}

impl Action for Move {
    type Args = MoveArgs;
    const NAME: &'static str = "move";
    const SUMMARY: &'static str =
        "rename a file or tree; across filesystems: copy, sync, rename, then delete the source";
    const OUTPUTS: &'static [&'static str] = &["path", "moved", "across_filesystems"];

    // Safe to run again: it checks where the data is before doing anything (see execute).
    fn effect(&self, _: &MoveArgs) -> Effect {
        Effect::Idempotent
    }

    fn preflight(&self, args: &MoveArgs, world: &mut World, ctx: &ActionCtx) -> Verdict {
        if let Err(e) = guard::writable(&args.to, ctx) {
            return Verdict::WouldFail(e.to_string());
        }
        let from = world.node(&args.from);
        let to = world.node(&args.to);
        if from == Node::Missing && to != Node::Missing {
            return Verdict::NoChange(format!(
                "{} is already at {}",
                show(&args.from),
                show(&args.to)
            ));
        }
        if from == Node::Missing && args.if_exists {
            return Verdict::NoChange(format!(
                "{} does not exist; nothing to move (if_exists)",
                show(&args.from)
            ));
        }
        if from == Node::Missing {
            return Verdict::WouldFail(format!("{} does not exist", show(&args.from)));
        }
        // A cross-filesystem move deletes its source tree: the whole tree is guarded.
        if let Err(e) = guard::destructive(&args.from, Reach::Tree, Below::Strictly, ctx) {
            return Verdict::WouldFail(e.to_string());
        }
        if to != Node::Missing {
            return Verdict::WouldFail(format!("{} already exists", show(&args.to)));
        }
        if let Err(e) = parent_is_dir(&args.to, world) {
            return Verdict::WouldFail(e);
        }
        world.predict_move(&args.from, &args.to);
        Verdict::WillChange(format!("move {} to {}", show(&args.from), show(&args.to)))
    }

    fn execute(&self, args: &MoveArgs, ctx: &ActionCtx) -> Result<Outputs, ActionError> {
        guard::writable(&args.to, ctx)?;
        let from_meta = fs::symlink_metadata(&args.from).ok();
        let to_exists = fs::symlink_metadata(&args.to).is_ok();
        // An earlier attempt may have finished: the data is at `to` and `from` is gone.
        let Some(meta) = from_meta else {
            return if to_exists || args.if_exists {
                Ok(outputs(args, false, false))
            } else {
                Err(ActionError::Failed(format!(
                    "{} does not exist",
                    args.from.display()
                )))
            };
        };
        guard::destructive(&args.from, Reach::Tree, Below::Strictly, ctx)?;
        if to_exists {
            // An interrupted cross-filesystem move: the copy is complete at `to` and only
            // deleting the source was left.
            if same_copy(&args.from, &args.to) {
                remove_any(&args.from)
                    .map_err(ActionError::io(format!("remove {}", args.from.display())))?;
                fsync_parent(&args.from)?;
                return Ok(outputs(args, true, true));
            }
            return Err(ActionError::Failed(format!(
                "{} already exists",
                args.to.display()
            )));
        }
        match fs::rename(&args.from, &args.to) {
            Ok(()) => {
                fsync_parent(&args.to)?;
                fsync_parent(&args.from)?;
                Ok(outputs(args, true, false))
            }
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                let partial = sibling(&args.to, "partial");
                remove_any(&partial)
                    .map_err(ActionError::io(format!("remove {}", partial.display())))?;
                let opts = CopyOptions::default();
                if meta.is_dir() {
                    copy_tree(&args.from, &partial, ctx, &opts)?;
                } else if meta.file_type().is_symlink() {
                    let link = fs::read_link(&args.from).map_err(ActionError::io("readlink"))?;
                    std::os::unix::fs::symlink(link, &partial)
                        .map_err(ActionError::io("symlink"))?;
                } else {
                    copy_file(&args.from, &partial, &meta, &opts)?;
                }
                fs::rename(&partial, &args.to).map_err(ActionError::io(format!(
                    "rename into {}",
                    args.to.display()
                )))?;
                fsync_parent(&args.to)?;
                remove_any(&args.from)
                    .map_err(ActionError::io(format!("remove {}", args.from.display())))?;
                fsync_parent(&args.from)?;
                Ok(outputs(args, true, true))
            }
            Err(e) => Err(ActionError::io(format!(
                "move {} to {}",
                args.from.display(),
                args.to.display()
            ))(e)),
        }
    }
}
