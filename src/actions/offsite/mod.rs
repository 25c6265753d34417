//! Off-site copies: encrypted, content-addressed snapshots in a repository reached by
//! OpenSSH (`offsite-push`, `offsite-list`, `offsite-fetch`, `offsite-retention`).
//!
//! Each file of a snapshot becomes one age-encrypted object named by a keyed hash of
//! its bytes, so an unchanged file is never sent twice, and the remote learns neither
//! content nor names. A push ends by checking the remote's digests of everything the
//! snapshot lists and only then writes its `verified` marker. Every action is
//! idempotent by construction: what is already there (objects, a verified snapshot, a
//! restored tree) is recognised, so resume simply runs an interrupted step again.

pub mod crypto;
pub mod fetch;
pub mod push;
pub mod repo;
pub mod ssh;

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;

use super::snapshots;
use super::{Action, ActionCtx, ActionError, Effect, Outputs, Verdict};
use crate::world::World;
use repo::{Inventory, RepoArgs, RepoError, check_snapshot, remote_digests};
use ssh::Remote;

/// Bytes as a person reads them.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64;
    let mut unit = "";
    for u in UNITS {
        v /= 1024.0;
        unit = u;
        if v < 1024.0 {
            break;
        }
    }
    format!("{v:.1} {unit}")
}

/// What to do after the link failed, appended to such errors.
pub fn resume_hint(remote: &Remote) -> String {
    format!(
        "when {} is reachable again, `runbook resume` this run (`runbook runs` lists it): it sends only what is missing",
        remote.target()
    )
}

/// The plan's key for a repository: a push earlier in the plan changes what the
/// steps after it will find there, which today's remote does not show.
fn world_key(repo: &RepoArgs, ctx: &ActionCtx) -> String {
    format!("offsite:{}", repo.local_dir(&ctx.state_dir).display())
}

/// The stamp an earlier step of the plan pushes to this repository.
fn pushed_before<'w>(world: &'w World, repo: &RepoArgs, ctx: &ActionCtx) -> Option<&'w str> {
    world.predicted_state(&world_key(repo, ctx))
}

fn fail(e: impl std::fmt::Display) -> ActionError {
    ActionError::Failed(e.to_string())
}

// ---------------------------------------------------------------------------------
// offsite-push

/// Encrypt a snapshot directory and ship it to the off-site repository.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PushArgs {
    pub repo: RepoArgs,
    /// The local snapshot directory.
    pub source: PathBuf,
    /// The snapshot's name in the repository (its stamp, `YYYYMMDDTHHMMSSZ`).
    pub stamp: String,
    /// age public keys (`age1...`) to encrypt to: the only key material needed here.
    pub recipients: Vec<String>,
}

pub struct OffsitePush;

impl Action for OffsitePush {
    type Args = PushArgs;
    const NAME: &'static str = "offsite-push";
    const SUMMARY: &'static str = "encrypt a snapshot (age) and send what the off-site repository lacks over ssh/rsync; verified there by digest before it counts as shipped";
    const OUTPUTS: &'static [&'static str] = &[
        "stamp",
        "objects",
        "objects_sent",
        "bytes_sent",
        "bytes_total",
        "verified",
    ];

    fn effect(&self, _: &PushArgs) -> Effect {
        Effect::Idempotent
    }

    fn check_static(&self, args: &PushArgs) -> Result<(), (String, String)> {
        if !args.stamp.contains("{{") && !repo::valid_stamp(&args.stamp) {
            return Err((
                "stamp".into(),
                format!(
                    "`{}` is not a snapshot name (letters, digits, `-`, `_`, `.`)",
                    args.stamp
                ),
            ));
        }
        for (i, r) in args.recipients.iter().enumerate() {
            if !r.contains("{{") {
                crypto::parse_recipients(std::slice::from_ref(r))
                    .map_err(|e| (format!("recipients[{i}]"), e.to_string()))?;
            }
        }
        Ok(())
    }

    fn preflight(&self, args: &PushArgs, world: &mut World, ctx: &ActionCtx) -> Verdict {
        if world.is_predicted(&args.source) {
            world.predict_state(world_key(&args.repo, ctx), args.stamp.clone());
            return Verdict::WillChange(format!(
                "encrypt and send `{}` as {} to {} after the steps before this one",
                args.source.display(),
                args.stamp,
                Remote::new(&args.repo).target()
            ));
        }
        match push::plan(args, ctx) {
            Ok(p) => {
                let verdict = p.verdict();
                if matches!(verdict, Verdict::WillChange(_)) {
                    world.predict_state(world_key(&args.repo, ctx), args.stamp.clone());
                }
                verdict
            }
            Err(e) => Verdict::WouldFail(e),
        }
    }

    fn execute(&self, args: &PushArgs, ctx: &ActionCtx) -> Result<Outputs, ActionError> {
        push::run(args, ctx).map_err(ActionError::Failed)
    }
}

// ---------------------------------------------------------------------------------
// offsite-list

/// List the snapshots of the off-site repository, each re-verified by remote digests.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListArgs {
    pub repo: RepoArgs,
}

pub struct OffsiteList;

/// Every snapshot there, newest first, each checked against its list by the remote's
/// digests (only digests cross the link).
pub fn listing(repo_args: &RepoArgs) -> Result<Outputs, String> {
    repo_args.check()?;
    let remote = Remote::new(repo_args);
    let inv = Inventory::read(&remote, repo::Texts::Lists).map_err(|e| e.to_string())?;
    let mut stamps = inv.stamps();
    stamps.sort_by(|a, b| b.cmp(a));
    let lists: Vec<(String, Option<repo::ObjectList>)> =
        stamps.iter().map(|s| (s.clone(), inv.list(s))).collect();
    let mut names: Vec<String> = lists
        .iter()
        .filter_map(|(s, l)| Some(l.as_ref()?.paths(s)))
        .flatten()
        .map(|(p, _)| p)
        .filter(|p| inv.files.contains_key(p))
        .collect();
    names.sort();
    names.dedup();
    let digests = remote_digests(&remote, &names).map_err(|e| e.to_string())?;
    let mut snapshots = Vec::new();
    let mut latest = None;
    for (stamp, list) in lists {
        let (objects, bytes, problems) = match &list {
            None => (
                0,
                0,
                vec![format!("{} is missing or damaged", repo::list_path(&stamp))],
            ),
            Some(l) => {
                let mut problems = check_snapshot(l, &stamp, &digests);
                match inv.marker(&stamp) {
                    None => problems.push("no verified marker: the push did not finish".into()),
                    Some(m)
                        if m.objects_sha256
                            != crypto::sha256_hex(
                                inv.texts[&repo::list_path(&stamp)].as_bytes(),
                            ) =>
                    {
                        problems.push("its object list changed after it was verified".into())
                    }
                    Some(_) => {}
                }
                let bytes = l.paths(&stamp).iter().map(|(_, x)| x.bytes).sum::<u64>();
                (l.objects.len(), bytes, problems)
            }
        };
        let verified = problems.is_empty();
        if verified && latest.is_none() {
            latest = Some(stamp.clone());
        }
        snapshots.push(json!({
            "stamp": stamp,
            "objects": objects,
            "bytes": bytes,
            "verified": verified,
            "problems": problems,
        }));
    }
    let mut out = Outputs::new();
    out.insert("count".into(), json!(snapshots.len()));
    out.insert("latest".into(), json!(latest));
    out.insert("snapshots".into(), json!(snapshots));
    Ok(out)
}

impl Action for OffsiteList {
    type Args = ListArgs;
    const NAME: &'static str = "offsite-list";
    const SUMMARY: &'static str = "list the off-site snapshots newest first, each re-verified by remote sha256 digests; `latest` is the newest verified one";
    const OUTPUTS: &'static [&'static str] = &["count", "latest", "snapshots"];

    fn effect(&self, _: &ListArgs) -> Effect {
        Effect::ReadOnly
    }

    fn preflight(&self, args: &ListArgs, world: &mut World, ctx: &ActionCtx) -> Verdict {
        if let Some(stamp) = pushed_before(world, &args.repo, ctx) {
            return Verdict::Deferred(format!(
                "will list {} after the push of {stamp} before this step",
                Remote::new(&args.repo).target()
            ));
        }
        match listing(&args.repo) {
            Ok(out) => {
                let verified = out["snapshots"]
                    .as_array()
                    .map_or(0, |s| s.iter().filter(|x| x["verified"] == true).count());
                Verdict::NoChange(format!(
                    "{} snapshots on {}, {verified} verified; latest verified {}",
                    out["count"],
                    Remote::new(&args.repo).target(),
                    out["latest"].as_str().unwrap_or("none")
                ))
            }
            Err(e) => Verdict::WouldFail(e),
        }
    }

    fn execute(&self, args: &ListArgs, _: &ActionCtx) -> Result<Outputs, ActionError> {
        listing(&args.repo).map_err(ActionError::Failed)
    }
}

// ---------------------------------------------------------------------------------
// offsite-fetch

/// Fetch, verify and decrypt one off-site snapshot into a new directory.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FetchArgs {
    pub repo: RepoArgs,
    /// The snapshot's stamp, or `latest` for the newest verified one.
    #[serde(default = "latest")]
    pub stamp: String,
    /// The age identity file (as age-keygen writes it); its content is never shown.
    pub identity: PathBuf,
    /// The directory to create (absent or empty); made only once everything verified.
    pub dest: PathBuf,
}

fn latest() -> String {
    "latest".into()
}

pub struct OffsiteFetch;

impl Action for OffsiteFetch {
    type Args = FetchArgs;
    const NAME: &'static str = "offsite-fetch";
    const SUMMARY: &'static str = "fetch an off-site snapshot, check every ciphertext digest, decrypt and check every file's sha256, then move the tree into place";
    const OUTPUTS: &'static [&'static str] = &["stamp", "path", "files", "bytes", "bytes_received"];

    fn effect(&self, _: &FetchArgs) -> Effect {
        Effect::Idempotent
    }

    fn preflight(&self, args: &FetchArgs, world: &mut World, ctx: &ActionCtx) -> Verdict {
        if let Some(stamp) = pushed_before(world, &args.repo, ctx).map(str::to_string) {
            // What it will fetch is not there yet; the identity can be judged now.
            if let Err(e) = args
                .repo
                .check()
                .and_then(|_| crypto::load_identities(&args.identity).map_err(|e| e.to_string()))
            {
                return Verdict::WouldFail(e);
            }
            world.predict_dir(&args.dest);
            return Verdict::WillChange(format!(
                "fetch snapshot {} into `{}` after the push of {stamp} before this step",
                args.stamp,
                args.dest.display()
            ));
        }
        match fetch::plan(args, ctx) {
            Ok(text) => {
                world.predict_dir(&args.dest);
                Verdict::WillChange(text)
            }
            Err(fetch::Planned::Done(text)) => Verdict::NoChange(text),
            Err(fetch::Planned::Fails(e)) => Verdict::WouldFail(next_step(e)),
        }
    }

    fn execute(&self, args: &FetchArgs, ctx: &ActionCtx) -> Result<Outputs, ActionError> {
        fetch::run(args, ctx).map_err(|e| ActionError::Failed(next_step(e)))
    }
}

/// A refused snapshot says what to do next: another snapshot may still be whole, and
/// the operator who lost a host needs the command that tells.
fn next_step(error: String) -> String {
    if error.starts_with("refusing snapshot ") {
        format!(
            "{error}. An older snapshot may be whole: `offsite-list` (atocore/offsite-list) shows which are still verified; fetch one of those by its stamp"
        )
    } else {
        error
    }
}

// ---------------------------------------------------------------------------------
// offsite-retention

/// Apply the daily/weekly/monthly policy to the off-site snapshots.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetentionArgs {
    pub repo: RepoArgs,
    #[serde(default = "seven")]
    pub keep_daily: usize,
    #[serde(default = "four")]
    pub keep_weekly: usize,
    #[serde(default = "six")]
    pub keep_monthly: usize,
}

fn seven() -> usize {
    7
}
fn four() -> usize {
    4
}
fn six() -> usize {
    6
}

pub struct OffsiteRetention;

/// What retention removes: decided over the verified stamped snapshots (an unverified
/// one may be a push still to be resumed: it is left alone, and so are its objects).
struct Pruning {
    decision: snapshots::Decision,
    unverified: Vec<String>,
    objects: Vec<String>,
    bytes: u64,
    tombstones: Vec<String>,
}

fn pruning(args: &RetentionArgs, remote: &Remote) -> Result<Pruning, String> {
    args.repo.check()?;
    let inv = Inventory::read(remote, repo::Texts::Lists).map_err(|e: RepoError| e.to_string())?;
    let stamps = inv.stamps();
    let (verified, unverified): (Vec<String>, Vec<String>) = stamps
        .into_iter()
        .partition(|s| inv.marker(s).is_some() && inv.list(s).is_some());
    let decision = snapshots::decide(
        &verified,
        args.keep_daily,
        args.keep_weekly,
        args.keep_monthly,
    );
    let mut referenced = std::collections::BTreeSet::new();
    let staying = decision
        .keep
        .iter()
        .map(|k| &k.stamp)
        .chain(&decision.ignored)
        .chain(&unverified);
    for s in staying {
        if let Some(l) = inv.list(s) {
            referenced.extend(l.objects.keys().map(|id| repo::object_path(id)));
        }
    }
    // Objects only the pruned snapshots list. An object no list names is an
    // interrupted push's upload: it stays, as its resume will list it.
    let mut objects = std::collections::BTreeSet::new();
    for s in &decision.delete {
        if let Some(l) = inv.list(s) {
            for id in l.objects.keys() {
                let p = repo::object_path(id);
                if !referenced.contains(&p) && inv.files.contains_key(&p) {
                    objects.insert(p);
                }
            }
        }
    }
    let bytes = objects.iter().map(|p| inv.files[p]).sum();
    Ok(Pruning {
        decision,
        unverified,
        objects: objects.into_iter().collect(),
        bytes,
        tombstones: inv.tombstones(),
    })
}

impl Action for OffsiteRetention {
    type Args = RetentionArgs;
    const NAME: &'static str = "offsite-retention";
    const SUMMARY: &'static str = "delete off-site snapshots outside the daily/weekly/monthly policy, then the objects no kept snapshot lists";
    const OUTPUTS: &'static [&'static str] = &["kept", "deleted", "objects_deleted", "bytes_freed"];

    fn effect(&self, _: &RetentionArgs) -> Effect {
        Effect::Idempotent
    }

    fn preflight(&self, args: &RetentionArgs, world: &mut World, ctx: &ActionCtx) -> Verdict {
        let remote = Remote::new(&args.repo);
        if let Some(stamp) = pushed_before(world, &args.repo, ctx) {
            return Verdict::WillChange(format!(
                "apply retention on {} after the push of {stamp} before this step",
                remote.target()
            ));
        }
        let p = match pruning(args, &remote) {
            Ok(p) => p,
            Err(e) => return Verdict::WouldFail(e),
        };
        let kept: Vec<String> = p
            .decision
            .keep
            .iter()
            .map(|k| format!("{} [{}]", k.stamp, k.why.join(", ")))
            .collect();
        let unverified = if p.unverified.is_empty() {
            String::new()
        } else {
            format!("; left alone (not verified): {}", p.unverified.join(" "))
        };
        if p.decision.delete.is_empty() {
            Verdict::NoChange(format!(
                "keeps all {} off-site snapshots: {}{unverified}",
                p.decision.keep.len(),
                kept.join("; ")
            ))
        } else {
            Verdict::WillChange(format!(
                "delete {} of {} off-site snapshots: {} and {} objects ({}) no kept snapshot lists; keep {}: {}{unverified}",
                p.decision.delete.len(),
                p.decision.delete.len() + p.decision.keep.len(),
                p.decision.delete.join(" "),
                p.objects.len(),
                human(p.bytes),
                p.decision.keep.len(),
                kept.join("; ")
            ))
        }
    }

    fn execute(&self, args: &RetentionArgs, _: &ActionCtx) -> Result<Outputs, ActionError> {
        let remote = Remote::new(&args.repo);
        let p = pruning(args, &remote).map_err(ActionError::Failed)?;
        // Objects first, then the snapshots: killed between the two, the pruned
        // snapshots are still there (their lists name what is left to remove) and a
        // resume decides the same over the same set. The other way round, the objects
        // would be left unlisted, indistinguishable from an interrupted push's.
        let mut lines: Vec<String> = p.tombstones.iter().map(|t| format!("T {t}")).collect();
        lines.extend(p.objects.iter().map(|o| format!("O {o}")));
        lines.extend(p.decision.delete.iter().map(|s| format!("S {s}")));
        if !lines.is_empty() {
            repo::remove(&remote, &lines).map_err(fail)?;
        }
        let mut out = Outputs::new();
        out.insert(
            "kept".into(),
            json!(
                p.decision
                    .keep
                    .iter()
                    .map(|k| json!({"stamp": k.stamp, "why": k.why}))
                    .collect::<Vec<_>>()
            ),
        );
        out.insert("deleted".into(), json!(p.decision.delete));
        out.insert("objects_deleted".into(), json!(p.objects.len()));
        out.insert("bytes_freed".into(), json!(p.bytes));
        Ok(out)
    }
}
