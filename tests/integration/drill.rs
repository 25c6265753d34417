//! `runbook drill`: the whole cycle on its own sandbox, as the README's first command.

use crate::support::Sandbox;

#[test]
fn the_drill_passes_on_a_fresh_sandbox_and_reports_junit() {
    let sb = Sandbox::new();
    let runbooks = concat!(env!("CARGO_MANIFEST_DIR"), "/runbooks");
    let dir = sb.p("drill-sandbox");
    let r = sb.run(&[
        "--path",
        runbooks,
        "drill",
        "--format",
        "junit",
        "--dir",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites name=\"runbook drill\" tests=\"14\" failures=\"0\""), "{r:?}");
    for stage in [
        "sandbox",
        "backup",
        "list",
        "validate",
        "damage",
        "detect",
        "restore",
        "verify",
        "forced-rollback",
        "scratch-drill",
        "retention-plan",
        "stop",
    ] {
        assert!(
            r.stdout.contains(&format!(
                "<testcase classname=\"atocore-drill\" name=\"{stage}\""
            )),
            "no stage {stage}: {r:?}"
        );
    }
    assert!(
        r.stdout
            .contains("status rolled-back, live data byte-identical to before"),
        "{r:?}"
    );
    assert!(!dir.exists(), "the sandbox was left behind without --keep");
}

#[test]
fn the_drill_in_text_keeps_its_sandbox_when_asked() {
    let sb = Sandbox::new();
    let runbooks = concat!(env!("CARGO_MANIFEST_DIR"), "/runbooks");
    let dir = sb.p("kept");
    let r = sb.run(&[
        "--path",
        runbooks,
        "drill",
        "--keep",
        "--dir",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines[0], format!("drill: sandbox in {}", dir.display()));
    assert!(
        lines[1].starts_with("[ 1/14] sandbox                ok  "),
        "{r:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("drill passed: 14 stages, 0 failed, ")),
        "{r:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("time to restore (RTO): ")),
        "{r:?}"
    );
    assert!(dir.join("sandbox.yaml").exists());
    // The journal of every stage is there to read, and the service was stopped.
    let runs = std::process::Command::new(env!("CARGO_BIN_EXE_runbook"))
        .args(["runs", "--format", "json"])
        .env("RUNBOOK_STATE_DIR", dir.join("state"))
        .output()
        .unwrap();
    let runs: serde_json::Value = serde_json::from_slice(&runs.stdout).unwrap();
    let restores: Vec<&str> = runs
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["runbook"] == "atocore/restore")
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(restores, ["rolled-back", "succeeded"]);
    assert!(
        !dir.join("run/atocore.pid").exists(),
        "the service was not stopped"
    );
}
