//! Every local action, interrupted: the engine is SIGKILLed right before and right
//! after the side effect of each step in turn (RUNBOOK_FAILPOINT), then resumed. Each
//! must end exactly where an uninterrupted run ends.

use std::collections::BTreeMap;
use std::path::Path;

use crate::support::{Sandbox, end_state};

const ALL: &str = r#"version: 1
roots: ["{root}/work"]
steps:
  - id: make
    action: mkdir
    with: {path: work/snap/db}
  - id: copy-tree
    action: copy
    with: {from: data, to: work/snap/data}
  - id: write
    action: write-file
    with: {path: work/snap/meta.json, content: "{\"files\": {{ steps['copy-tree'].outputs.files }}}\n"}
  - id: json
    action: json-check
    with: {path: work/snap/meta.json, expect: [".files == 3"]}
  - id: db
    action: sqlite-backup
    with: {source: live.db, dest: work/snap/db/app.db}
  - id: db-check
    action: sqlite-check
    with: {path: work/snap/db/app.db, mode: full}
  - id: own
    action: chown
    with: {path: work/snap, owner: "1000:1000", recursive: true}
  - id: mode
    action: chmod
    with: {path: work/snap/meta.json, mode: "0600"}
  - id: check
    action: path-check
    with: {path: work/snap/meta.json, owner: "1000:1000", mode: "0600"}
  - id: aside
    action: move
    with: {from: work/snap/data, to: work/snap/data-old}
  - id: list
    action: snapshot-list
    with: {dir: work/snapshots}
  - id: prune
    action: retention
    with: {dir: work/snapshots, keep_daily: 1, keep_weekly: 0, keep_monthly: 0}
  - id: drop
    action: remove
    with: {path: work/snap/data-old}
"#;

const STEPS: [&str; 13] = [
    "make",
    "copy-tree",
    "write",
    "json",
    "db",
    "db-check",
    "own",
    "mode",
    "check",
    "aside",
    "list",
    "prune",
    "drop",
];

fn prepare() -> Sandbox {
    let sb = Sandbox::new();
    sb.write("runbooks/all.yaml", ALL);
    sb.write("data/a.txt", "alpha");
    sb.write("data/sub/b.txt", "beta");
    sb.write("data/sub/c.txt", "gamma");
    for stamp in ["20260101T020000Z", "20260102T020000Z", "20260103T020000Z"] {
        sb.write(&format!("work/snapshots/{stamp}/db/x"), stamp);
    }
    let conn = rusqlite::Connection::open(sb.p("live.db")).unwrap();
    conn.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT); INSERT INTO t(v) VALUES ('one'), ('two');")
        .unwrap();
    drop(conn);
    sb
}

/// What a run leaves below `work/` ([`end_state`]: no times, databases by their rows).
fn state(root: &Path) -> BTreeMap<String, String> {
    end_state(root, &["work"])
}

#[test]
fn each_action_killed_before_or_after_its_effect_resumes_to_the_same_end_state() {
    let reference = prepare();
    let r = reference.run(&["run", "all"]);
    assert_eq!(r.code, 0, "{r:?}");
    let expected = state(reference.path());
    assert!(
        expected.contains_key("work/snap/db/app.db")
            && !expected.contains_key("work/snap/data-old"),
        "{expected:#?}"
    );
    assert_eq!(
        expected
            .keys()
            .filter(|k| k.starts_with("work/snapshots/") && k.matches('/').count() == 2)
            .count(),
        1
    );

    for step in STEPS {
        for point in ["before", "after"] {
            let sb = prepare();
            let killed = sb
                .cmd(&["run", "all"])
                .env("RUNBOOK_FAILPOINT", format!("{point}:{step}"))
                .output()
                .unwrap();
            assert_eq!(
                killed.status.code(),
                None,
                "{point}:{step} was not killed: {}",
                String::from_utf8_lossy(&killed.stdout)
            );
            let stdout = String::from_utf8_lossy(&killed.stdout);
            let id = stdout.split_whitespace().nth(1).unwrap().to_string();
            let show = sb.run(&["show", &id, "--format", "json"]);
            let record: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
            let journaled = record["steps"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["key"] == step)
                .unwrap();
            assert_eq!(
                journaled["status"], "started",
                "{point}:{step}: intent was not journaled before the kill"
            );
            let r = sb.run(&["resume", &id]);
            assert_eq!(r.code, 0, "{point}:{step}: {r:?}");
            assert_eq!(state(sb.path()), expected, "{point}:{step} ended elsewhere");
            let leftovers: Vec<String> = walkdir::WalkDir::new(sb.p("work"))
                .into_iter()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(".runbook-"))
                .collect();
            assert!(
                leftovers.is_empty(),
                "{point}:{step}: temporary files left: {leftovers:?}"
            );
        }
    }
}
