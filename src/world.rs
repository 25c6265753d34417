//! What a step sees of the filesystem: the real one, or (in a dry-run) the real one
//! overlaid with the predicted effects of the steps planned before it.
//!
//! Everything here reads; nothing writes. That is what lets `plan` promise it touches
//! nothing while still letting a step that creates a directory make the next step's
//! "parent exists" check pass.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Node {
    Missing,
    /// A regular file; `len` is None when only predicted and its size is not known.
    File {
        len: Option<u64>,
    },
    Dir,
    /// A symlink, socket or device.
    Other,
}

#[derive(Debug, Clone)]
enum Predicted {
    Dir,
    File {
        len: Option<u64>,
    },
    Absent,
    /// Will hold a copy of this (real or predicted) path.
    CopyOf(PathBuf),
    /// Exists as on disk, but its owner or mode will change: its metadata on disk no
    /// longer tells what it will be.
    Attrs,
    /// Will hold what is on disk at this path now (a move of a real path, whose source
    /// is predicted absent afterwards).
    RealCopyOf(PathBuf),
}

#[derive(Debug, Default, Clone)]
pub struct World {
    /// None for the real world: predictions are dropped and every query goes to disk.
    overlay: Option<BTreeMap<PathBuf, Predicted>>,
    /// Predicted states of things that are not files, such as whether a service runs
    /// (`compose:...`, `container:NAME`, `systemd:UNIT`); kept only when `overlay` is.
    states: BTreeMap<String, String>,
    /// The step that made each prediction in `overlay`, for "after <step> runs".
    origins: BTreeMap<PathBuf, String>,
    /// The step being planned; set by the planner before each preflight.
    step: Option<String>,
    /// Steps whose effects cannot be predicted, and what the current step read of
    /// what they may have changed (see [`Opaque`]).
    opaque: Opacity,
    /// Bytes the steps judged so far will write, per filesystem (st_dev): a step's
    /// room check counts what the earlier steps of the same plan put there.
    written: BTreeMap<u64, u64>,
}

impl World {
    pub fn real() -> Self {
        World {
            overlay: None,
            ..World::default()
        }
    }

    pub fn predicted() -> Self {
        World {
            overlay: Some(BTreeMap::new()),
            ..World::default()
        }
    }

    /// True in a dry-run: the world is the real one plus predictions, and an action's
    /// preflight is the only look it gets (in a run, `execute` follows it).
    pub fn is_dry_run(&self) -> bool {
        self.overlay.is_some()
    }

    /// Names the step whose predictions follow (the planner calls it per step).
    pub fn set_step(&mut self, step: &str) {
        self.step = Some(step.to_string());
    }

    /// The step whose predicted effect decides what `path` will be, if any.
    pub fn predicted_by(&self, path: &Path) -> Option<&str> {
        let overlay = self.overlay.as_ref()?;
        let path = key(path);
        if let Some(step) = self.opaque.read(&path) {
            return Some(step);
        }
        path.ancestors()
            .find(|a| overlay.contains_key(*a))
            .and_then(|a| self.origins.get(a))
            .map(String::as_str)
    }

    /// The state an earlier step of the plan predicted for `key`, if any. The real
    /// world predicts nothing: the action must look for itself.
    pub fn predicted_state(&self, key: &str) -> Option<&str> {
        self.states.get(key).map(String::as_str)
    }

    pub fn predict_state(&mut self, key: impl Into<String>, state: impl Into<String>) {
        if self.overlay.is_some() {
            self.states.insert(key.into(), state.into());
        }
    }

    /// Counts `bytes` that a judged step will write on filesystem `dev`.
    pub fn will_write(&mut self, dev: u64, bytes: u64) {
        let total = self.written.entry(dev).or_default();
        *total = total.saturating_add(bytes);
    }

    /// What the steps judged so far will write on filesystem `dev`.
    pub fn bytes_written_on(&self, dev: u64) -> u64 {
        self.written.get(&dev).copied().unwrap_or(0)
    }

    /// True when this world holds a prediction for `path` or an ancestor, i.e. its
    /// content on disk does not tell what it will be.
    pub fn is_predicted(&self, path: &Path) -> bool {
        let Some(overlay) = &self.overlay else {
            return false;
        };
        let path = key(path);
        self.opaque.read(&path).is_some() || path.ancestors().any(|a| overlay.contains_key(a))
    }

    /// True when an earlier step's prediction (not an opaque step's reach) covers
    /// `path`: a query that does not count as reading what opaque steps may change.
    pub fn overlaid(&self, path: &Path) -> bool {
        let path = key(path);
        self.overlay
            .as_ref()
            .is_some_and(|o| path.ancestors().any(|a| o.contains_key(a)))
    }

    pub fn node(&self, path: &Path) -> Node {
        let path = key(path);
        if let Some(overlay) = &self.overlay {
            // Today's guess is still the answer, but the step's verdict is no longer
            // known: the planner sees the read.
            self.opaque.read(&path);
            for ancestor in path.ancestors() {
                match overlay.get(ancestor) {
                    None | Some(Predicted::Attrs) => continue,
                    Some(Predicted::Absent) => return Node::Missing,
                    Some(Predicted::File { len }) => {
                        return if ancestor == path {
                            Node::File { len: *len }
                        } else {
                            Node::Missing
                        };
                    }
                    Some(Predicted::Dir) if ancestor == path => return Node::Dir,
                    Some(Predicted::Dir) => break,
                    Some(Predicted::CopyOf(src)) => {
                        let rest = path.strip_prefix(ancestor).unwrap_or(Path::new(""));
                        return self.node(&src.join(rest));
                    }
                    Some(Predicted::RealCopyOf(src)) => {
                        let rest = path.strip_prefix(ancestor).unwrap_or(Path::new(""));
                        return real_node(&key(&src.join(rest)));
                    }
                }
            }
        }
        real_node(&path)
    }

    /// What `path` is to something that goes through it: a directory to create entries
    /// in or to run in, an ancestor on the way. A symlink found on disk there is
    /// followed, as the kernel follows it (`/srv` a link to `/data/srv` is a
    /// directory); `node` judges a final component as what it is.
    pub fn node_followed(&self, path: &Path) -> Node {
        match self.node(path) {
            Node::Other if !self.is_predicted(path) => match std::fs::metadata(path) {
                Ok(m) if m.is_dir() => Node::Dir,
                Ok(m) if m.is_file() => Node::File { len: Some(m.len()) },
                _ => Node::Other,
            },
            other => other,
        }
    }

    pub fn predict_dir(&mut self, path: &Path) {
        let path = key(path);
        // A directory that is really there needs no prediction: what is below it
        // stays real (and `is_predicted` false) for the steps after.
        if self.overlay.is_none()
            || (!self.is_predicted(&path) && self.node_followed(&path) == Node::Dir)
        {
            return;
        }
        // Only directories that do not exist (really or as predicted) get an entry, so
        // that existing ancestors keep answering from disk.
        let missing: Vec<PathBuf> = path
            .ancestors()
            .skip(1)
            .filter(|a| self.node_followed(a) != Node::Dir)
            .map(Path::to_path_buf)
            .collect();
        if let Some(overlay) = &mut self.overlay {
            // Outermost first, so that clearing stale predictions below one directory
            // does not drop the entry just made for the one above it.
            for ancestor in missing.into_iter().rev() {
                overlay.retain(|p, _| !p.starts_with(&ancestor));
                self.origins.retain(|p, _| !p.starts_with(&ancestor));
                if let Some(step) = &self.step {
                    self.origins.insert(ancestor.clone(), step.clone());
                }
                self.opaque.cleared(&ancestor, false);
                overlay.insert(ancestor, Predicted::Dir);
            }
            if let Some(step) = &self.step {
                self.origins.insert(path.clone(), step.clone());
            }
            // Only the directory itself is known: what an opaque step put in it is not.
            self.opaque.cleared(&path, false);
            overlay.insert(path, Predicted::Dir);
        }
    }

    pub fn predict_file(&mut self, path: &Path, len: Option<u64>) {
        let path = key(path);
        self.predict_replaced(&path, Predicted::File { len });
    }

    pub fn predict_copy(&mut self, from: &Path, to: &Path) {
        let (from, to) = (key(from), key(to));
        self.predict_replaced(&to, Predicted::CopyOf(from));
    }

    /// The owner or mode of `path` (and, if `recursive`, below it) will change.
    pub fn predict_attrs(&mut self, path: &Path) {
        let path = key(path);
        if let Some(overlay) = &mut self.overlay {
            overlay.entry(path).or_insert(Predicted::Attrs);
        }
    }

    /// `to` takes what `from` holds; `from` is gone.
    pub fn predict_move(&mut self, from: &Path, to: &Path) {
        let (from, to) = (key(from), key(to));
        if self.is_predicted(&from) {
            // Its content is itself a prediction: keep only its kind (a guess, when an
            // opaque step may have changed it).
            self.opaque.held = self.overlay.is_some() && self.opaque.extend_reach(&from, &to);
            match self.node(&from) {
                Node::Dir => self.predict_dir(&to),
                Node::File { len } => self.predict_file(&to, len),
                _ => self.predict_absent(&to),
            }
            self.opaque.held = false;
        } else {
            self.predict_replaced(&to, Predicted::RealCopyOf(from.clone()));
        }
        self.predict_absent(&from);
    }

    pub fn predict_absent(&mut self, path: &Path) {
        let path = key(path);
        self.predict_replaced(&path, Predicted::Absent);
    }

    fn predict_replaced(&mut self, path: &Path, what: Predicted) {
        if self.overlay.is_none() {
            return;
        }
        if let Some(overlay) = &mut self.overlay {
            overlay.retain(|p, _| !p.starts_with(path));
            self.origins.retain(|p, _| !p.starts_with(path));
            if let Some(step) = &self.step {
                self.origins.insert(path.to_path_buf(), step.clone());
            }
            self.opaque.cleared(path, true);
            overlay.insert(path.to_path_buf(), what);
        }
    }
}

/// What a step whose effects cannot be predicted (an `exec`, a started service, a
/// `POST`) may have changed: everything, or the paths it declares (`writes:`) with
/// everything below them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpaqueScope {
    Anywhere,
    Below(Vec<PathBuf>),
}

impl OpaqueScope {
    fn covers(&self, path: &Path) -> bool {
        match self {
            OpaqueScope::Anywhere => true,
            OpaqueScope::Below(paths) => paths.iter().any(|p| path.starts_with(p)),
        }
    }
}

/// One opaque step of the plan and the paths that later predictions have made known
/// again (`true`: with everything below; `false`: the path alone, as a `mkdir` knows
/// the directory but not what the opaque step put in it).
#[derive(Debug, Clone)]
struct Opaque {
    step: String,
    scope: OpaqueScope,
    cleared: Vec<(PathBuf, bool)>,
}

impl Opaque {
    /// Whether this step may have changed `path` (and nothing since has decided it).
    fn reaches(&self, path: &Path) -> bool {
        self.scope.covers(path)
            && !self
                .cleared
                .iter()
                .any(|(c, below)| path == c || (*below && path.starts_with(c)))
    }
}

/// The opaque steps recorded so far and what the step being judged read of their
/// reach. A query of a path that an opaque step may have changed answers with today's
/// guess, but notes the step: the planner then calls the verdict "unknown until that
/// step runs" rather than trust (or fail on) a guess.
#[derive(Debug, Default, Clone)]
struct Opacity {
    steps: Vec<Opaque>,
    /// Opaque steps (indexes into `steps`) whose reach the current step read.
    reads: RefCell<BTreeSet<usize>>,
    /// Every path the current step asked about (what a step that fails to predict its
    /// own effect may touch).
    queried: RefCell<BTreeSet<PathBuf>>,
    /// Set while a prediction is made from a guess within the reach (a move of what an
    /// opaque step may have changed): it clears nothing.
    held: bool,
}

impl Opacity {
    /// The newest opaque step that may have changed `path` (all of them are noted).
    fn read(&self, path: &Path) -> Option<&str> {
        self.queried.borrow_mut().insert(path.to_path_buf());
        let mut newest = None;
        for (i, o) in self.steps.iter().enumerate().rev() {
            if o.reaches(path) {
                self.reads.borrow_mut().insert(i);
                newest.get_or_insert(o.step.as_str());
            }
        }
        newest
    }

    /// `to` will hold what `from` holds: every opaque step that may have changed
    /// `from` reaches `to` as well. True if there was one.
    fn extend_reach(&mut self, from: &Path, to: &Path) -> bool {
        if self.read(from).is_none() {
            return false;
        }
        for o in &mut self.steps {
            let reaches = o.reaches(from);
            if let (OpaqueScope::Below(paths), true) = (&mut o.scope, reaches) {
                paths.push(to.to_path_buf());
            }
        }
        true
    }

    /// A prediction now decides `path`: opaque steps before it no longer reach it,
    /// unless the prediction rests on what they may have changed (`held`). A copy's
    /// prediction needs no hold: it is resolved through its source, reach and all.
    fn cleared(&mut self, path: &Path, below: bool) {
        if self.held {
            return;
        }
        for o in &mut self.steps {
            o.cleared.push((path.to_path_buf(), below));
        }
    }
}

impl World {
    /// Records that `step` (already judged) has effects the plan cannot predict within
    /// `scope`: from now on a query there is noted as depending on it. What the step
    /// predicted itself (a pidfile the engine writes) stays known.
    pub fn predict_opaque(&mut self, step: &str, scope: OpaqueScope) {
        if self.overlay.is_none() {
            return;
        }
        let scope = match scope {
            OpaqueScope::Below(paths) => {
                OpaqueScope::Below(paths.iter().map(|p| normalize(p)).collect())
            }
            any => any,
        };
        let cleared = self
            .origins
            .iter()
            .filter(|(_, s)| *s == step)
            .map(|(p, _)| (p.clone(), true))
            .collect();
        self.opaque.steps.push(Opaque {
            step: step.to_string(),
            scope,
            cleared,
        });
    }

    /// The opaque steps whose reach was read since the last call, and every path asked
    /// about (the planner calls it around each step).
    pub fn take_opaque_reads(&mut self) -> (Vec<String>, Vec<PathBuf>) {
        let mut steps: Vec<String> = Vec::new();
        for i in self.opaque.reads.take() {
            let step = &self.opaque.steps[i].step;
            if !steps.contains(step) {
                steps.push(step.clone());
            }
        }
        let paths = self.opaque.queried.take().into_iter().collect();
        (steps, paths)
    }
}

fn real_node(path: &Path) -> Node {
    match std::fs::symlink_metadata(path) {
        Err(_) => Node::Missing,
        Ok(m) if m.is_dir() => Node::Dir,
        Ok(m) if m.is_file() => Node::File { len: Some(m.len()) },
        Ok(_) => Node::Other,
    }
}

/// The name a path's predictions are kept under: absolute, with the symlinks on the
/// way that exist on disk resolved (the last component stays as written), so that
/// two spellings of one directory (`srv/app` and `disk/srv/app` when `srv` is a link)
/// share what the plan predicts for it.
fn key(path: &Path) -> PathBuf {
    crate::actions::guard::resolve_on_the_way(path)
}

/// Absolute and free of `.`/`..`, without touching the filesystem (the path may not
/// exist yet, and symlinks are not followed on purpose: a check must judge the path
/// that the action will use).
pub fn normalize(path: &Path) -> PathBuf {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .unwrap_or_else(|_| PathBuf::from("/"))
            .join(path)
    };
    let mut out = PathBuf::from("/");
    for c in absolute.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(part) => out.push(part),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predictions_overlay_the_real_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path();
        std::fs::write(base.join("src"), b"hello").unwrap();
        std::fs::write(base.join("untouched"), b"x").unwrap();
        let mut w = World::predicted();
        assert_eq!(w.node(&base.join("new/sub")), Node::Missing);
        w.predict_dir(&base.join("new/sub"));
        assert_eq!(w.node(&base.join("new")), Node::Dir);
        assert_eq!(w.node(&base.join("new/sub")), Node::Dir);
        w.predict_copy(&base.join("src"), &base.join("new/sub/copy"));
        assert_eq!(
            w.node(&base.join("new/sub/copy")),
            Node::File { len: Some(5) }
        );
        w.predict_move(&base.join("src"), &base.join("moved"));
        assert_eq!(w.node(&base.join("moved")), Node::File { len: Some(5) });
        assert_eq!(w.node(&base.join("src")), Node::Missing);
        w.predict_absent(&base.join("new"));
        assert_eq!(w.node(&base.join("new/sub/copy")), Node::Missing);
        assert!(base.join("src").exists(), "predictions touched the disk");
        // Each prediction remembers the step that made it.
        w.set_step("make-db");
        w.predict_file(&base.join("db.sqlite"), Some(4096));
        assert_eq!(w.predicted_by(&base.join("db.sqlite")), Some("make-db"));
        assert_eq!(w.predicted_by(&base.join("untouched")), None);
        assert!(w.is_dry_run() && !World::real().is_dry_run());
        // A directory that exists needs no prediction: what is in it stays real.
        w.set_step("ensure-base");
        w.predict_dir(base);
        assert!(!w.is_predicted(&base.join("untouched")));
        assert_eq!(w.predicted_by(base), None);
        // The real world ignores predictions.
        let mut real = World::real();
        real.predict_dir(&base.join("x"));
        assert_eq!(real.node(&base.join("x")), Node::Missing);
        assert!(!base.join("x").exists());
        real.predict_state("container:x", "stopped");
        assert_eq!(real.predicted_state("container:x"), None);
        w.predict_state("container:x", "stopped");
        assert_eq!(w.predicted_state("container:x"), Some("stopped"));
    }

    #[test]
    fn an_opaque_step_makes_its_reach_unknown_until_a_later_prediction_decides_it() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path();
        let mut w = World::predicted();
        w.set_step("dump");
        w.predict_opaque("dump", OpaqueScope::Below(vec![base.join("out")]));
        w.take_opaque_reads();
        assert_eq!(w.node(&base.join("elsewhere")), Node::Missing);
        assert_eq!(w.take_opaque_reads().0, Vec::<String>::new());
        assert!(w.is_predicted(&base.join("out/dump.sql")));
        assert_eq!(w.predicted_by(&base.join("out/dump.sql")), Some("dump"));
        assert_eq!(w.take_opaque_reads().0, vec!["dump".to_string()]);
        // A later step that decides the path without reading the reach makes it known.
        w.set_step("write");
        w.predict_file(&base.join("out/dump.sql"), Some(3));
        w.take_opaque_reads();
        assert_eq!(w.predicted_by(&base.join("out/dump.sql")), Some("write"));
        assert_eq!(w.take_opaque_reads().0, Vec::<String>::new());
        // A mkdir knows the directory, not what the opaque step put in it.
        w.set_step("mk");
        w.predict_dir(&base.join("out/sub"));
        w.take_opaque_reads();
        assert_eq!(w.node(&base.join("out/sub")), Node::Dir);
        assert_eq!(w.take_opaque_reads().0, Vec::<String>::new());
        w.node(&base.join("out/sub/x"));
        assert_eq!(w.take_opaque_reads().0, vec!["dump".to_string()]);
        // A copy or a move of what lies in the reach stays within it.
        w.set_step("copy");
        w.predict_copy(&base.join("out/other"), &base.join("copy"));
        w.predict_move(&base.join("out/more"), &base.join("moved"));
        w.take_opaque_reads();
        w.node(&base.join("copy"));
        assert_eq!(w.take_opaque_reads().0, vec!["dump".to_string()]);
        w.node(&base.join("moved"));
        assert_eq!(w.take_opaque_reads().0, vec!["dump".to_string()]);
        // The real world has no reach to speak of.
        let mut real = World::real();
        real.predict_opaque("dump", OpaqueScope::Anywhere);
        assert!(!real.is_predicted(&base.join("out/dump.sql")));
    }

    #[test]
    fn normalize_is_lexical() {
        assert_eq!(
            normalize(Path::new("/a/b/../c/./d")),
            PathBuf::from("/a/c/d")
        );
        assert_eq!(normalize(Path::new("/../..")), PathBuf::from("/"));
    }
}
