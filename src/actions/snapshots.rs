//! Snapshot directories named by their UTC stamp (`YYYYMMDDTHHMMSSZ`): the retention
//! policy of the AtoCore procedure, which the procedure itself leaves unimplemented.
//!
//! The policy, counted independently (a snapshot may satisfy several rules):
//! - daily: the newest snapshot of each of the last `keep_daily` days that have one;
//! - weekly: the first snapshot of each of the last `keep_weekly` weeks, weeks starting
//!   on Sunday — so it is the Sunday snapshot, or, when that Sunday was missed, the
//!   first one after it in the same week;
//! - monthly: the first snapshot of each of the last `keep_monthly` calendar months —
//!   the one of the 1st, or the first after it when the 1st was missed.
//!
//! "Last" counts periods that have snapshots, from the newest snapshot back, not from
//! today: a paused backup job does not make retention delete everything. The newest
//! snapshot is always kept, and anything not named like a stamp is never touched.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use chrono::{Datelike, NaiveDate, NaiveDateTime};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;

use super::files::staging;
use super::guard::{self, Below, Reach};
use super::{Action, ActionCtx, ActionError, Effect, Outputs, Verdict};
use crate::world::{Node, World};

/// Delete snapshots the retention policy does not keep.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetentionArgs {
    /// The directory holding one subdirectory per snapshot, named `YYYYMMDDTHHMMSSZ`.
    pub dir: PathBuf,
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

pub struct Retention;

/// List the stamped snapshots, newest first, with their metadata files.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotListArgs {
    /// The directory holding one subdirectory per snapshot.
    pub dir: PathBuf,
    /// A JSON file inside each snapshot to read as its metadata.
    #[serde(default = "metadata_name")]
    pub metadata: String,
    /// A missing `dir` lists no snapshots instead of failing (before the first backup).
    #[serde(default)]
    pub if_exists: bool,
}

fn metadata_name() -> String {
    "backup-metadata.json".to_string()
}

pub struct SnapshotList;

fn snapshot_listing(args: &SnapshotListArgs) -> Result<Outputs, String> {
    let missing = args.if_exists && std::fs::symlink_metadata(&args.dir).is_err();
    let mut names: Vec<String> = if missing {
        Vec::new()
    } else {
        list(&args.dir)?
    }
    .into_iter()
    .filter(|n| parse_stamp(n).is_some())
    .collect();
    names.sort_by(|a, b| b.cmp(a));
    let backups: Vec<serde_json::Value> = names
        .iter()
        .map(|n| {
            let path = args.dir.join(n);
            let metadata = std::fs::read_to_string(path.join(&args.metadata))
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
            json!({"stamp": n, "path": path, "metadata": metadata})
        })
        .collect();
    let mut out = Outputs::new();
    out.insert("backup_dir".into(), json!(args.dir));
    out.insert("latest".into(), json!(names.first()));
    out.insert("count".into(), json!(names.len()));
    out.insert("backups".into(), json!(backups));
    Ok(out)
}

impl Action for SnapshotList {
    type Args = SnapshotListArgs;
    const NAME: &'static str = "snapshot-list";
    const PLAN_RUNS_IT: bool = true;
    const SUMMARY: &'static str =
        "list stamped snapshots newest first, with their metadata; `latest` is the newest stamp";
    const OUTPUTS: &'static [&'static str] = &["backup_dir", "latest", "count", "backups"];

    fn effect(&self, _: &SnapshotListArgs) -> Effect {
        Effect::ReadOnly
    }

    fn preflight(&self, args: &SnapshotListArgs, world: &mut World, _: &ActionCtx) -> Verdict {
        if world.is_predicted(&args.dir) {
            return Verdict::Deferred(format!(
                "will list `{}` after the steps before this one",
                args.dir.display()
            ));
        }
        match world.node_followed(&args.dir) {
            Node::Dir => match snapshot_listing(args) {
                Ok(out) => Verdict::NoChange(format!(
                    "{} snapshots in `{}`; latest {}",
                    out["count"],
                    args.dir.display(),
                    out["latest"].as_str().unwrap_or("none")
                )),
                Err(e) => Verdict::WouldFail(e),
            },
            Node::Missing if args.if_exists => Verdict::NoChange(format!(
                "`{}` does not exist: no snapshots yet (if_exists)",
                args.dir.display()
            )),
            _ => Verdict::WouldFail(format!("`{}` is not a directory", args.dir.display())),
        }
    }

    fn execute(&self, args: &SnapshotListArgs, _: &ActionCtx) -> Result<Outputs, ActionError> {
        snapshot_listing(args).map_err(ActionError::Failed)
    }
}

/// A snapshot the policy keeps, with every rule that keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    pub stamp: String,
    pub why: Vec<String>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Decision {
    pub keep: Vec<Kept>,
    pub delete: Vec<String>,
    /// Entries that are not stamps: left alone.
    pub ignored: Vec<String>,
}

pub fn parse_stamp(name: &str) -> Option<NaiveDateTime> {
    if name.len() != 16 {
        return None;
    }
    NaiveDateTime::parse_from_str(name, "%Y%m%dT%H%M%SZ").ok()
}

/// The policy itself, over names: pure, so the plan and the run decide alike.
pub fn decide(names: &[String], daily: usize, weekly: usize, monthly: usize) -> Decision {
    let mut stamps: Vec<(NaiveDateTime, String)> = Vec::new();
    let mut ignored = Vec::new();
    for n in names {
        match parse_stamp(n) {
            Some(t) => stamps.push((t, n.clone())),
            None => ignored.push(n.clone()),
        }
    }
    stamps.sort();
    let mut why: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut mark =
        |stamp: &str, reason: String| why.entry(stamp.to_string()).or_default().push(reason);
    // Newest per day, walking from the newest day back.
    let mut by_day: BTreeMap<NaiveDate, &str> = BTreeMap::new();
    for (t, n) in &stamps {
        by_day.insert(t.date(), n); // later ones overwrite: the newest of the day
    }
    for (day, n) in by_day.iter().rev().take(daily) {
        mark(n, format!("daily ({day})"));
    }
    // First per Sunday-started week / per month.
    let mut by_week: BTreeMap<NaiveDate, &str> = BTreeMap::new();
    let mut by_month: BTreeMap<(i32, u32), &str> = BTreeMap::new();
    for (t, n) in &stamps {
        let d = t.date();
        let sunday = d - chrono::Days::new(u64::from(d.weekday().num_days_from_sunday()));
        by_week.entry(sunday).or_insert(n);
        by_month.entry((d.year(), d.month())).or_insert(n);
    }
    for (sunday, n) in by_week.iter().rev().take(weekly) {
        mark(n, format!("weekly (week of Sunday {sunday})"));
    }
    for ((y, m), n) in by_month.iter().rev().take(monthly) {
        mark(n, format!("monthly ({y}-{m:02})"));
    }
    if let Some((_, newest)) = stamps.last() {
        mark(newest, "newest".to_string());
    }
    let mut keep = Vec::new();
    let mut delete = Vec::new();
    for (_, n) in stamps.iter().rev() {
        match why.remove(n) {
            Some(reasons) => keep.push(Kept {
                stamp: n.clone(),
                why: reasons,
            }),
            None => delete.push(n.clone()),
        }
    }
    delete.reverse(); // oldest first, as a person reads a list of what goes
    Decision {
        keep,
        delete,
        ignored,
    }
}

fn list(dir: &Path) -> Result<Vec<String>, String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    Ok(entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        // A snapshot being deleted is no snapshot (nor an entry to report as ignored).
        .filter(|n| staging::buried_name(n).is_none())
        .collect())
}

/// The stamps whose snapshot an interrupted prune left half-deleted (tombstones).
fn buried_stamps(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            staging::buried_name(&name)
                .filter(|n| parse_stamp(n).is_some())
                .map(str::to_string)
        })
        .collect()
}

fn outputs(d: &Decision) -> Outputs {
    let mut out = Outputs::new();
    out.insert(
        "kept".into(),
        json!(
            d.keep
                .iter()
                .map(|k| json!({"stamp": k.stamp, "why": k.why}))
                .collect::<Vec<_>>()
        ),
    );
    out.insert("deleted".into(), json!(d.delete));
    out.insert("ignored".into(), json!(d.ignored));
    out
}

impl Action for Retention {
    type Args = RetentionArgs;
    const NAME: &'static str = "retention";
    const SUMMARY: &'static str =
        "delete stamped snapshots outside the daily/weekly/monthly policy; every kept one says why";
    const OUTPUTS: &'static [&'static str] = &["kept", "deleted", "ignored"];

    fn effect(&self, _: &RetentionArgs) -> Effect {
        Effect::Idempotent
    }

    fn preflight(&self, args: &RetentionArgs, world: &mut World, ctx: &ActionCtx) -> Verdict {
        if let Err(e) = guard::destructive(&args.dir, Reach::Entry, Below::OrAt, ctx) {
            return Verdict::WouldFail(e.to_string());
        }
        if world.is_predicted(&args.dir) {
            return Verdict::WillChange(format!(
                "apply retention in `{}` after the steps before this one",
                args.dir.display()
            ));
        }
        if world.node_followed(&args.dir) != Node::Dir {
            return Verdict::WouldFail(format!("`{}` is not a directory", args.dir.display()));
        }
        let names = match list(&args.dir) {
            Ok(n) => n,
            Err(e) => return Verdict::WouldFail(e),
        };
        let d = decide(&names, args.keep_daily, args.keep_weekly, args.keep_monthly);
        for stamp in &d.delete {
            let path = args.dir.join(stamp);
            if let Err(e) = guard::destructive(&path, Reach::Tree, Below::Strictly, ctx) {
                return Verdict::WouldFail(e.to_string());
            }
            world.predict_absent(&path);
        }
        let kept: Vec<String> = d
            .keep
            .iter()
            .map(|k| format!("{} [{}]", k.stamp, k.why.join(", ")))
            .collect();
        if d.delete.is_empty() {
            Verdict::NoChange(format!(
                "keeps all {} snapshots: {}",
                d.keep.len(),
                kept.join("; ")
            ))
        } else {
            Verdict::WillChange(format!(
                "delete {} of {} snapshots: {}; keep {}: {}",
                d.delete.len(),
                d.delete.len() + d.keep.len(),
                d.delete.join(" "),
                d.keep.len(),
                kept.join("; ")
            ))
        }
    }

    fn execute(&self, args: &RetentionArgs, ctx: &ActionCtx) -> Result<Outputs, ActionError> {
        guard::destructive(&args.dir, Reach::Entry, Below::OrAt, ctx)?;
        // A prune killed mid-way left the snapshot it was deleting as a tombstone.
        for buried in buried_stamps(&args.dir) {
            let path = args.dir.join(&buried);
            let cleared = guard::destructive(&path, Reach::Tree, Below::Strictly, ctx)?;
            staging::sweep(&cleared.resolved)?;
        }
        let names = list(&args.dir).map_err(ActionError::Failed)?;
        // Deleting what the policy drops leaves a set it keeps whole, so a resumed
        // prune decides the same as the interrupted one did.
        let d = decide(&names, args.keep_daily, args.keep_weekly, args.keep_monthly);
        // Every snapshot is cleared before the first goes, so a refusal deletes nothing.
        let cleared = d
            .delete
            .iter()
            .map(|stamp| {
                guard::destructive(&args.dir.join(stamp), Reach::Tree, Below::Strictly, ctx)
            })
            .collect::<Result<Vec<_>, _>>()?;
        for path in cleared.into_iter().map(|c| c.resolved) {
            // Renamed out of the stamp namespace first: a half-deleted snapshot is never
            // listed as one. remove_dir_all does not follow symlinks found in the tree.
            staging::delete(&path, "retention:pruning")?;
        }
        Ok(outputs(&d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Daily 02:00Z snapshots from 2026-01-01 to 2026-11-26: the literal policy keeps 15.
    #[test]
    fn a_year_of_daily_snapshots_keeps_fifteen() {
        let mut names = Vec::new();
        let mut d = NaiveDate::from_ymd_opt(2026, 1, 1).unwrap();
        while d <= NaiveDate::from_ymd_opt(2026, 11, 26).unwrap() {
            names.push(format!("{}T020000Z", d.format("%Y%m%d")));
            d = d.succ_opt().unwrap();
        }
        names.push("manual-copy".into());
        let decision = decide(&names, 7, 4, 6);
        let kept: Vec<&str> = decision.keep.iter().map(|k| &k.stamp[..8]).collect();
        assert_eq!(
            kept,
            [
                "20261126", "20261125", "20261124", "20261123", "20261122", "20261121", "20261120",
                "20261115", "20261108", "20261101", "20261001", "20260901", "20260801", "20260701",
                "20260601"
            ]
        );
        assert_eq!(
            decision.keep[4].why,
            ["daily (2026-11-22)", "weekly (week of Sunday 2026-11-22)"]
        );
        assert_eq!(
            decision.keep[9].why,
            ["weekly (week of Sunday 2026-11-01)", "monthly (2026-11)"]
        );
        assert_eq!(decision.keep[0].why, ["daily (2026-11-26)", "newest"]);
        assert_eq!(decision.delete.len(), names.len() - 1 - 15);
        assert_eq!(decision.ignored, ["manual-copy"]);
    }

    #[test]
    fn a_missed_sunday_or_first_is_stood_in_for_by_the_next_snapshot() {
        let names: Vec<String> = ["20261002T020000Z", "20261005T020000Z", "20261013T020000Z"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let d = decide(&names, 0, 4, 6);
        let why: Vec<(&str, &Vec<String>)> =
            d.keep.iter().map(|k| (k.stamp.as_str(), &k.why)).collect();
        assert_eq!(
            why,
            [
                (
                    "20261013T020000Z",
                    &vec![
                        "weekly (week of Sunday 2026-10-11)".to_string(),
                        "newest".to_string()
                    ]
                ),
                (
                    "20261005T020000Z",
                    &vec!["weekly (week of Sunday 2026-10-04)".to_string()]
                ),
                (
                    "20261002T020000Z",
                    &vec![
                        "weekly (week of Sunday 2026-09-27)".to_string(),
                        "monthly (2026-10)".to_string()
                    ]
                ),
            ]
        );
    }
}
