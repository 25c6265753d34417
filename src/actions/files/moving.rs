//! `move`: rename, surviving EXDEV (the procedure's authors were bitten by exactly
//! that): across filesystems it copies, syncs, renames into place, then deletes the
//! source.

use std::fs;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;

use super::staging::{self, Partial};
use super::tree::{CopyOptions, copy_file, copy_tree, same_copy, special_refusal, survey};
use super::{fsync_parent, not_inside_itself, parent_is_dir, room, show};
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
        let real = !world.is_predicted(&args.from) && !world.is_predicted(&args.to);
        if to != Node::Missing && real && same_copy(&args.from, &args.to) {
            // A cross-filesystem move killed after its copy took `to`'s name.
            world.predict_move(&args.from, &args.to);
            return Verdict::WillChange(format!(
                "finish moving {} to {}: the copy is complete there, remove the source",
                show(&args.from),
                show(&args.to)
            ));
        }
        if to != Node::Missing {
            return Verdict::WouldFail(format!("{} already exists", show(&args.to)));
        }
        if let Err(e) = not_inside_itself(&args.from, &args.to, world) {
            return Verdict::WouldFail(e);
        }
        if let Err(e) = parent_is_dir(&args.to, world) {
            return Verdict::WouldFail(e);
        }
        // Across filesystems the move is a copy: it must be able to read the source
        // and find room for it.
        if !world.is_predicted(&args.from)
            && room::device_of(&args.to) != room::device_of_entry(&args.from)
        {
            let s = survey(&args.from);
            if let Some((path, kind)) = &s.special {
                return Verdict::WouldFail(special_refusal(path, kind));
            }
            if let Err(e) = room::reserve(world, &args.to, s.allocated, "the moved copy") {
                return Verdict::WouldFail(e);
            }
        }
        world.predict_move(&args.from, &args.to);
        Verdict::WillChange(format!("move {} to {}", show(&args.from), show(&args.to)))
    }

    fn execute(&self, args: &MoveArgs, ctx: &ActionCtx) -> Result<Outputs, ActionError> {
        guard::writable(&args.to, ctx)?;
        // An attempt killed while deleting the source left its tombstone: finish it.
        staging::sweep(&args.from)?;
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
                staging::delete(&args.from, "move:source-deleting")?;
                return Ok(outputs(args, true, true));
            }
            return Err(ActionError::Failed(format!(
                "{} already exists",
                args.to.display()
            )));
        }
        not_inside_itself(&args.from, &args.to, &World::real()).map_err(ActionError::Failed)?;
        match fs::rename(&args.from, &args.to) {
            Ok(()) => {
                fsync_parent(&args.to)?;
                fsync_parent(&args.from)?;
                Ok(outputs(args, true, false))
            }
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                // Removed again if the copy fails; an interrupted attempt's is discarded.
                let partial = Partial::fresh(&args.to)?;
                let opts = CopyOptions {
                    phase: Some("move:copying"),
                    ..CopyOptions::default()
                };
                if meta.is_dir() {
                    copy_tree(&args.from, partial.path(), ctx, &opts)?;
                } else if meta.file_type().is_symlink() {
                    let link = fs::read_link(&args.from).map_err(ActionError::io("readlink"))?;
                    std::os::unix::fs::symlink(link, partial.path())
                        .map_err(ActionError::io("symlink"))?;
                } else {
                    copy_file(&args.from, partial.path(), &meta, &opts)?;
                }
                staging::phase("move:copied");
                partial.commit(&args.to)?;
                fsync_parent(&args.to)?;
                // From here `to` is complete: a kill leaves a source that equals it, which
                // the next attempt recognises and deletes.
                staging::phase("move:renamed");
                staging::delete(&args.from, "move:source-deleting")?;
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
