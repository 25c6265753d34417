//! `path-check`: assert what a path is (existence, type, owner, mode, size) — the
//! building block of pre- and post-checks.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;

use super::owner::Owner;
use super::show;
use crate::actions::{Action, ActionCtx, ActionError, Effect, Mode, Outputs, Verdict};
use crate::world::{Node, World};

/// What kind of entry the path must be.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    #[default]
    Any,
    File,
    Dir,
}

/// Check a path. Fails listing every expectation that does not hold.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PathCheckArgs {
    pub path: PathBuf,
    /// Whether the path must exist (default true) or must not.
    #[serde(default = "yes")]
    pub exists: bool,
    /// `file`, `dir` or `any` (default).
    #[serde(default, rename = "type")]
    pub kind: Kind,
    /// Expected owner: `uid:gid`, `user:group`, `user` or `:group`.
    #[serde(default)]
    pub owner: Option<String>,
    /// Expected octal mode (permission bits).
    #[serde(default)]
    pub mode: Option<Mode>,
    /// Minimum size in bytes (files: their size; directories: the total of the files below).
    #[serde(default)]
    pub min_size: Option<u64>,
    /// Also output the file's sha256 (for metadata and checksums).
    #[serde(default)]
    pub sha256: bool,
}

fn yes() -> bool {
    true
}

pub struct PathCheck;

fn sha256_file(path: &std::path::Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut file = fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(super::hex(&hasher.finalize()));
        }
        hasher.update(&buf[..n]);
    }
}

/// What the path gives access to: a symlink is followed, as `test -d` and `stat -L`
/// follow it (a data dir that is a link to a bigger disk is a directory); a dangling
/// link exists, as itself.
fn stat(path: &std::path::Path) -> std::io::Result<fs::Metadata> {
    fs::metadata(path).or_else(|_| fs::symlink_metadata(path))
}

/// What a path is, as outputs.
fn describe(path: &std::path::Path) -> Outputs {
    let mut out = Outputs::new();
    out.insert("path".into(), json!(path));
    match stat(path) {
        Err(_) => {
            out.insert("exists".into(), json!(false));
        }
        Ok(m) => {
            let kind = if m.is_dir() {
                "dir"
            } else if m.is_file() {
                "file"
            } else {
                "other"
            };
            let size = if m.is_dir() {
                super::tree::tree_size(path).1
            } else {
                m.len()
            };
            out.insert("exists".into(), json!(true));
            out.insert("type".into(), json!(kind));
            out.insert("size".into(), json!(size));
            out.insert("owner".into(), json!(format!("{}:{}", m.uid(), m.gid())));
            out.insert(
                "mode".into(),
                json!(format!("{:04o}", m.permissions().mode() & 0o7777)),
            );
        }
    }
    out
}

impl PathCheck {
    /// Every expectation that does not hold for the real path.
    fn problems(args: &PathCheckArgs) -> Result<(Vec<String>, Outputs), String> {
        let found = describe(&args.path);
        let exists = found["exists"] == json!(true);
        let mut problems = Vec::new();
        if exists != args.exists {
            problems.push(if args.exists {
                "does not exist".to_string()
            } else {
                "exists".to_string()
            });
            return Ok((problems, found));
        }
        if !exists {
            return Ok((problems, found));
        }
        let meta = stat(&args.path).map_err(|e| e.to_string())?;
        match args.kind {
            Kind::File if !meta.is_file() => problems.push(format!(
                "is a {}, not a file",
                found["type"].as_str().unwrap_or("?")
            )),
            Kind::Dir if !meta.is_dir() => problems.push(format!(
                "is a {}, not a directory",
                found["type"].as_str().unwrap_or("?")
            )),
            _ => {}
        }
        if let Some(spec) = &args.owner {
            let owner = Owner::parse(spec)?;
            if !owner.matches(&meta) {
                problems.push(format!(
                    "owner is {}, not {owner}",
                    found["owner"].as_str().unwrap_or("?")
                ));
            }
        }
        if let Some(mode) = &args.mode {
            let want = mode.bits()?;
            if meta.permissions().mode() & 0o7777 != want {
                problems.push(format!(
                    "mode is {}, not {want:04o}",
                    found["mode"].as_str().unwrap_or("?")
                ));
            }
        }
        if let Some(min) = args.min_size {
            let size = found["size"].as_u64().unwrap_or(0);
            if size < min {
                problems.push(format!("size is {size} bytes, less than {min}"));
            }
        }
        Ok((problems, found))
    }
}

impl Action for PathCheck {
    type Args = PathCheckArgs;
    const NAME: &'static str = "path-check";
    const PLAN_RUNS_IT: bool = true;
    const SUMMARY: &'static str = "assert existence, type, owner, mode and minimum size of a path";
    const OUTPUTS: &'static [&'static str] =
        &["path", "exists", "type", "size", "owner", "mode", "sha256"];

    fn effect(&self, _: &PathCheckArgs) -> Effect {
        Effect::ReadOnly
    }

    fn check_static(&self, args: &PathCheckArgs) -> Result<(), (String, String)> {
        if let Some(m) = &args.mode {
            m.check_static().map_err(|e| ("mode".into(), e))?;
        }
        match &args.owner {
            Some(o) if !o.contains("{{") => {
                Owner::parse(o).map(|_| ()).map_err(|e| ("owner".into(), e))
            }
            _ => Ok(()),
        }
    }

    fn preflight(&self, args: &PathCheckArgs, world: &mut World, _: &ActionCtx) -> Verdict {
        if world.is_predicted(&args.path) {
            // An earlier step of this plan creates or removes it: judge what the plan knows.
            let node = world.node_followed(&args.path);
            let exists = node != Node::Missing;
            if exists != args.exists {
                return Verdict::WouldFail(format!(
                    "{} {} after the steps before this one",
                    show(&args.path),
                    if args.exists {
                        "will not exist"
                    } else {
                        "will exist"
                    }
                ));
            }
            let kind_ok = match args.kind {
                Kind::Any => true,
                Kind::File => !exists || matches!(node, Node::File { .. }),
                Kind::Dir => !exists || node == Node::Dir,
            };
            if !kind_ok {
                return Verdict::WouldFail(
                    format!("{} will not be a {:?}", show(&args.path), args.kind).to_lowercase(),
                );
            }
            return Verdict::Deferred(format!(
                "will check {} after the steps before this one",
                show(&args.path)
            ));
        }
        match Self::problems(args) {
            Err(e) => Verdict::WouldFail(e),
            Ok((problems, _)) if problems.is_empty() => {
                Verdict::NoChange(format!("{} is as expected", show(&args.path)))
            }
            Ok((problems, _)) => {
                Verdict::WouldFail(format!("{}: {}", show(&args.path), problems.join("; ")))
            }
        }
    }

    fn execute(&self, args: &PathCheckArgs, _: &ActionCtx) -> Result<Outputs, ActionError> {
        let (problems, mut found) = Self::problems(args).map_err(ActionError::Failed)?;
        if !problems.is_empty() {
            return Err(ActionError::Failed(format!(
                "{}: {}",
                args.path.display(),
                problems.join("; ")
            )));
        }
        // A missing path (`exists: false`) has no `type`.
        if args.sha256 && found.get("type") == Some(&json!("file")) {
            found.insert(
                "sha256".into(),
                json!(
                    sha256_file(&args.path)
                        .map_err(ActionError::io(format!("read {}", args.path.display())))?
                ),
            );
        }
        Ok(found)
    }
}
