//! `mkdir`: create a directory and its parents.

use std::fs::{self};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use super::{fsync_parent, mode_of, show};
use crate::actions::{Action, ActionCtx, ActionError, Effect, Mode, Outputs, Verdict, guard};
use crate::world::{Node, World};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;

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

    fn preflight(&self, args: &MkdirArgs, world: &mut World, ctx: &ActionCtx) -> Verdict {
        let want = match args.mode.as_ref().map(Mode::bits).transpose() {
            Ok(m) => m,
            Err(e) => return Verdict::WouldFail(e),
        };
        if let Err(e) = guard::writable(&args.path, ctx) {
            return Verdict::WouldFail(e.to_string());
        }
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
                    .filter(|a| world.node_followed(a) != Node::Dir);
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

    fn execute(&self, args: &MkdirArgs, ctx: &ActionCtx) -> Result<Outputs, ActionError> {
        guard::writable(&args.path, ctx)?;
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
