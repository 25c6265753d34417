//! Adversarial cases: the plan must not lie, and false alarms are lies too. A file an
//! opaque step (an `exec`, a `POST`, a started daemon) makes is "unknown until" that
//! step runs, never "would fail: does not exist"; a program that cannot be executed
//! is "would fail" in the plan, never "will change" and a failure at run time.

use std::os::unix::fs::PermissionsExt;

use serde_json::Value;

use crate::support::{Sandbox, tree_digest};

/// `plan --format json` of runbook `name`: (exit code, verdict and detail by step id).
fn plan(sb: &Sandbox, name: &str, extra: &[&str]) -> (i32, Vec<(String, String, Value)>) {
    let mut args = vec!["plan", name, "--format", "json"];
    args.extend_from_slice(extra);
    let r = sb.run(&args);
    let v: Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {r:?}"));
    let steps = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_string(),
                s["verdict"].as_str().unwrap().to_string(),
                sb.redact_json(&s["detail"]),
            )
        })
        .collect();
    (r.code, steps)
}

trait RedactJson {
    fn redact_json(&self, v: &Value) -> Value;
}

impl RedactJson for Sandbox {
    fn redact_json(&self, v: &Value) -> Value {
        match v {
            Value::String(s) => Value::String(self.redact(s)),
            other => other.clone(),
        }
    }
}

fn step<'a>(steps: &'a [(String, String, Value)], id: &str) -> (&'a str, &'a Value) {
    let (_, verdict, detail) = steps
        .iter()
        .find(|(s, _, _)| s == id)
        .unwrap_or_else(|| panic!("no step {id}: {steps:#?}"));
    (verdict, detail)
}

const DUMP_THEN_CHECK: &str = r#"version: 1
params:
  make: {type: bool, default: true}
steps:
  - id: dump
    action: exec
    with:
      argv: [sh, -c, 'if {{ make | lower }}; then sqlite3 "$0" .dump > "$1"; fi', "{root}/live.db", "{root}/dump.sql"]
  - id: check
    action: path-check
    with: {path: "{root}/dump.sql", type: file, min_size: 10}
  - id: make-db
    action: exec
    with: {argv: [sqlite3, "{root}/made.db", "create table t(x); insert into t values (42);"]}
  - id: query
    action: sqlite-query
    with: {path: "{root}/made.db", sql: "select x from t", expect: {rows: 1}}
  - id: integrity
    action: sqlite-check
    with: {path: "{root}/made.db"}
  - id: answer
    action: assert
    with: {that: "steps.query.outputs.rows[0].x == 42"}
"#;

fn dump_sandbox() -> Sandbox {
    let sb = Sandbox::new();
    sb.write("runbooks/dump.yaml", DUMP_THEN_CHECK);
    let db = sb.p("live.db");
    let out = std::process::Command::new("sqlite3")
        .arg(&db)
        .arg("create table docs(id integer primary key, body text); insert into docs(body) values ('hello');")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    sb
}

#[test]
fn a_file_an_exec_makes_is_unknown_until_it_runs_and_the_run_checks_it_for_real() {
    let sb = dump_sandbox();
    let before = tree_digest(sb.path());
    let (code, steps) = plan(&sb, "dump", &[]);
    assert_eq!(code, 0, "{steps:#?}");
    assert_eq!(step(&steps, "dump").0, "will-change");
    // Each exec may have changed anything: a later read waits for all of them.
    for (id, waits) in [
        ("check", vec!["dump"]),
        ("query", vec!["dump", "make-db"]),
        ("integrity", vec!["dump", "make-db"]),
    ] {
        assert_eq!(
            step(&steps, id),
            ("unknown", &serde_json::json!(waits)),
            "{id}"
        );
    }
    // The query's outputs are not known from today's disk either.
    assert_eq!(
        step(&steps, "answer"),
        ("unknown", &serde_json::json!(["query"]))
    );
    let text = sb.run(&["plan", "dump"]);
    assert!(
        text.stdout.contains("path-check: unknown until dump runs"),
        "{text:?}"
    );
    assert_eq!(tree_digest(sb.path()), before, "the plan wrote something");

    // `run` no longer refuses it: the dump is made, and then checked for real.
    let r = sb.run(&["run", "dump", "--format", "json"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(sb.read("dump.sql").contains("INSERT INTO docs"));
    let events: Vec<Value> = r
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let succeeded: Vec<&str> = events
        .iter()
        .filter(|e| e["event"] == "step-succeeded")
        .map(|e| e["key"].as_str().unwrap())
        .collect();
    assert_eq!(
        succeeded,
        ["dump", "check", "make-db", "query", "integrity", "answer"]
    );
}

#[test]
fn when_the_exec_does_not_make_the_file_the_run_fails_at_the_check() {
    let sb = dump_sandbox();
    let (code, steps) = plan(&sb, "dump", &["--set", "make=false"]);
    assert_eq!(code, 0, "{steps:#?}");
    assert_eq!(step(&steps, "check").0, "unknown");
    let r = sb.run(&["run", "dump", "--set", "make=false"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        sb.redact(&r.stdout).contains(
            "step `check` failed: precondition failed: `{root}/dump.sql`: does not exist"
        ),
        "{r:?}"
    );
    assert!(!sb.p("made.db").exists(), "the run went on after the check");
}

#[test]
fn writes_narrows_what_an_exec_makes_unknown_and_genuine_failures_stay() {
    let sb = Sandbox::new();
    sb.write(
        "runbooks/narrow.yaml",
        r#"version: 1
steps:
  - id: dump
    action: exec
    with:
      argv: [sh, -c, 'echo data > "$0"', "{root}/out/dump.txt"]
      writes: ["{root}/out/dump.txt"]
  - id: check-dump
    action: path-check
    with: {path: "{root}/out/dump.txt"}
  - id: keep
    action: copy
    with: {from: "{root}/out/dump.txt", to: "{root}/kept.txt"}
  - id: check-kept
    action: path-check
    with: {path: "{root}/kept.txt"}
  - id: elsewhere
    action: path-check
    with: {path: "{root}/never-written.txt"}
  - id: bad-arg
    action: exec
    with: {argv: [echo], timeout: "{{ 'soon' }}"}
"#,
    );
    std::fs::create_dir(sb.p("out")).unwrap();
    let (code, steps) = plan(&sb, "narrow", &[]);
    assert_eq!(code, 3, "{steps:#?}");
    assert_eq!(
        step(&steps, "check-dump"),
        ("unknown", &serde_json::json!(["dump"]))
    );
    // A copy of what the exec makes cannot predict its own effect either: what it
    // would write is unknown too, not a false "does not exist" two steps later.
    assert_eq!(
        step(&steps, "keep"),
        ("unknown", &serde_json::json!(["dump"]))
    );
    assert_eq!(
        step(&steps, "check-kept"),
        ("unknown", &serde_json::json!(["keep"]))
    );
    // Outside what it declares, the plan stays sharp: a real failure is a failure.
    assert_eq!(
        step(&steps, "elsewhere"),
        (
            "would-fail",
            &Value::String("`{root}/never-written.txt`: does not exist".into())
        )
    );
    // An argument error is not the exec's doing.
    let (verdict, detail) = step(&steps, "bad-arg");
    assert_eq!(verdict, "would-fail");
    assert!(
        detail
            .as_str()
            .unwrap()
            .starts_with("`soon` is not a duration"),
        "{detail}"
    );

    // `writes: []`: it writes no file, so a check of a file nobody makes fails.
    sb.write(
        "runbooks/none.yaml",
        "version: 1\nsteps:\n  - id: hello\n    action: exec\n    with: {argv: [echo, hi], writes: []}\n  - id: check\n    action: path-check\n    with: {path: \"{root}/out/dump.txt\"}\n",
    );
    let (code, steps) = plan(&sb, "none", &[]);
    assert_eq!(code, 3);
    assert_eq!(step(&steps, "check").0, "would-fail");
}

#[test]
fn a_post_and_a_started_daemon_are_opaque_but_a_get_is_not() {
    let sb = Sandbox::new();
    sb.write(
        "runbooks/svc.yaml",
        r#"version: 1
steps:
  - id: peek
    action: http
    with: {url: "http://127.0.0.1:9/health"}
  - id: check-1
    action: path-check
    with: {path: "{root}/backup/snapshot.db"}
  - id: backup
    action: http
    with: {method: POST, url: "http://127.0.0.1:9/admin/backup"}
  - id: check-2
    action: path-check
    with: {path: "{root}/backup/snapshot.db"}
"#,
    );
    sb.write(
        "runbooks/daemon.yaml",
        r#"version: 1
steps:
  - id: start
    action: daemon-start
    with: {argv: [sleep, "30"], pidfile: "{root}/svc.pid", log: "{root}/svc.log", writes: ["{root}/data"]}
  - id: check-3
    action: path-check
    with: {path: "{root}/data/made-by-service"}
  - id: pid
    action: path-check
    with: {path: "{root}/svc.pid"}
  - id: elsewhere
    action: path-check
    with: {path: "{root}/other"}
"#,
    );
    let before = tree_digest(sb.path());
    let (code, steps) = plan(&sb, "svc", &[]);
    assert_eq!(code, 3, "{steps:#?}");
    assert_eq!(step(&steps, "check-1").0, "would-fail");
    assert_eq!(
        step(&steps, "check-2"),
        ("unknown", &serde_json::json!(["backup"]))
    );
    let (code, steps) = plan(&sb, "daemon", &[]);
    assert_eq!(code, 3, "{steps:#?}");
    assert_eq!(
        step(&steps, "check-3"),
        ("unknown", &serde_json::json!(["start"]))
    );
    // What the engine itself writes for the daemon stays predicted.
    assert_eq!(step(&steps, "pid").0, "no-change");
    assert_eq!(step(&steps, "elsewhere").0, "would-fail");
    assert_eq!(tree_digest(sb.path()), before, "the plan wrote something");
}

#[test]
fn a_program_that_cannot_be_executed_would_fail_in_the_plan() {
    let sb = Sandbox::new();
    let tool = sb.write("tool.sh", "#!/bin/sh\necho hi\n");
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::create_dir(sb.p("adir")).unwrap();
    // A name on PATH: the first match has no execute bit, the second has.
    let shadow = sb.write("bin1/mytool", "#!/bin/sh\necho shadow\n");
    std::fs::set_permissions(&shadow, std::fs::Permissions::from_mode(0o644)).unwrap();
    let real = sb.write("bin2/mytool", "#!/bin/sh\necho real\n");
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o755)).unwrap();
    let only = sb.write("bin1/onlyplain", "#!/bin/sh\necho plain\n");
    std::fs::set_permissions(&only, std::fs::Permissions::from_mode(0o644)).unwrap();
    sb.write(
        "runbooks/noexec.yaml",
        r#"version: 1
params:
  program: {type: string, required: true}
steps:
  - id: run
    action: exec
    with: {argv: ["{{ program }}"]}
"#,
    );
    sb.write(
        "runbooks/daemon.yaml",
        "version: 1\nsteps:\n  - id: start\n    action: daemon-start\n    with: {argv: [\"{root}/tool.sh\"], pidfile: \"{root}/d.pid\", log: \"{root}/d.log\"}\n",
    );
    let path = format!(
        "{}:{}:{}",
        sb.p("bin1").display(),
        sb.p("bin2").display(),
        std::env::var("PATH").unwrap()
    );
    let run = |args: &[&str]| -> crate::support::Run {
        sb.cmd(args).env("PATH", &path).output().unwrap().into()
    };
    for (program, why) in [
        (
            sb.p("tool.sh").display().to_string(),
            "`{root}/tool.sh` is not executable (no execute permission)",
        ),
        (
            sb.p("adir").display().to_string(),
            "`{root}/adir` is a directory, not a program",
        ),
        (
            "onlyplain".to_string(),
            "`onlyplain` is not executable: `{root}/bin1/onlyplain` is on PATH without execute permission",
        ),
    ] {
        let set = format!("program={program}");
        let r = run(&["plan", "noexec", "--set", &set]);
        assert_eq!(r.code, 3, "{r:?}");
        assert!(
            sb.redact(&r.stdout)
                .contains(&format!("would fail  run  exec: {why}")),
            "{r:?}"
        );
        // run makes the same plan and refuses before anything runs.
        let r = run(&["run", "noexec", "--set", &set]);
        assert_eq!(r.code, 3, "{r:?}");
        assert!(sb.redact(&r.stderr).contains(why), "{r:?}");
    }
    // As execvp: the non-executable first match is skipped, the second one runs.
    let r = run(&[
        "run",
        "noexec",
        "--set",
        "program=mytool",
        "--format",
        "json",
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains(r#""stdout":"real""#), "{r:?}");
    // daemon-start looks its program up the same way.
    let r = run(&["plan", "daemon"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        sb.redact(&r.stdout)
            .contains("daemon-start: `{root}/tool.sh` is not executable (no execute permission)"),
        "{r:?}"
    );
}
