//! `plan` / `run --dry-run`: verdicts per step, exact output, and nothing written.

use crate::support::{Sandbox, tree_digest};

const SNAPSHOT: &str = r#"# yaml-language-server: $schema=../schemas/runbook.schema.json
version: 1
description: Copy a data dir into a snapshot.
params:
  data_dir: {type: path, default: "{root}/live"}
  backup_dir: {type: path, default: "{root}/backups"}
  include_extra: {type: bool, default: false}
vars:
  snapshot: "{{ backup_dir }}/snapshots/s1"
roots: ["{{ backup_dir }}"]
steps:
  - id: make-dir
    action: mkdir
    with: {path: "{{ snapshot }}"}
  - id: copy-db
    action: copy
    with: {from: "{{ data_dir }}/db.sqlite", to: "{{ snapshot }}/db.sqlite"}
  - id: copy-extra
    action: copy
    when: include_extra
    with: {from: "{{ data_dir }}/extra", to: "{{ snapshot }}/extra"}
  - id: hash
    action: exec
    # It only reads: with `writes: []` the plan stays sharp for the steps after it.
    with: {argv: [sha256sum, "{{ snapshot }}/db.sqlite"], writes: []}
  - id: meta
    action: write-file
    with: {path: "{{ snapshot }}/meta.txt", content: "{{ steps.hash.outputs.stdout }}"}
  - id: same-dir
    action: mkdir
    with: {path: "{{ data_dir }}"}
rollback:
  - id: drop
    action: remove
    with: {path: "{{ snapshot }}"}
"#;

fn sandbox() -> Sandbox {
    let sb = Sandbox::new();
    sb.write("runbooks/snap.yaml", SNAPSHOT);
    sb.write("live/db.sqlite", "not really sqlite, but bytes\n");
    sb
}

#[test]
fn plan_of_a_valid_runbook_passes_with_exact_verdicts_and_writes_nothing() {
    let sb = sandbox();
    let before = tree_digest(sb.path());
    let r = sb.run(&["plan", "snap"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        sb.redact(&r.stdout),
        "plan snap (runbooks/snap.yaml)
params:
  data_dir = {root}/live
  backup_dir = {root}/backups
  include_extra = false
vars:
  snapshot = {root}/backups/snapshots/s1
steps:
  will change make-dir    mkdir: create `{root}/backups/snapshots/s1`
  will change copy-db     copy: copy file (29 bytes) `{root}/live/db.sqlite` to `{root}/backups/snapshots/s1/db.sqlite`
  skipped     copy-extra  copy: when `include_extra` is false
  will change hash        exec: run sha256sum {root}/backups/snapshots/s1/db.sqlite
  unknown     meta        write-file: unknown until hash runs
  no change   same-dir    mkdir: `{root}/live` exists
rollback (runs if a step fails):
  will change drop  remove: remove tree `{root}/backups/snapshots/s1`
6 steps: 3 will change, 1 no change, 1 unknown, 1 skipped, 0 would fail
"
    );
    // run --dry-run is the same command.
    let dry = sb.run(&["run", "snap", "--dry-run"]);
    assert_eq!((dry.code, &dry.stdout), (0, &r.stdout));
    let json = sb.run(&["plan", "snap", "--format", "json"]);
    assert_eq!(json.code, 0);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["steps"][4]["verdict"], "unknown");
    assert_eq!(v["steps"][4]["detail"], serde_json::json!(["hash"]));
    assert_eq!(v["steps"][2]["verdict"], "skipped");
    assert_eq!(
        v["steps"][1]["args"]["to"],
        format!("{}/backups/snapshots/s1/db.sqlite", sb.path().display())
    );
    assert_eq!(v["summary"]["will_change"], 3);
    assert_eq!(tree_digest(sb.path()), before, "plan wrote something");
    assert!(!sb.p("state").exists());
}

#[test]
fn a_step_that_would_fail_is_named_and_run_refuses_before_touching_anything() {
    let sb = sandbox();
    std::fs::remove_file(sb.p("live/db.sqlite")).unwrap();
    let before = tree_digest(sb.path());
    let r = sb.run(&["plan", "snap", "--set", "include_extra=true"]);
    assert_eq!(r.code, 3, "{r:?}");
    let lines: Vec<String> = sb.redact(&r.stdout).lines().map(str::to_string).collect();
    assert!(
        lines.contains(
            &"  would fail  copy-db     copy: source `{root}/live/db.sqlite` does not exist"
                .to_string()
        ),
        "{lines:#?}"
    );
    assert!(
        lines.contains(
            &"  would fail  copy-extra  copy: source `{root}/live/extra` does not exist"
                .to_string()
        ),
        "{lines:#?}"
    );
    assert_eq!(
        lines.last().unwrap(),
        "6 steps: 2 will change, 1 no change, 1 unknown, 0 skipped, 2 would fail"
    );

    let run = sb.run(&["run", "snap"]);
    assert_eq!(run.code, 3);
    assert_eq!(
        sb.redact(&run.stderr),
        "error: refusing to run `snap`: step `copy-db` would fail: source `{root}/live/db.sqlite` does not exist\nnothing was changed; fix the cause and run again (`runbook plan` shows the whole plan)\n"
    );
    assert_eq!(
        tree_digest(sb.path()),
        before,
        "a refused run wrote something"
    );
}

/// Ansible's check mode fails a copy into a directory that an earlier task would
/// create. Here the earlier step's predicted effect makes the check pass, and without
/// that step the same copy is reported as failing.
#[test]
fn a_copy_into_a_directory_an_earlier_step_creates_passes_the_dry_run() {
    let sb = Sandbox::new();
    sb.write("src.txt", "payload\n");
    let with_mkdir = "version: 1\nsteps:\n  - id: make\n    action: mkdir\n    with: {path: new/deep/dir}\n  - id: put\n    action: copy\n    with: {from: src.txt, to: new/deep/dir/dst.txt}\n  - id: again\n    action: copy\n    with: {from: new/deep/dir/dst.txt, to: new/deep/dir/dst2.txt}\n";
    sb.write("runbooks/with-mkdir.yaml", with_mkdir);
    sb.write(
        "runbooks/without-mkdir.yaml",
        &with_mkdir.replace(
            "action: mkdir\n    with: {path: new/deep/dir}",
            "action: mkdir\n    with: {path: elsewhere}",
        ),
    );
    let before = tree_digest(sb.path());
    let ok = sb.run(&["plan", "with-mkdir"]);
    assert_eq!(ok.code, 0, "{ok:?}");
    assert!(
        ok.stdout.contains(
            "  will change put    copy: copy file (8 bytes) `src.txt` to `new/deep/dir/dst.txt`\n"
        ),
        "{ok:?}"
    );
    assert!(ok.stdout.contains("  will change again  copy: copy file (8 bytes) `new/deep/dir/dst.txt` to `new/deep/dir/dst2.txt`\n"), "{ok:?}");
    let bad = sb.run(&["plan", "without-mkdir"]);
    assert_eq!(bad.code, 3);
    assert!(
        sb.redact(&bad.stdout).contains("  would fail  put    copy: parent directory `{root}/new/deep/dir` does not exist (add a `mkdir` step before this one)\n"),
        "{bad:?}"
    );
    assert_eq!(tree_digest(sb.path()), before);
    // And the run does what the plan said.
    let run = sb.run(&["run", "with-mkdir"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(sb.read("new/deep/dir/dst2.txt"), "payload\n");
}

/// Ansible re-evaluates `lookup('pipe','date')` per task, so one backup lands in two
/// timestamp directories. A var here is rendered once and frozen.
#[test]
fn a_now_utc_var_has_one_value_across_steps_separated_by_time() {
    let sb = Sandbox::new();
    sb.write(
        "runbooks/stamp.yaml",
        r#"version: 1
vars:
  stamp: "{{ now_utc('%Y%m%dT%H%M%S.%fZ') }}"
steps:
  - id: out
    action: mkdir
    with: {path: out}
  - id: first
    action: write-file
    with: {path: "out/first", content: "{{ stamp }}"}
  - id: pause
    action: exec
    with: {argv: [sleep, "1.5"]}
  - id: second
    action: write-file
    with: {path: "out/second", content: "{{ stamp }}"}
  - id: third
    action: exec
    with: {argv: [echo, "{{ stamp }}"]}
"#,
    );
    let r = sb.run(&["run", "stamp", "--format", "json"]);
    assert_eq!(r.code, 0, "{r:?}");
    let first = sb.read("out/first");
    assert_eq!(first.len(), "20261126T030000.000000000Z".len(), "{first}");
    assert_eq!(sb.read("out/second"), first);
    let events: Vec<serde_json::Value> = r
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let run_id = events[0]["run_id"].as_str().unwrap();
    assert_eq!(events[0]["event"], "run-started");
    assert_eq!(events[0]["vars"]["stamp"], first.as_str());
    let third = events
        .iter()
        .find(|e| e["event"] == "step-succeeded" && e["key"] == "third")
        .unwrap();
    assert_eq!(third["outputs"]["stdout"], first.as_str());
    let show = sb.run(&["show", run_id, "--format", "json"]);
    let record: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    assert_eq!(record["vars"]["stamp"], first.as_str());
}

#[test]
fn remove_is_refused_outside_roots_and_for_empty_renderings() {
    let sb = Sandbox::new();
    sb.write("keep/precious", "x");
    sb.write(
        "runbooks/rm.yaml",
        "version: 1\nparams:\n  target: {type: string, default: \"\"}\nroots: [\"{root}/scratch\"]\nsteps:\n  - id: outside\n    action: remove\n    with: {path: \"{root}/keep\"}\n  - id: empty\n    action: remove\n    with: {path: \"{{ target }}\"}\n  - id: root\n    action: remove\n    with: {path: \"{root}/scratch/../..\"}\n",
    );
    let r = sb.run(&["plan", "rm"]);
    assert_eq!(r.code, 3);
    let out = sb.redact(&r.stdout);
    assert!(out.contains("  would fail  outside  remove: refusing to act on `{root}/keep`: it is not below a declared root ({root}/scratch)\n"), "{out}");
    assert!(
        out.contains("  would fail  empty    remove: refusing to act on an empty path\n"),
        "{out}"
    );
    assert!(
        out.contains("  would fail  root     remove: refusing to act on `"),
        "{out}"
    );
    let run = sb.run(&["run", "rm"]);
    assert_eq!(run.code, 3);
    assert_eq!(sb.read("keep/precious"), "x");
}

#[test]
fn a_step_the_plan_skips_is_known_skipped_to_the_steps_after_it() {
    let sb = Sandbox::new();
    sb.write(
        "runbooks/gate.yaml",
        r#"version: 1
params:
  extra: {type: bool, default: false}
steps:
  - id: missing
    action: path-check
    on_failure: continue
    with: {path: "{root}/missing"}
  - id: optional
    action: path-check
    when: extra
    with: {path: "{root}"}
  - id: verdict
    action: assert
    with:
      that: "steps.missing.status != 'failed' and steps.optional.status != 'failed'"
      message: "missing is {{ steps.missing.status }}, optional is {{ steps.optional.status }}"
"#,
    );
    let before = tree_digest(sb.path());
    let r = sb.run(&["plan", "gate"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert_eq!(
        sb.redact(&r.stdout).lines().skip(3).collect::<Vec<_>>(),
        [
            "steps:",
            "  may fail    missing   path-check: `{root}/missing`: does not exist",
            "  skipped     optional  path-check: when `extra` is false",
            "  would fail  verdict   assert: missing is failed, optional is skipped",
            "3 steps: 0 will change, 0 no change, 0 unknown, 1 skipped, 1 would fail, 1 may fail (on_failure: continue)",
        ],
        "{r:?}"
    );
    let run = sb.run(&["run", "gate"]);
    assert_eq!(run.code, 3, "{run:?}");
    assert_eq!(tree_digest(sb.path()), before, "the plan wrote something");
}
