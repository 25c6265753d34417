//! Step locks (flock on a file, held for one step) and `confirm` gates.

use std::process::{Command, Stdio};

use crate::support::Sandbox;

const LOCKED: &str = r#"version: 1
lock: LOCKNAME
steps:
  - id: copy-chroma
    action: exec
    lock: {path: ingestion.lock, timeout: TIMEOUT}
    with: {argv: [sh, -c, "echo in >> held.log; while [ ! -e go ] && [ -e held.log ]; do sleep 0.02; done"]}
"#;

fn locked(sb: &Sandbox, name: &str, timeout: &str) {
    sb.write(
        &format!("runbooks/{name}.yaml"),
        &LOCKED.replace("LOCKNAME", name).replace("TIMEOUT", timeout),
    );
}

#[test]
fn a_step_lock_waits_for_its_holder_and_names_it_when_it_gives_up() {
    let sb = Sandbox::new();
    sb.write("go", "");
    // A process that is not a runbook holds the lock: util-linux flock.
    let mut holder = Command::new("flock")
        .args([
            "-o",
            "ingestion.lock",
            "sh",
            "-c",
            "echo locked > flock.started; while [ ! -e release ]; do sleep 0.02; done",
        ])
        .current_dir(sb.path())
        .spawn()
        .unwrap();
    sb.wait_for("flock to hold the lock", || sb.p("flock.started").exists());
    locked(&sb, "short", "300ms");
    let plan = sb.run(&["plan", "short"]);
    assert_eq!(plan.code, 0, "{plan:?}");
    assert!(
        plan.stdout.contains("  will change copy-chroma  exec: run sh -c 'echo in >> held.log; while [ ! -e go ] && [ -e held.log ]; do sleep 0.02; done' (lock ingestion.lock is held now by another process; the step will wait up to 300ms)\n"),
        "{plan:?}"
    );
    let r = sb.run(&["run", "short"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout.contains(
            "  FAILED   copy-chroma: lock ingestion.lock is held by another process (waited 3"
        ),
        "{r:?}"
    );
    assert!(!sb.p("held.log").exists(), "the step ran without its lock");
    sb.write("release", "");
    assert!(holder.wait().unwrap().success());
    let r = sb.run(&["run", "short"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(sb.read("held.log"), "in\n");
}

#[test]
fn a_step_lock_held_by_another_run_is_named_and_released_after_the_step() {
    let sb = Sandbox::new();
    locked(&sb, "first", "10s");
    locked(&sb, "second", "200ms");
    let mut first = sb.spawn(&["run", "first"]);
    sb.wait_for("the first run's step", || sb.p("held.log").exists());
    let runs = sb.run(&["runs", "--format", "json"]);
    let first_id = serde_json::from_str::<serde_json::Value>(&runs.stdout).unwrap()[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = sb.run(&["run", "second"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout.contains(&format!("  FAILED   copy-chroma: lock ingestion.lock is held by run {first_id}, pid {} (waited 2", first.id())),
        "{r:?}"
    );
    // A waiting step gets the lock as soon as the holder's step ends.
    locked(&sb, "third", "20s");
    let mut third = sb.spawn(&["run", "third"]);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        sb.read("held.log"),
        "in\n",
        "the third run's step ran while the lock was held"
    );
    sb.write("go", "");
    assert!(first.wait().unwrap().success());
    assert!(third.wait().unwrap().success());
    assert_eq!(sb.read("held.log"), "in\nin\n");
}

const GATE: &str = r#"version: 1
steps:
  - id: ask
    action: confirm
    with: {message: "About to overwrite the live database. Continue?"}
  - id: act
    action: write-file
    with: {path: acted, content: "yes\n"}
"#;

#[test]
fn confirm_needs_yes_without_a_terminal() {
    let sb = Sandbox::new();
    sb.write("runbooks/gate.yaml", GATE);
    let plan = sb.run(&["plan", "gate"]);
    assert_eq!(plan.code, 3);
    assert!(plan.stdout.contains("  would fail  ask  confirm: asks `About to overwrite the live database. Continue?` and there is no terminal to answer on; pass --yes\n"), "{plan:?}");
    let run = sb.run(&["run", "gate"]);
    assert_eq!(run.code, 3);
    assert!(!sb.p("acted").exists());
    let plan = sb.run(&["plan", "gate", "--yes"]);
    assert_eq!(plan.code, 0);
    assert!(plan.stdout.contains("  no change   ask  confirm: asks `About to overwrite the live database. Continue?`: answered yes by --yes\n"), "{plan:?}");
    let run = sb.run(&["run", "gate", "--yes", "--format", "json"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains(r#""outputs":{"answer":"yes (--yes)"}"#),
        "{run:?}"
    );
    assert_eq!(sb.read("acted"), "yes\n");
}

/// On a terminal (a pty from util-linux `script`) the operator answers.
#[test]
fn confirm_asks_on_a_terminal() {
    let sb = Sandbox::new();
    sb.write("runbooks/gate.yaml", GATE);
    let bin = env!("CARGO_BIN_EXE_runbook");
    let answer = |reply: &str| {
        let mut child = Command::new("script")
            .args(["-qec", &format!("{bin} run gate"), "/dev/null"])
            .current_dir(sb.path())
            .env("RUNBOOK_STATE_DIR", sb.p("state"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .as_mut()
            .unwrap()
            .write_all(reply.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = answer("n\n");
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("About to overwrite the live database. Continue? [y/N]"),
        "{out}"
    );
    assert!(
        out.contains(
            "FAILED   ask: `About to overwrite the live database. Continue?`: the operator said no"
        ),
        "{out}"
    );
    assert!(!sb.p("acted").exists());
    let (code, out) = answer("y\n");
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(sb.read("acted"), "yes\n");
}
