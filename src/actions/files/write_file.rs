//! `write-file`: write a file from a template, atomically.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use super::staging::{self, Partial};
use super::{fsync_parent, mode_of, parent_is_dir, room, show};
use crate::actions::{Action, ActionCtx, ActionError, Effect, Mode, Outputs, Verdict, guard};
use crate::world::{Node, World};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

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

    fn preflight(&self, args: &WriteFileArgs, world: &mut World, ctx: &ActionCtx) -> Verdict {
        let bits = match Self::bits(args) {
            Ok(b) => b,
            Err(e) => return Verdict::WouldFail(e),
        };
        if let Err(e) = guard::writable(&args.path, ctx) {
            return Verdict::WouldFail(e.to_string());
        }
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
        if matches!(verdict, Verdict::WillChange(_))
            && let Err(e) = room::reserve(world, &args.path, len as u64, "the file")
        {
            return Verdict::WouldFail(e);
        }
        if !matches!(verdict, Verdict::WouldFail(_)) {
            world.predict_file(&args.path, Some(len as u64));
        }
        verdict
    }

    fn execute(&self, args: &WriteFileArgs, ctx: &ActionCtx) -> Result<Outputs, ActionError> {
        guard::writable(&args.path, ctx)?;
        let bits = Self::bits(args).map_err(ActionError::Failed)?;
        // Removed again if the write fails (a full disk); a killed attempt's is discarded.
        let partial = Partial::fresh(&args.path)?;
        let mut f = File::create(partial.path()).map_err(ActionError::io(format!(
            "create {}",
            partial.path().display()
        )))?;
        f.write_all(args.content.as_bytes())
            .and_then(|()| f.set_permissions(fs::Permissions::from_mode(bits)))
            .and_then(|()| f.sync_all())
            .map_err(ActionError::io(format!(
                "write {}",
                partial.path().display()
            )))?;
        drop(f);
        staging::phase("write-file:written");
        partial.commit(&args.path)?;
        fsync_parent(&args.path)?;
        let mut out = Outputs::new();
        out.insert("path".into(), json!(args.path));
        out.insert("bytes".into(), json!(args.content.len()));
        out.insert(
            "sha256".into(),
            json!(super::hex(&Sha256::digest(args.content.as_bytes()))),
        );
        Ok(out)
    }
}
