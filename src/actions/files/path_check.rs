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
    /// `true`: also output its sha256 (a file's, or a directory's digest of the names,
    /// types, contents and link targets below it: equal digests mean identical trees).
    /// A hex string: output it, and it must be this one.
    #[serde(default)]
    pub sha256: Sha256,
    /// For a directory's `sha256`: names (globs: `*`, `?`) of entries left out at any
    /// depth, with what is below them, e.g. `["*-shm", "backups"]`.
    #[serde(default)]
    pub exclude: Vec<String>,
}

/// `sha256`: whether to output it, or the one it must be.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Sha256 {
    Output(bool),
    Expect(String),
}

impl Default for Sha256 {
    fn default() -> Self {
        Sha256::Output(false)
    }
}

/// `exclude` globs as regexes over one entry name.
fn name_patterns(globs: &[String]) -> Result<Vec<regex::Regex>, String> {
    globs
        .iter()
        .map(|glob| {
            let mut re = String::from("^");
            for ch in glob.chars() {
                match ch {
                    '*' => re.push_str(".*"),
                    '?' => re.push('.'),
                    '/' => {
                        return Err(format!("`{glob}`: a pattern matches one name, without `/`"));
                    }
                    other => re.push_str(&regex::escape(&other.to_string())),
                }
            }
            re.push('$');
            regex::Regex::new(&re).map_err(|e| format!("`{glob}`: {e}"))
        })
        .collect()
}

/// The digest of a tree: every entry below `root` (sorted, `exclude` left out) as its
/// relative path, its type and its content (files) or target (symlinks).
fn sha256_tree(root: &std::path::Path, exclude: &[regex::Regex]) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let walk = walkdir::WalkDir::new(root)
        .sort_by_file_name()
        .min_depth(1)
        .into_iter()
        .filter_entry(|e| {
            let name = e.file_name().to_string_lossy();
            !exclude.iter().any(|re| re.is_match(&name))
        });
    for entry in walk {
        let entry = entry.map_err(std::io::Error::other)?;
        let rel = entry.path().strip_prefix(root).unwrap_or(entry.path());
        h.update(rel.as_os_str().as_encoded_bytes());
        h.update([0]);
        let kind = entry.file_type();
        if kind.is_file() {
            h.update(b"f");
            h.update(sha256_file(entry.path())?.as_bytes());
        } else if kind.is_dir() {
            h.update(b"d");
        } else if kind.is_symlink() {
            h.update(b"l");
            h.update(fs::read_link(entry.path())?.as_os_str().as_encoded_bytes());
        } else {
            h.update(b"o");
        }
        h.update([0]);
    }
    Ok(super::hex(&h.finalize()))
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
    /// `digest`: compute the sha256 (a judgement only needs it to compare it).
    fn problems(args: &PathCheckArgs, digest: bool) -> Result<(Vec<String>, Outputs), String> {
        let mut found = describe(&args.path);
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
        let wanted = match args.sha256 {
            Sha256::Output(wanted) => wanted && digest,
            Sha256::Expect(_) => true,
        };
        if wanted && (meta.is_file() || meta.is_dir()) {
            let digest = if meta.is_dir() {
                sha256_tree(&args.path, &name_patterns(&args.exclude)?)
            } else {
                sha256_file(&args.path)
            }
            .map_err(|e| format!("read {}: {e}", args.path.display()))?;
            if let Sha256::Expect(want) = &args.sha256
                && !want.eq_ignore_ascii_case(&digest)
            {
                problems.push(format!("sha256 is {digest}, not {want}"));
            }
            found.insert("sha256".into(), json!(digest));
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
        name_patterns(&args.exclude).map_err(|e| ("exclude".into(), e))?;
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
        match Self::problems(args, false) {
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
        let (problems, found) = Self::problems(args, true).map_err(ActionError::Failed)?;
        if !problems.is_empty() {
            return Err(ActionError::Failed(format!(
                "{}: {}",
                args.path.display(),
                problems.join("; ")
            )));
        }
        Ok(found)
    }
}
