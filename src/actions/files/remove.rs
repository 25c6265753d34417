//! `remove`: remove a file or tree below a declared root.

use std::fs::{self};
use std::path::PathBuf;

use super::{fsync_parent, remove_any, show};
use crate::actions::guard::{self, Below, Reach};
use crate::actions::{Action, ActionCtx, ActionError, Effect, Outputs, Verdict};
use crate::world::{Node, World};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;

/// Remove a file or a directory tree below one of the runbook's `roots`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoveArgs {
    /// What to remove. Refused when empty, `/`, in or holding the state dir, not below a
    /// root, reached through a symlink below a root, or holding a mount point. A
    /// symlink is removed as a link.
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
        if let Err(e) = guard::destructive(&args.path, Reach::Tree, Below::Strictly, ctx) {
            return Verdict::WouldFail(e.to_string());
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
        // The path as resolved by the guard: what was checked is what is removed.
        let target = guard::destructive(&args.path, Reach::Tree, Below::Strictly, ctx)?.resolved;
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
