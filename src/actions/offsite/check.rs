//! `offsite-check`: the scheduled, remote verification of the repository (restic's
//! `check --read-data-subset`): every snapshot file authenticated, every manifest read
//! and checked, every object a snapshot needs present with the size that was sent, and
//! the remote's sha256 of all of them, or of a random subset, compared with the digests
//! the authenticated index recorded when they arrived. Only digests cross the link.
//! Each snapshot's result is written to `checks/<stamp>` (with an HMAC), which
//! `offsite-list` shows as its last check.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;

use super::crypto;
use super::fetch::{self, Opened};
use super::format::{self, Check, LockKind, Signed, object_path};
use super::repo::{self, Holder, RepoArgs};
use super::ssh::Remote;
use super::{check_pin, human, identities, pushed_before, with_path};
use crate::actions::{Action, ActionCtx, ActionError, Effect, Outputs, Verdict};
use crate::world::World;

/// [`fetch::open`] with `holder`'s lock taken.
pub fn open_locked(
    remote: &Remote,
    state_dir: &Path,
    ids: Option<crypto::IdentityFile>,
    holder: &Holder,
) -> Result<Opened, String> {
    fetch::open_with(remote, state_dir, ids, Some(holder))
}

/// Verify the off-site repository by the remote's digests, all of it or a subset.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "OffsiteCheckArgs")]
pub struct CheckArgs {
    pub repo: RepoArgs,
    /// How much of the objects' data to have the remote hash: `all` (default), a
    /// percentage (`10%`), or an amount (`500M`, `2G`) picked at random each run, so
    /// that weekly runs cover everything over time.
    #[serde(default = "all")]
    pub subset: String,
    /// The age identity file, on a host that does not keep the repository key (with
    /// `repo.key` pinned).
    #[serde(default)]
    pub identity: Option<PathBuf>,
}

fn all() -> String {
    "all".into()
}

enum Subset {
    All,
    Fraction(f64),
    Bytes(u64),
}

fn parse_subset(s: &str) -> Result<Subset, String> {
    let t = s.trim();
    if t == "all" {
        return Ok(Subset::All);
    }
    if let Some(p) = t.strip_suffix('%') {
        return match p.trim().parse::<f64>() {
            Ok(f) if f > 0.0 && f <= 100.0 => Ok(Subset::Fraction(f / 100.0)),
            _ => Err(format!("`subset`: `{s}` is not a percentage from 0 to 100")),
        };
    }
    let (num, mult) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        Some('T' | 't') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    match num.trim().parse::<u64>() {
        Ok(n) if n > 0 => Ok(Subset::Bytes(n.saturating_mul(mult))),
        _ => Err(format!(
            "`subset`: `{s}` is not `all`, a percentage (`10%`) or an amount (`500M`)"
        )),
    }
}

pub struct OffsiteCheck;

/// The check itself; with `write`, records each snapshot's result there.
fn check(args: &CheckArgs, ctx: &ActionCtx, write: bool) -> Result<Outputs, String> {
    args.repo.check()?;
    let subset = parse_subset(&args.subset)?;
    let ids = identities(&args.identity)?;
    let remote = Remote::new(&args.repo);
    let holder = Holder::new(LockKind::Shared, "offsite-check".into())?;
    let o = if write {
        open_locked(
            &remote,
            &ctx.state_dir,
            with_path(&ids, &args.identity),
            &holder,
        )?
    } else {
        fetch::open(&remote, &ctx.state_dir, with_path(&ids, &args.identity))?
    };
    let own = o.key.identities();
    let result = check_opened(&remote, &o, &subset, write, ids.as_ref().unwrap_or(&own));
    if write {
        let _ = repo::unlock(&remote, std::slice::from_ref(&holder.name));
    }
    result
}

fn check_opened(
    remote: &Remote,
    o: &Opened,
    subset: &Subset,
    write: bool,
    readers: &crypto::Identities,
) -> Result<Outputs, String> {
    let stamps = o.listing.stamps();
    let assessed = fetch::assess(remote, o, &stamps, readers)?;
    let mut problems: Vec<String> = o
        .bad_index
        .iter()
        .map(|n| format!("{n} does not authenticate with the repository key"))
        .collect();
    // Every object some authenticated snapshot needs, with who needs it.
    let mut needed: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for stamp in &stamps {
        match &assessed[stamp] {
            Ok(a) => {
                for id in a.manifest.objects() {
                    needed
                        .entry(id.to_string())
                        .or_default()
                        .push(stamp.clone());
                }
                needed
                    .entry(a.snapshot.manifest.clone())
                    .or_default()
                    .push(stamp.clone());
            }
            Err(e) => problems.push(format!("snapshot {stamp}: {e}")),
        }
    }
    // The sample: the whole set, or a random subset by count or bytes.
    let mut order: Vec<&String> = needed.keys().collect();
    shuffle(&mut order)?;
    let total_bytes: u64 = order
        .iter()
        .filter_map(|id| o.listing.objects.get(&object_path(id)))
        .sum();
    let budget = match subset {
        Subset::All => u64::MAX,
        Subset::Fraction(f) => ((total_bytes as f64) * f).ceil() as u64,
        Subset::Bytes(b) => *b,
    };
    let mut chosen: BTreeSet<String> = BTreeSet::new();
    let mut bytes = 0u64;
    for id in order {
        let size = o
            .listing
            .objects
            .get(&object_path(id))
            .copied()
            .unwrap_or(0);
        if bytes >= budget {
            break;
        }
        bytes += size;
        chosen.insert(id.clone());
    }
    let names: Vec<String> = chosen
        .iter()
        .map(|id| object_path(id))
        .filter(|p| o.listing.objects.contains_key(p))
        .collect();
    let digests = repo::remote_digests(remote, &names).map_err(|e| e.to_string())?;
    let mut bad: BTreeMap<String, String> = BTreeMap::new();
    for id in needed.keys() {
        let p = object_path(id);
        let why = match (o.listing.objects.get(&p), o.ciphers.get(id)) {
            (None, _) => Some("is missing".to_string()),
            (Some(n), Some(known)) if !known.iter().any(|c| c.bytes == *n) => {
                Some(format!("has {n} bytes, other than were sent"))
            }
            (Some(_), known) if chosen.contains(id) => match (digests.get(&p), known) {
                (None, _) => Some("could not be read".into()),
                (Some(_), None) => Some("has no recorded digest (no index names it)".into()),
                (Some(d), Some(k)) if !k.iter().any(|c| c.sha256 == *d) => {
                    Some("does not match its digest (damaged)".into())
                }
                _ => None,
            },
            _ => None,
        };
        if let Some(why) = why {
            bad.insert(id.clone(), format!("{p} {why}"));
        }
    }
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    for stamp in &stamps {
        let Ok(a) = &assessed[stamp] else { continue };
        let mut mine: Vec<String> = a.missing.clone();
        let objs: BTreeSet<String> = a
            .manifest
            .objects()
            .into_iter()
            .map(str::to_string)
            .chain(std::iter::once(a.snapshot.manifest.clone()))
            .collect();
        for id in &objs {
            if let Some(b) = bad.get(id)
                && !mine.contains(b)
            {
                mine.push(b.clone());
            }
        }
        for m in &mine {
            problems.push(format!("snapshot {stamp}: {m}"));
        }
        if write {
            let record = Check {
                stamp: stamp.clone(),
                checked_at: now.clone(),
                objects_checked: objs.iter().filter(|id| chosen.contains(*id)).count() as u64,
                objects: objs.len() as u64,
                problems: mine,
                mac: String::new(),
            };
            repo::put(remote, &format::check_path(stamp), &record.sign(&o.key))
                .map_err(|e| e.to_string())?;
        }
    }
    problems.dedup();
    let mut out = Outputs::new();
    out.insert("ok".into(), json!(problems.is_empty()));
    out.insert("problems".into(), json!(problems));
    out.insert("snapshots".into(), json!(stamps.len()));
    out.insert("objects_checked".into(), json!(names.len()));
    out.insert("bytes_checked".into(), json!(bytes.min(total_bytes)));
    out.insert("bytes_total".into(), json!(total_bytes));
    Ok(out)
}

/// Fisher-Yates with the kernel's random bytes.
fn shuffle<T>(v: &mut [T]) -> Result<(), String> {
    let mut pool: Vec<u8> = Vec::new();
    for i in (1..v.len()).rev() {
        if pool.len() < 8 {
            pool.extend(crypto::random_key().map_err(|e| e.to_string())?);
        }
        let b: [u8; 8] = pool.drain(..8).collect::<Vec<_>>().try_into().expect("8");
        let j = (u64::from_le_bytes(b) % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    Ok(())
}

impl Action for OffsiteCheck {
    type Args = CheckArgs;
    const NAME: &'static str = "offsite-check";
    const SUMMARY: &'static str = "verify the off-site repository remotely: snapshots authenticated, manifests whole, every needed object present, and the remote's sha256 of all (or a random --subset) of them against the digests recorded when they arrived; fails naming every problem";
    const OUTPUTS: &'static [&'static str] = &[
        "ok",
        "problems",
        "snapshots",
        "objects_checked",
        "bytes_checked",
        "bytes_total",
    ];

    fn effect(&self, _: &CheckArgs) -> Effect {
        // It writes only its own check records.
        Effect::Idempotent
    }

    fn check_static(&self, args: &CheckArgs) -> Result<(), (String, String)> {
        if !args.subset.contains("{{") {
            parse_subset(&args.subset).map_err(|e| ("subset".into(), e))?;
        }
        check_pin(&args.repo)
    }

    fn preflight(&self, args: &CheckArgs, world: &mut World, ctx: &ActionCtx) -> Verdict {
        let remote = Remote::new(&args.repo);
        if let Some(stamp) = pushed_before(world, &args.repo, ctx) {
            return Verdict::WillChange(format!(
                "check {} after the push of {stamp} before this step",
                remote.target()
            ));
        }
        // The plan reads the listing and the manifests; the remote hashes nothing.
        let planned = args.repo.check().and_then(|_| {
            let ids = identities(&args.identity)?;
            let o = fetch::open(&remote, &ctx.state_dir, with_path(&ids, &args.identity))?;
            let total: u64 = o.listing.objects.values().sum();
            Ok((o.listing.stamps().len(), total))
        });
        match planned {
            Ok((n, total)) => Verdict::WillChange(format!(
                "check {n} snapshots on {}: the remote hashes {} of {} of objects and the results are recorded there",
                remote.target(),
                args.subset,
                human(total)
            )),
            Err(e) => Verdict::WouldFail(e),
        }
    }

    fn execute(&self, args: &CheckArgs, ctx: &ActionCtx) -> Result<Outputs, ActionError> {
        let out = check(args, ctx, true).map_err(ActionError::Failed)?;
        if out["ok"] != true {
            let problems: Vec<String> = out["problems"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|p| p.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            return Err(ActionError::Failed(format!(
                "the off-site repository {} has {} problems: {}",
                Remote::new(&args.repo).target(),
                problems.len(),
                problems.join("; ")
            )));
        }
        Ok(out)
    }
}
