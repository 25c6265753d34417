//! Retention over a simulated calendar of snapshot directories.

use crate::support::{Sandbox, tree_digest};

const KEPT: [&str; 15] = [
    "20261126T020000Z",
    "20261125T020000Z",
    "20261124T020000Z",
    "20261123T020000Z",
    "20261122T020000Z",
    "20261121T020000Z",
    "20261120T020000Z",
    "20261115T020000Z",
    "20261108T020000Z",
    "20261101T020000Z",
    "20261001T020000Z",
    "20260901T020000Z",
    "20260801T020000Z",
    "20260701T020000Z",
    "20260601T020000Z",
];

#[test]
fn daily_snapshots_from_january_to_late_november_keep_exactly_fifteen() {
    let sb = Sandbox::new();
    let mut day = chrono::NaiveDate::from_ymd_opt(2026, 1, 1).unwrap();
    let mut all = Vec::new();
    while day <= chrono::NaiveDate::from_ymd_opt(2026, 11, 26).unwrap() {
        let stamp = format!("{}T020000Z", day.format("%Y%m%d"));
        sb.write(&format!("backups/snapshots/{stamp}/db/atocore.db"), "db");
        all.push(stamp);
        day = day.succ_opt().unwrap();
    }
    sb.write(
        "backups/snapshots/manual-before-upgrade/db/atocore.db",
        "keep me",
    );
    sb.write(
        "runbooks/retention.yaml",
        "version: 1\nroots: [\"{root}/backups/snapshots\"]\nsteps:\n  - id: prune\n    action: retention\n    with: {dir: backups/snapshots}\n",
    );
    let before = tree_digest(sb.path());
    let plan = sb.run(&["plan", "retention", "--format", "json"]);
    assert_eq!(plan.code, 0, "{plan:?}");
    assert_eq!(
        tree_digest(sb.path()),
        before,
        "the dry-run deleted something"
    );
    let v: serde_json::Value = serde_json::from_str(&plan.stdout).unwrap();
    let detail = v["steps"][0]["detail"].as_str().unwrap();
    let deleted: Vec<&str> = all
        .iter()
        .map(String::as_str)
        .filter(|s| !KEPT.contains(s))
        .collect();
    assert!(
        detail.starts_with(&format!(
            "delete {} of {} snapshots: {}; keep 15: ",
            deleted.len(),
            all.len(),
            deleted.join(" ")
        )),
        "{detail}"
    );
    assert!(
        detail.contains("20261101T020000Z [weekly (week of Sunday 2026-11-01), monthly (2026-11)]"),
        "{detail}"
    );

    let run = sb.run(&["run", "retention", "--format", "json"]);
    assert_eq!(run.code, 0, "{run:?}");
    let mut left: Vec<String> = std::fs::read_dir(sb.p("backups/snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    let mut expected: Vec<String> = KEPT
        .iter()
        .map(|s| s.to_string())
        .chain(["manual-before-upgrade".to_string()])
        .collect();
    expected.sort();
    assert_eq!(left, expected);
    let done = run
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|e| e["event"] == "step-succeeded")
        .unwrap();
    let kept: Vec<&str> = done["outputs"]["kept"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["stamp"].as_str().unwrap())
        .collect();
    assert_eq!(kept, KEPT);
    assert_eq!(
        done["outputs"]["kept"][0]["why"],
        serde_json::json!(["daily (2026-11-26)", "newest"])
    );
    assert_eq!(
        done["outputs"]["ignored"],
        serde_json::json!(["manual-before-upgrade"])
    );
    // Applying it again changes nothing.
    let again = sb.run(&["plan", "retention"]);
    assert!(
        again
            .stdout
            .contains("  no change   prune  retention: keeps all 15 snapshots: "),
        "{again:?}"
    );
}

#[test]
fn retention_outside_the_roots_is_refused() {
    let sb = Sandbox::new();
    sb.write("backups/snapshots/20260101T020000Z/x", "");
    sb.write("backups/snapshots/20260102T020000Z/x", "");
    sb.write(
        "runbooks/retention.yaml",
        "version: 1\nroots: [\"{root}/elsewhere\"]\nsteps:\n  - id: prune\n    action: retention\n    with: {dir: backups/snapshots, keep_daily: 1, keep_weekly: 0, keep_monthly: 0}\n",
    );
    let r = sb.run(&["run", "retention"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(sb.redact(&r.stderr).contains("refusing to act on `{root}/backups/snapshots`: it is not below a declared root ({root}/elsewhere)"), "{r:?}");
    assert!(sb.p("backups/snapshots/20260101T020000Z").exists());
}
