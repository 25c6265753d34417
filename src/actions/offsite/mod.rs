//! Off-site copies: encrypted, content-addressed, authenticated snapshots in a
//! repository reached by OpenSSH (`offsite-push`, `offsite-list`, `offsite-fetch`,
//! `offsite-retention`, `offsite-check`). The format is in `format.rs`.
//!
//! Each file of a snapshot becomes one age-encrypted object named by a keyed hash of
//! its bytes, so an unchanged file is never sent twice, the remote learns neither
//! content nor names, and whoever can write the off-site directory cannot make a
//! restore take other bytes. A push is committed by the snapshot file it writes last,
//! once the remote has checked the digest of everything sent. Every action is
//! idempotent by construction: what is already there (objects, a committed snapshot, a
//! restored tree) is recognised, so resume simply runs an interrupted step again.

pub mod check;
pub mod crypto;
pub mod fetch;
pub mod format;
pub mod key;
pub mod push;
pub mod repo;
pub mod ssh;
pub mod upload;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;

use super::snapshots;
use super::{Action, ActionCtx, ActionError, Effect, Outputs, Verdict};
use crate::world::World;
use format::{Cipher, Index, LockKind, Signed, object_path};
use repo::{Holder, RepoArgs};
use ssh::Remote;

/// Words for an I/O error that a full disk explains.
pub fn room_hint(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::ENOSPC) => " (no space left on that filesystem: make room there)",
        Some(libc::EDQUOT) => " (the disk quota there is used up)",
        _ => "",
    }
}

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
    const SUMMARY: &'static str = "encrypt a snapshot (age) and stream what the off-site repository lacks over ssh (tar, in batches); checked there by digest and linked without replacing before the snapshot is committed";
    const OUTPUTS: &'static [&'static str] = &[
        "stamp",
        "objects",
        "objects_sent",
        "bytes_sent",
        "bytes_total",
        "verified",
        "key",
    ];

    fn effect(&self, _: &PushArgs) -> Effect {
        Effect::Idempotent
    }

    fn check_static(&self, args: &PushArgs) -> Result<(), (String, String)> {
        if !args.stamp.contains("{{") && !format::valid_stamp(&args.stamp) {
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
        check_pin(&args.repo)
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

/// A pinned fingerprint that is not templated is checked at validate.
fn check_pin(repo: &RepoArgs) -> Result<(), (String, String)> {
    match repo.pinned() {
        Some(k) if !k.contains("{{") && !format::valid_fingerprint(k) => Err((
            "repo.key".into(),
            format!("`{k}` is not a key fingerprint (32 hex digits, as offsite-push prints it)"),
        )),
        _ => Ok(()),
    }
}

/// List the snapshots of the off-site repository: authenticated, complete, last checked.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListArgs {
    pub repo: RepoArgs,
    /// The age identity file, on a host that does not keep the repository key (with
    /// `repo.key` pinned); the pushing host needs neither.
    #[serde(default)]
    pub identity: Option<PathBuf>,
}

pub struct OffsiteList;

/// The loaded identities with their file, for [`fetch::open`].
pub(super) fn with_path<'a>(
    ids: &'a Option<crypto::Identities>,
    path: &'a Option<PathBuf>,
) -> Option<crypto::IdentityFile<'a>> {
    Some((ids.as_ref()?, path.as_deref()?))
}

/// The optional identity of list and check: an empty path (a runbook param left
/// empty) means none, as an empty `repo.key` does.
pub(super) fn identities(identity: &Option<PathBuf>) -> Result<Option<crypto::Identities>, String> {
    identity
        .as_ref()
        .filter(|p| !p.as_os_str().is_empty())
        .map(|p| crypto::load_identities(p).map_err(|e| e.to_string()))
        .transpose()
}

/// Every snapshot there, newest first: whether its file authenticates with the
/// repository key, whether every object it needs is there with the size that was
/// sent, and when an `offsite-check` last compared its objects' digests.
pub fn listing(args: &ListArgs, ctx: &ActionCtx) -> Result<Outputs, String> {
    args.repo.check()?;
    let ids = identities(&args.identity)?;
    let remote = Remote::new(&args.repo);
    let o = fetch::open(&remote, &ctx.state_dir, with_path(&ids, &args.identity))?;
    let mut stamps = o.listing.stamps();
    stamps.reverse();
    let own = o.key.identities();
    let assessed = fetch::assess(&remote, &o, &stamps, ids.as_ref().unwrap_or(&own))?;
    let mut snapshots = Vec::new();
    let mut latest = None;
    for stamp in &stamps {
        let checked = fetch::last_check(&o, stamp);
        let (authenticated, complete, objects, bytes, problems) = match &assessed[stamp] {
            Ok(a) => (
                true,
                a.complete(),
                a.snapshot.objects,
                a.snapshot.bytes,
                a.missing.clone(),
            ),
            Err(e) => (false, false, 0, 0, vec![e.clone()]),
        };
        // What `stamp=latest` would fetch: the last check's findings count too.
        let verified =
            authenticated && complete && checked.as_ref().is_none_or(|c| c.problems.is_empty());
        if verified && latest.is_none() {
            latest = Some(stamp.clone());
        }
        snapshots.push(json!({
            "stamp": stamp,
            "authenticated": authenticated,
            "complete": complete,
            "verified": verified,
            "objects": objects,
            "bytes": bytes,
            "last_checked": checked.as_ref().map(|c| c.checked_at.clone()),
            "last_check_problems": checked.as_ref().map(|c| c.problems.clone()),
            "problems": problems,
        }));
    }
    let mut out = Outputs::new();
    out.insert("count".into(), json!(snapshots.len()));
    out.insert("latest".into(), json!(latest));
    out.insert("snapshots".into(), json!(snapshots));
    out.insert("key".into(), json!(o.key.fingerprint()));
    Ok(out)
}

impl Action for OffsiteList {
    type Args = ListArgs;
    const NAME: &'static str = "offsite-list";
    const SUMMARY: &'static str = "list the off-site snapshots newest first: authenticated by the repository key, complete, last checked; `latest` is the newest authenticated and complete one";
    const OUTPUTS: &'static [&'static str] = &["count", "latest", "snapshots", "key"];

    fn effect(&self, _: &ListArgs) -> Effect {
        Effect::ReadOnly
    }

    fn check_static(&self, args: &ListArgs) -> Result<(), (String, String)> {
        check_pin(&args.repo)
    }

    fn preflight(&self, args: &ListArgs, world: &mut World, ctx: &ActionCtx) -> Verdict {
        if let Some(stamp) = pushed_before(world, &args.repo, ctx) {
            return Verdict::Deferred(format!(
                "will list {} after the push of {stamp} before this step",
                Remote::new(&args.repo).target()
            ));
        }
        match listing(args, ctx) {
            Ok(out) => {
                let verified = out["snapshots"]
                    .as_array()
                    .map_or(0, |s| s.iter().filter(|x| x["verified"] == true).count());
                Verdict::NoChange(format!(
                    "{} snapshots on {}, {verified} authenticated and complete; latest {}",
                    out["count"],
                    Remote::new(&args.repo).target(),
                    out["latest"].as_str().unwrap_or("none")
                ))
            }
            Err(e) => Verdict::WouldFail(e),
        }
    }

    fn execute(&self, args: &ListArgs, ctx: &ActionCtx) -> Result<Outputs, ActionError> {
        listing(args, ctx).map_err(ActionError::Failed)
    }
}

// ---------------------------------------------------------------------------------
// offsite-fetch

/// Fetch, verify and decrypt one off-site snapshot into a new directory.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FetchArgs {
    pub repo: RepoArgs,
    /// The snapshot's stamp, or `latest` for the newest authenticated and complete one.
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
    const SUMMARY: &'static str = "fetch an off-site snapshot authenticated by the repository key (this host's, or the pinned `repo.key`), decrypt it in one pass checking every file's keyed digest, then move the tree into place";
    const OUTPUTS: &'static [&'static str] =
        &["stamp", "path", "files", "bytes", "bytes_received", "key"];

    fn effect(&self, _: &FetchArgs) -> Effect {
        Effect::Idempotent
    }

    fn check_static(&self, args: &FetchArgs) -> Result<(), (String, String)> {
        check_pin(&args.repo)
    }

    fn preflight(&self, args: &FetchArgs, world: &mut World, ctx: &ActionCtx) -> Verdict {
        if let Some(stamp) = pushed_before(world, &args.repo, ctx).map(str::to_string) {
            // What it will fetch is not there yet; the identity can be judged now. The
            // key that authenticates it is the one that push keeps on this host (it
            // makes one when it makes the repository).
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
            "{error}. An older snapshot may be whole: `offsite-list` (atocore/offsite-list) shows which are still authenticated and complete; fetch one of those by its stamp"
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

/// What retention removes: decided over the authenticated snapshots (a snapshot file
/// that does not authenticate is no snapshot of ours: it is left alone and named),
/// then every object no kept snapshot needs.
struct Pruning {
    decision: snapshots::Decision,
    unauthenticated: Vec<String>,
    /// Objects no kept snapshot references, or None when a kept snapshot's manifest
    /// could not be read (then nothing is collected: what it needs is unknown).
    objects: Option<Vec<String>>,
    unreadable: Vec<String>,
    bytes: u64,
    /// Index files, and the merged one that replaces them.
    index_files: Vec<String>,
    merged: BTreeMap<String, Cipher>,
}

fn pruning(remote: &Remote, args: &RetentionArgs, o: &fetch::Opened) -> Result<Pruning, String> {
    let stamps = o.listing.stamps();
    let assessed = fetch::assess(remote, o, &stamps, &o.key.identities())?;
    let mut authentic = Vec::new();
    let mut unauthenticated = Vec::new();
    for stamp in &stamps {
        let text = &o.listing.texts[&format::snapshot_path(stamp)];
        match format::Snapshot::open(text, &o.key) {
            Ok(s) if s.stamp == *stamp => authentic.push(stamp.clone()),
            _ => unauthenticated.push(stamp.clone()),
        }
    }
    let decision = snapshots::decide(
        &authentic,
        args.keep_daily,
        args.keep_weekly,
        args.keep_monthly,
    );
    let mut reachable: BTreeSet<String> = BTreeSet::new();
    let mut unreadable = Vec::new();
    for s in decision
        .keep
        .iter()
        .map(|k| &k.stamp)
        .chain(&decision.ignored)
    {
        match &assessed[s] {
            Ok(a) => {
                reachable.insert(a.snapshot.manifest.clone());
                reachable.extend(a.manifest.objects().into_iter().map(str::to_string));
            }
            Err(e) => unreadable.push(format!("{s}: {e}")),
        }
    }
    let (objects, bytes) = if unreadable.is_empty() {
        let garbage: Vec<String> = o
            .listing
            .objects
            .keys()
            .filter(|p| {
                p.rsplit('/')
                    .next()
                    .is_some_and(|id| !reachable.contains(id))
            })
            .cloned()
            .collect();
        let bytes = garbage.iter().map(|p| o.listing.objects[p]).sum();
        (Some(garbage), bytes)
    } else {
        (None, 0)
    };
    let merged: BTreeMap<String, Cipher> = o
        .ciphers
        .iter()
        .filter(|(id, _)| reachable.contains(*id))
        .filter_map(|(id, v)| {
            let size = o.listing.objects.get(&object_path(id))?;
            let c = v.iter().find(|c| c.bytes == *size)?;
            Some((id.clone(), c.clone()))
        })
        .collect();
    Ok(Pruning {
        decision,
        unauthenticated,
        objects,
        unreadable,
        bytes,
        index_files: o
            .listing
            .index_files()
            .iter()
            .map(|(n, _)| n.to_string())
            .collect(),
        merged,
    })
}

fn retention_text(p: &Pruning, target: &str) -> (bool, String) {
    let kept: Vec<String> = p
        .decision
        .keep
        .iter()
        .map(|k| format!("{} [{}]", k.stamp, k.why.join(", ")))
        .collect();
    let mut notes = String::new();
    if !p.unauthenticated.is_empty() {
        notes.push_str(&format!(
            "; left alone (they do not authenticate with the repository key): {}",
            p.unauthenticated.join(" ")
        ));
    }
    if !p.unreadable.is_empty() {
        notes.push_str(&format!(
            "; no object is collected, as what these kept snapshots need cannot be read: {}",
            p.unreadable.join("; ")
        ));
    }
    let garbage = p.objects.as_ref().map_or(0, Vec::len);
    if p.decision.delete.is_empty() && garbage == 0 {
        return (
            false,
            format!(
                "keeps all {} off-site snapshots on {target}: {}{notes}",
                p.decision.keep.len(),
                kept.join("; ")
            ),
        );
    }
    (
        true,
        format!(
            "delete {} of {} off-site snapshots on {target}{}{} and {garbage} objects ({}) no kept snapshot needs; keep {}: {}{notes}",
            p.decision.delete.len(),
            p.decision.delete.len() + p.decision.keep.len(),
            if p.decision.delete.is_empty() {
                ""
            } else {
                ": "
            },
            p.decision.delete.join(" "),
            human(p.bytes),
            p.decision.keep.len(),
            kept.join("; ")
        ),
    )
}

impl Action for OffsiteRetention {
    type Args = RetentionArgs;
    const NAME: &'static str = "offsite-retention";
    const SUMMARY: &'static str = "with the repository locked exclusively, delete off-site snapshots outside the daily/weekly/monthly policy, then every object no kept snapshot needs";
    const OUTPUTS: &'static [&'static str] = &[
        "kept",
        "deleted",
        "objects_deleted",
        "bytes_freed",
        "left_alone",
    ];

    fn effect(&self, _: &RetentionArgs) -> Effect {
        Effect::Idempotent
    }

    fn check_static(&self, args: &RetentionArgs) -> Result<(), (String, String)> {
        check_pin(&args.repo)
    }

    fn preflight(&self, args: &RetentionArgs, world: &mut World, ctx: &ActionCtx) -> Verdict {
        let remote = Remote::new(&args.repo);
        if let Some(stamp) = pushed_before(world, &args.repo, ctx) {
            return Verdict::WillChange(format!(
                "apply retention on {} after the push of {stamp} before this step",
                remote.target()
            ));
        }
        let p = args
            .repo
            .check()
            .and_then(|_| fetch::open(&remote, &ctx.state_dir, None))
            .and_then(|o| pruning(&remote, args, &o));
        match p {
            Ok(p) => match retention_text(&p, &remote.target()) {
                (true, text) => Verdict::WillChange(text),
                (false, text) => Verdict::NoChange(text),
            },
            Err(e) => Verdict::WouldFail(e),
        }
    }

    fn execute(&self, args: &RetentionArgs, ctx: &ActionCtx) -> Result<Outputs, ActionError> {
        args.repo.check().map_err(ActionError::Failed)?;
        let remote = Remote::new(&args.repo);
        let holder = Holder::new(LockKind::Exclusive, "offsite-retention".into()).map_err(fail)?;
        let o = check::open_locked(&remote, &ctx.state_dir, None, &holder).map_err(fail)?;
        let result = (|| {
            let p = pruning(&remote, args, &o)?;
            // Snapshot files first (a snapshot is gone or whole), then the objects only
            // they needed; the new generation is written before anything is deleted, so
            // that no pushing host's cache counts a deleted object as there.
            let mut lines: Vec<String> =
                p.decision.delete.iter().map(|s| format!("S {s}")).collect();
            if let Some(objects) = &p.objects {
                lines.extend(objects.iter().map(|o| format!("O {o}")));
            }
            if !lines.is_empty() {
                let generation = crypto::hex(&crypto::random_key().map_err(|e| e.to_string())?)
                    [..16]
                    .to_string();
                repo::remove(&remote, &lines, Some(&generation)).map_err(|e| e.to_string())?;
                // One index for what is left, then the old ones (killed between, the
                // old ones still say the same).
                let name = format!("index/merged-{generation}");
                repo::put(&remote, &name, &Index::new(p.merged.clone()).sign(&o.key))
                    .map_err(|e| e.to_string())?;
                let old: Vec<String> = p
                    .index_files
                    .iter()
                    .filter(|n| **n != name)
                    .filter_map(|n| n.strip_prefix("index/"))
                    .map(|n| format!("I {n}"))
                    .collect();
                repo::remove(&remote, &old, None).map_err(|e| e.to_string())?;
            }
            Ok::<Pruning, String>(p)
        })();
        let _ = repo::unlock(&remote, std::slice::from_ref(&holder.name));
        let p = result.map_err(ActionError::Failed)?;
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
        out.insert(
            "objects_deleted".into(),
            json!(p.objects.as_ref().map_or(0, Vec::len)),
        );
        out.insert("bytes_freed".into(), json!(p.bytes));
        out.insert("left_alone".into(), json!(p.unauthenticated));
        Ok(out)
    }
}
