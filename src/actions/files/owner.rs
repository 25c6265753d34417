//! `chown` and `chmod`, and the owner spec (`1000:1000`, `atocore:atocore`) that `copy`
//! shares.

use std::ffi::CString;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;

use super::show;
use crate::actions::guard::{self, Below, Reach, Refusal};
use crate::actions::{Action, ActionCtx, ActionError, Effect, Mode, Outputs, Verdict};
use crate::world::{Node, World};

/// A resolved `user:group`; either side may be left as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

impl Owner {
    /// `uid:gid`, `user:group`, `user`, `:group`; names are looked up in the system's
    /// user and group databases.
    pub fn parse(spec: &str) -> Result<Owner, String> {
        let (user, group) = match spec.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (spec, None),
        };
        let uid = match user {
            "" => None,
            u => Some(u.parse::<u32>().or_else(|_| lookup_user(u))?),
        };
        let gid = match group {
            None | Some("") => None,
            Some(g) => Some(g.parse::<u32>().or_else(|_| lookup_group(g))?),
        };
        if uid.is_none() && gid.is_none() {
            return Err(format!("owner `{spec}` names neither a user nor a group"));
        }
        Ok(Owner { uid, gid })
    }

    pub fn matches(&self, meta: &fs::Metadata) -> bool {
        self.uid.is_none_or(|u| u == meta.uid()) && self.gid.is_none_or(|g| g == meta.gid())
    }

    /// Sets the owner of `path` itself (a symlink is changed, not its target).
    pub fn apply(&self, path: &Path) -> Result<(), ActionError> {
        std::os::unix::fs::lchown(path, self.uid, self.gid)
            .map_err(ActionError::io(format!("chown {}", path.display())))
    }
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |v: Option<u32>| v.map_or_else(String::new, |v| v.to_string());
        write!(f, "{}:{}", show(self.uid), show(self.gid))
    }
}

fn lookup_user(name: &str) -> Result<u32, String> {
    let c = CString::new(name).map_err(|_| format!("bad user name `{name}`"))?;
    // SAFETY: getpwnam returns a pointer into static storage or null; we read one field
    // at once and keep nothing.
    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
    if pw.is_null() {
        return Err(format!(
            "no user `{name}` on this host (give a numeric uid)"
        ));
    }
    // SAFETY: non-null, points to a valid passwd record.
    Ok(unsafe { (*pw).pw_uid })
}

fn lookup_group(name: &str) -> Result<u32, String> {
    let c = CString::new(name).map_err(|_| format!("bad group name `{name}`"))?;
    // SAFETY: as in lookup_user.
    let gr = unsafe { libc::getgrnam(c.as_ptr()) };
    if gr.is_null() {
        return Err(format!(
            "no group `{name}` on this host (give a numeric gid)"
        ));
    }
    // SAFETY: non-null, points to a valid group record.
    Ok(unsafe { (*gr).gr_gid })
}

/// `path` and, when `recursive`, everything below it. Symlinks are not followed, not
/// even `path` itself (walkdir follows a root link unless told not to).
fn entries(path: &Path, recursive: bool) -> Vec<(PathBuf, fs::Metadata)> {
    let walk = walkdir::WalkDir::new(path)
        .follow_links(false)
        .follow_root_links(false)
        .max_depth(if recursive { usize::MAX } else { 0 });
    walk.into_iter()
        .flatten()
        .filter_map(|e| e.metadata().ok().map(|m| (e.into_path(), m)))
        .collect()
}

fn owner_text(meta: &fs::Metadata) -> String {
    format!("{}:{}", meta.uid(), meta.gid())
}

/// The guard shared by chown and chmod: never the state dir; a recursive change
/// walks a whole tree, so it is destructive-grade: at or below a root, no symlink on
/// the way below a root, and no other filesystem mounted below it (a tree on one
/// filesystem is changed whole, or not at all).
fn guard_target(path: &Path, recursive: bool, ctx: &ActionCtx) -> Result<(), Refusal> {
    guard::writable(path, ctx)?;
    if recursive {
        guard::destructive(path, Reach::Tree, Below::OrAt, ctx)?;
    }
    Ok(())
}

/// Preflight shared by chown and chmod: the path must exist; when it is only
/// predicted, its current metadata cannot be read yet.
fn target(path: &Path, recursive: bool, world: &World, ctx: &ActionCtx) -> Result<bool, Verdict> {
    if let Err(e) = guard_target(path, recursive, ctx) {
        return Err(Verdict::WouldFail(e.to_string()));
    }
    match world.node(path) {
        Node::Missing => Err(Verdict::WouldFail(format!("{} does not exist", show(path)))),
        _ => Ok(world.is_predicted(path)),
    }
}

// ---------------------------------------------------------------------------- chown

/// Change the owner (and group) of a path, or of a whole tree.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChownArgs {
    pub path: PathBuf,
    /// `uid:gid` (`1000:1000`), `user:group`, `user` or `:group`.
    pub owner: String,
    /// Also everything below `path` (symlinks themselves, never their targets); then
    /// `path` must be at or below a root and the tree on one filesystem.
    #[serde(default)]
    pub recursive: bool,
}

pub struct Chown;

impl Action for Chown {
    type Args = ChownArgs;
    const NAME: &'static str = "chown";
    const SUMMARY: &'static str =
        "change owner and group (uid:gid or names), optionally recursively";
    const OUTPUTS: &'static [&'static str] = &["path", "owner", "changed"];

    fn effect(&self, _: &ChownArgs) -> Effect {
        Effect::Idempotent
    }

    fn check_static(&self, args: &ChownArgs) -> Result<(), (String, String)> {
        if args.owner.contains("{{") {
            return Ok(());
        }
        Owner::parse(&args.owner)
            .map(|_| ())
            .map_err(|e| ("owner".into(), e))
    }

    fn preflight(&self, args: &ChownArgs, world: &mut World, ctx: &ActionCtx) -> Verdict {
        let owner = match Owner::parse(&args.owner) {
            Ok(o) => o,
            Err(e) => return Verdict::WouldFail(e),
        };
        match target(&args.path, args.recursive, world, ctx) {
            Err(v) => v,
            Ok(true) => Verdict::WillChange(format!("chown {owner} {}", show(&args.path))),
            Ok(false) => {
                let all = entries(&args.path, args.recursive);
                let differ = all.iter().filter(|(_, m)| !owner.matches(m)).count();
                let now = all.first().map(|(_, m)| owner_text(m)).unwrap_or_default();
                if differ == 0 {
                    Verdict::NoChange(format!("{} is owned by {owner}", show(&args.path)))
                } else {
                    world.predict_attrs(&args.path);
                    Verdict::WillChange(format!(
                        "chown {owner} {} ({differ} of {} entries differ; now {now})",
                        show(&args.path),
                        all.len()
                    ))
                }
            }
        }
    }

    fn execute(&self, args: &ChownArgs, ctx: &ActionCtx) -> Result<Outputs, ActionError> {
        let owner = Owner::parse(&args.owner).map_err(ActionError::Failed)?;
        guard_target(&args.path, args.recursive, ctx)?;
        if fs::symlink_metadata(&args.path).is_err() {
            return Err(ActionError::Failed(format!(
                "{} does not exist",
                args.path.display()
            )));
        }
        let mut changed = 0;
        for (path, meta) in entries(&args.path, args.recursive) {
            if !owner.matches(&meta) {
                owner.apply(&path)?;
                changed += 1;
            }
        }
        let mut out = Outputs::new();
        out.insert("path".into(), json!(args.path));
        out.insert("owner".into(), json!(owner.to_string()));
        out.insert("changed".into(), json!(changed));
        Ok(out)
    }
}

// ---------------------------------------------------------------------------- chmod

/// Change the mode of a path, or of a whole tree.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChmodArgs {
    pub path: PathBuf,
    /// Octal mode for `path` (and, when recursive, for every file below it).
    pub mode: Mode,
    /// With `recursive`, the mode for every directory, `path` itself included
    /// (default: `path` takes `mode`, the directories below are left).
    #[serde(default)]
    pub dir_mode: Option<Mode>,
    #[serde(default)]
    pub recursive: bool,
}

pub struct Chmod;

impl Chmod {
    /// The mode each entry should have (None: leave it).
    fn wanted(args: &ChmodArgs, path: &Path, meta: &fs::Metadata) -> Result<Option<u32>, String> {
        if meta.file_type().is_symlink() {
            return Ok(None);
        }
        if !meta.is_dir() || !args.recursive {
            return args.mode.bits().map(Some);
        }
        // Every directory of a recursive change gets `dir_mode`, the top one too (a
        // 0640 file mode would make the top directory untraversable); without it
        // only the top directory takes `mode`, and those below are left as they are.
        match &args.dir_mode {
            Some(dir_mode) => dir_mode.bits().map(Some),
            None if path == args.path => args.mode.bits().map(Some),
            None => Ok(None),
        }
    }

    fn plan(args: &ChmodArgs) -> Result<Vec<(PathBuf, u32, u32)>, String> {
        let mut out = Vec::new();
        for (path, meta) in entries(&args.path, args.recursive) {
            if let Some(want) = Self::wanted(args, &path, &meta)? {
                let now = meta.permissions().mode() & 0o7777;
                if now != want {
                    out.push((path, now, want));
                }
            }
        }
        Ok(out)
    }
}

impl Action for Chmod {
    type Args = ChmodArgs;
    const NAME: &'static str = "chmod";
    const SUMMARY: &'static str = "change the mode (octal), optionally recursively";
    const OUTPUTS: &'static [&'static str] = &["path", "mode", "changed"];

    fn effect(&self, _: &ChmodArgs) -> Effect {
        Effect::Idempotent
    }

    fn check_static(&self, args: &ChmodArgs) -> Result<(), (String, String)> {
        args.mode.check_static().map_err(|e| ("mode".into(), e))?;
        if let Some(m) = &args.dir_mode {
            m.check_static().map_err(|e| ("dir_mode".into(), e))?;
        }
        Ok(())
    }

    fn preflight(&self, args: &ChmodArgs, world: &mut World, ctx: &ActionCtx) -> Verdict {
        let bits = match args.mode.bits() {
            Ok(b) => b,
            Err(e) => return Verdict::WouldFail(e),
        };
        match target(&args.path, args.recursive, world, ctx) {
            Err(v) => v,
            Ok(true) => Verdict::WillChange(format!("chmod {bits:04o} {}", show(&args.path))),
            Ok(false) => match Self::plan(args) {
                Err(e) => Verdict::WouldFail(e),
                Ok(todo) if todo.is_empty() => {
                    Verdict::NoChange(format!("{} has mode {bits:04o}", show(&args.path)))
                }
                Ok(todo) => {
                    world.predict_attrs(&args.path);
                    Verdict::WillChange(format!(
                        "chmod {bits:04o} {} ({} entries; now {:04o})",
                        show(&args.path),
                        todo.len(),
                        todo[0].1
                    ))
                }
            },
        }
    }

    fn execute(&self, args: &ChmodArgs, ctx: &ActionCtx) -> Result<Outputs, ActionError> {
        guard_target(&args.path, args.recursive, ctx)?;
        if fs::symlink_metadata(&args.path).is_err() {
            return Err(ActionError::Failed(format!(
                "{} does not exist",
                args.path.display()
            )));
        }
        let todo = Self::plan(args).map_err(ActionError::Failed)?;
        for (path, _, want) in &todo {
            fs::set_permissions(path, fs::Permissions::from_mode(*want))
                .map_err(ActionError::io(format!("chmod {}", path.display())))?;
        }
        let mut out = Outputs::new();
        out.insert("path".into(), json!(args.path));
        out.insert(
            "mode".into(),
            json!(format!(
                "{:04o}",
                args.mode.bits().map_err(ActionError::Failed)?
            )),
        );
        out.insert("changed".into(), json!(todo.len()));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_specs() {
        assert_eq!(
            Owner::parse("1000:1000"),
            Ok(Owner {
                uid: Some(1000),
                gid: Some(1000)
            })
        );
        assert_eq!(
            Owner::parse("root"),
            Ok(Owner {
                uid: Some(0),
                gid: None
            })
        );
        assert_eq!(
            Owner::parse(":0"),
            Ok(Owner {
                uid: None,
                gid: Some(0)
            })
        );
        assert_eq!(
            Owner::parse("nosuchuser-xyz:1").unwrap_err(),
            "no user `nosuchuser-xyz` on this host (give a numeric uid)"
        );
        assert!(Owner::parse(":").is_err());
        assert_eq!(Owner::parse("12:34").unwrap().to_string(), "12:34");
    }
}
