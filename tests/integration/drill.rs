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
    assert!(r.stdout.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites name=\"runbook drill\" tests=\"30\" failures=\"0\""), "{r:?}");
    for stage in [
        "sandbox",
        "backup",
        "list",
        "validate",
        "listed",
        "damage",
        "detect",
        "restore",
        "verify",
        "forced-rollback",
        "scratch-drill",
        "retention-plan",
        "stop",
        "offsite-host",
        "ship",
        "ship-again",
        "new-host",
        "disaster-recovery",
        "recovered-data",
        "recovered-chroma",
        "offsite-host-stop",
    ] {
        assert!(
            r.stdout.contains(&format!(
                "<testcase classname=\"atocore-drill\" name=\"{stage}\""
            )),
            "no stage {stage}: {r:?}"
        );
    }
    assert!(
        r.stdout.contains("a restore whose verify fails rolls back byte for byte: live_data byte-identical to before, live_sha256 "),
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
        lines[1].starts_with("[ 1/30] sandbox                ok  "),
        "{r:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("drill passed: 30 stages, 0 failed, ")),
        "{r:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("time to restore (RTO): ")),
        "{r:?}"
    );
    // The disaster stages ran (this machine can start an off-site host: the tests run
    // as root with sshd, as .ci/run makes sure), and the summary has their figures.
    assert!(
        lines.iter().any(|l| l.starts_with("disaster recovery RTO: ")
            && l.ends_with("s (new host from the off-site copy: fetch, decrypt, validate, restore, start, verify)")),
        "{r:?}"
    );
    let second_push = lines
        .iter()
        .find(|l| l.starts_with("off-site second push: "))
        .unwrap_or_else(|| panic!("no second push line: {r:?}"));
    let words: Vec<&str> = second_push.split_whitespace().collect();
    let (sent, total): (u64, u64) = (words[3].parse().unwrap(), words[5].parse().unwrap());
    assert!(
        total > 4_000_000 && sent * 100 <= total,
        "the unchanged vector store's second push sent more than 1%: {second_push}"
    );
    for stage in ["recovered-data", "recovered-chroma", "disaster-recovery"] {
        assert!(
            lines
                .iter()
                .any(|l| l.contains(&format!("] {stage} ")) && l.contains(" ok ")),
            "stage {stage} did not pass: {r:?}"
        );
    }
    assert!(
        !lines.iter().any(|l| l.contains("off-site stages need")),
        "{r:?}"
    );
    // Both hosts' services and the off-site host were stopped.
    assert!(!dir.join("new-host/run/atocore.pid").exists());
    assert!(!dir.join("offsite/offsite-host.pid").exists());
    assert!(
        !dir.join("offsite/host/host.json").exists(),
        "the off-site host is still up"
    );
    assert!(dir.join("sandbox.yaml").exists());
    // The journal of every stage is there to read, and the service was stopped.
    let runs = std::process::Command::new(env!("CARGO_BIN_EXE_runbook"))
        .args(["runs", "--format", "json"])
        .env("RUNBOOK_STATE_DIR", dir.join("state"))
        .output()
        .unwrap();
    let runs: serde_json::Value = serde_json::from_slice(&runs.stdout).unwrap();
    // One run of the cycle: every stage a step of it, the forced restore rolled back.
    let runs = runs.as_array().unwrap();
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0]["runbook"], "atocore/drill-cycle");
    assert_eq!(runs[0]["status"], "succeeded");
    let id = runs[0]["id"].as_str().unwrap();
    assert!(
        lines.contains(
            &format!(
                "drill: run {id} of atocore/drill-cycle (journal: RUNBOOK_STATE_DIR={}/state)",
                dir.display()
            )
            .as_str()
        ),
        "{r:?}"
    );
    let show = std::process::Command::new(env!("CARGO_BIN_EXE_runbook"))
        .args(["show", id, "--format", "json"])
        .env("RUNBOOK_STATE_DIR", dir.join("state"))
        .output()
        .unwrap();
    let show: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    let step = |key: &str| {
        show["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["key"] == key)
            .unwrap_or_else(|| panic!("no step {key}"))
            .clone()
    };
    assert_eq!(step("forced-rollback/restore")["status"], "succeeded");
    assert!(
        step("forced-rollback/restore")["error"]
            .as_str()
            .unwrap()
            .contains("`.documents >= 1000000000` does not hold"),
        "{show}"
    );
    assert_eq!(step("forced-rollback/restore/undo")["status"], "succeeded");
    assert_eq!(step("detect")["status"], "succeeded");
    assert!(
        !dir.join("run/atocore.pid").exists(),
        "the service was not stopped"
    );

    // The disaster stages on the repository format v2: the first push made the
    // repository and its key, the second was pinned to that key, and the new host
    // (no key of its own) recovered trusting the repository only through it.
    let key = step("ship")["outputs"]["key"].as_str().unwrap().to_string();
    assert!(
        key.len() == 32 && key.bytes().all(|b| b.is_ascii_hexdigit()),
        "{key}"
    );
    assert_eq!(
        step("ship-again")["args"]["params"]["offsite_key"],
        key.as_str()
    );
    assert_eq!(step("ship-again")["outputs"]["key"], key.as_str());
    let recovery = step("disaster-recovery");
    let argv: Vec<&str> = recovery["args"]["argv"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        argv.windows(2)
            .any(|w| w == ["--set", format!("offsite_key={key}").as_str()]),
        "{argv:?}"
    );
    let repo = dir.join("offsite/host/repo");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo.join("config")).unwrap()).unwrap();
    assert_eq!(
        config,
        serde_json::json!({"format": "runbook-offsite", "version": 2, "key": key})
    );
    assert!(repo.join(format!("keys/{key}.age")).is_file());
    // Each shipped snapshot is one file (linked last), bound to its stamp.
    let mut shipped: Vec<String> = ["ship", "ship-again"]
        .iter()
        .map(|s| step(s)["outputs"]["stamp"].as_str().unwrap().to_string())
        .collect();
    shipped.sort();
    let mut files: Vec<String> = std::fs::read_dir(repo.join("snapshots"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            assert!(e.file_type().unwrap().is_file(), "{:?}", e.path());
            let name = e.file_name().into_string().unwrap();
            let snapshot: serde_json::Value =
                serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap();
            assert_eq!(snapshot["stamp"], name.as_str(), "{snapshot}");
            name
        })
        .collect();
    files.sort();
    assert_eq!(files, shipped);
}

/// Kills the stand-in a failed test may leave running (read from its pidfile).
struct StopService(std::path::PathBuf);

impl Drop for StopService {
    fn drop(&mut self) {
        // The off-site host tears its namespace down on SIGTERM (SIGKILL would leave it).
        let text =
            std::fs::read_to_string(self.0.join("offsite/offsite-host.pid")).unwrap_or_default();
        if let Some(pid) = text.split_whitespace().next().and_then(|p| p.parse().ok()) {
            // SAFETY: a signal to the test's own off-site host.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        for pidfile in [
            "run/atocore.pid",
            "drill/service.pid",
            "new-host/run/atocore.pid",
        ] {
            let text = std::fs::read_to_string(self.0.join(pidfile)).unwrap_or_default();
            if let Some(pid) = text.split_whitespace().next().and_then(|p| p.parse().ok()) {
                // SAFETY: a signal to the test's own service.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

fn drill(sb: &Sandbox, dir: &std::path::Path, extra: &[&str]) -> crate::support::Run {
    drill_cmd(sb, dir).args(extra).output().unwrap().into()
}

/// `runbook --path <repo>/runbooks drill --keep --dir DIR`, for more args or env.
fn drill_cmd(sb: &Sandbox, dir: &std::path::Path) -> std::process::Command {
    let runbooks = concat!(env!("CARGO_MANIFEST_DIR"), "/runbooks");
    sb.cmd(&[
        "--path",
        runbooks,
        "drill",
        "--keep",
        "--dir",
        dir.to_str().unwrap(),
    ])
}

/// Damage that verify does not notice (a WAL with one more document) fails the
/// `detect` stage: exit 1, the stage named, the stages after it not run, the service
/// stopped by the cycle's rollback.
#[test]
fn a_drill_whose_damage_goes_unnoticed_fails_at_detect() {
    let sb = Sandbox::new();
    let dir = sb.p("d");
    let _guard = StopService(dir.clone());
    let r = drill(&sb, &dir, &["--set", "damage_kind=stale-wal"]);
    assert_eq!(r.code, 1, "{r:?}");
    let detect = r
        .stdout
        .lines()
        .find(|l| l.starts_with("[ 8/30] detect "))
        .unwrap();
    assert!(
        detect.starts_with("[ 8/30] detect                 FAIL ")
            && detect.ends_with("verify notices the damage — expected to fail with `of `atocore/verify` failed`, but it succeeded"),
        "{r:?}"
    );
    assert!(
        r.stdout.contains("[ 9/30] restore                -       0.00s  stop, safety copy, restore DB/registry/vector store, start, verify — not run: the cycle stopped before it\n"),
        "{r:?}"
    );
    assert!(
        r.stdout
            .contains("drill FAILED: 30 stages, 1 failed, 22 not run, ")
            && r.stdout
                .contains("first failed stage: detect (expected to fail with"),
        "{r:?}"
    );
    assert!(
        !dir.join("run/atocore.pid").exists(),
        "the service was left running"
    );
}

/// A forced restore that does not fail (its verification is satisfiable) fails the
/// `forced-rollback` stage, in the JSON and JUnit reports alike.
#[test]
fn a_drill_whose_forced_restore_does_not_roll_back_fails_naming_the_stage() {
    let sb = Sandbox::new();
    let dir = sb.p("d");
    let _guard = StopService(dir.clone());
    let r = drill(
        &sb,
        &dir,
        &["--set", "impossible_min_documents=1", "--format", "json"],
    );
    assert_eq!(r.code, 1, "{r:?}");
    let report: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(report["ok"], false);
    let stages = report["stages"].as_array().unwrap();
    let failed: Vec<(&str, &str)> = stages
        .iter()
        .filter(|s| s["status"] == "failed")
        .map(|s| (s["name"].as_str().unwrap(), s["detail"].as_str().unwrap()))
        .collect();
    assert_eq!(
        failed,
        [(
            "forced-rollback",
            "step `forced-rollback/restore` of `atocore/restore-must-roll-back` failed: expected to fail with ``.documents >= 1` does not hold`, but it succeeded"
        )]
    );
    assert_eq!(stages[8]["name"], "restore");
    assert_eq!(stages[8]["status"], "ok");
    assert!(report["rto_seconds"].is_null(), "a failed cycle has no RTO");
    assert!(
        !dir.join("run/atocore.pid").exists(),
        "the service was left running"
    );
}

/// A drill killed in the middle of its forced restore (right before the database is
/// copied back) is finished by `runbook resume`: the restore fails as expected, rolls
/// back, the live data is byte-identical, and every later stage runs.
#[test]
fn a_drill_killed_mid_cycle_is_finished_by_resume() {
    let sb = Sandbox::new();
    let dir = sb.p("d");
    let _guard = StopService(dir.clone());
    let runbooks = concat!(env!("CARGO_MANIFEST_DIR"), "/runbooks");
    let out = drill_cmd(&sb, &dir)
        .env("RUNBOOK_FAILPOINT", "before:forced-rollback/restore/db")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), None, "not killed: {out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("[10/30] verify "), "{stdout}");
    assert!(!stdout.contains("forced-rollback "), "{stdout}");
    let state = dir.join("state");
    let runbook = |args: &[&str]| -> crate::support::Run {
        std::process::Command::new(env!("CARGO_BIN_EXE_runbook"))
            .args(args)
            .env("RUNBOOK_STATE_DIR", &state)
            .current_dir("/")
            .output()
            .unwrap()
            .into()
    };
    let runs: serde_json::Value =
        serde_json::from_str(&runbook(&["runs", "--format", "json"]).stdout).unwrap();
    assert_eq!(runs[0]["status"], "interrupted", "{runs}");
    let id = runs[0]["id"].as_str().unwrap().to_string();
    // Called runbooks are found on the search path of the resuming command.
    let r = runbook(&["--path", runbooks, "resume", &id, "--yes"]);
    assert_eq!(r.code, 0, "{r:?}");
    for line in [
        "  done     detect (finished in an earlier attempt)\n",
        "  ok       forced-rollback/restore/db ",
        "  ok       forced-rollback/after ",
        "  ok       retention-plan ",
        "  ok       stop ",
    ] {
        assert!(r.stdout.contains(line), "no `{line}`: {r:?}");
    }
    assert!(
        r.stdout.contains("  ok       forced-rollback/restore (")
            && r.stdout.contains("failed as expected: "),
        "{r:?}"
    );
    let runs: serde_json::Value =
        serde_json::from_str(&runbook(&["runs", "--format", "json"]).stdout).unwrap();
    assert_eq!(runs[0]["status"], "succeeded", "{runs}");
    assert!(
        !dir.join("run/atocore.pid").exists(),
        "the service was left running"
    );
}

/// On a machine that cannot start an off-site host (here: no `ip` or `ssh` on PATH), the disaster stages are skipped with a line that says what they need, and the
/// rest of the drill still passes.
#[test]
fn a_drill_without_the_offsite_tools_says_what_they_need_and_skips_them() {
    let sb = Sandbox::new();
    let dir = sb.p("d");
    let _guard = StopService(dir.clone());
    // Every program of the usual PATH but the two.
    let bin = sb.p("bin");
    std::fs::create_dir(&bin).unwrap();
    for from in ["/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"] {
        let Ok(entries) = std::fs::read_dir(from) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            if ["ip", "ssh"].contains(&name.to_str().unwrap_or_default()) {
                continue;
            }
            let _ = std::os::unix::fs::symlink(e.path(), bin.join(&name));
        }
    }
    let out = drill_cmd(&sb, &dir).env("PATH", &bin).output().unwrap();
    let r: crate::support::Run = out.into();
    assert_eq!(r.code, 0, "{r:?}");
    let need =
        "off-site stages need ip (apt-get install iproute2), ssh (apt-get install openssh-client)";
    assert!(
        r.stdout
            .contains(&format!("drill: {need}; they are skipped\n"))
            && r.stdout
                .contains(&format!("{need}: the disaster stages were skipped\n")),
        "{r:?}"
    );
    assert!(
        r.stdout
            .contains("[17/30] offsite-host           skip    0.00s  ")
            && r.stdout
                .contains("[24/30] disaster-recovery      skip    0.00s  "),
        "{r:?}"
    );
    assert!(
        r.stdout.contains("drill passed: 30 stages, 0 failed, "),
        "{r:?}"
    );
    assert!(!r.stdout.contains("disaster recovery RTO"), "{r:?}");
    assert!(!dir.join("offsite").exists() && !dir.join("new-host").exists());
}
