//! `daemon-start` / `daemon-stop` with real processes.

use crate::support::{Sandbox, tree_digest};

fn alive(pid: i64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s[s.rfind(')').unwrap() + 2..].starts_with('Z'))
}

#[test]
fn a_daemon_starts_once_survives_the_run_and_stops() {
    let sb = Sandbox::new();
    sb.write(
        "runbooks/svc.yaml",
        "version: 1\nparams:\n  action: {type: string, default: start}\nsteps:\n  - id: start\n    action: daemon-start\n    when: action == 'start'\n    with: {argv: [sleep, \"60\"], pidfile: svc.pid, log: svc.log}\n  - id: stop\n    action: daemon-stop\n    when: action == 'stop'\n    with: {pidfile: svc.pid, timeout: 2s}\n",
    );
    let before = tree_digest(sb.path());
    let plan = sb.run(&["plan", "svc"]);
    assert!(
        plan.stdout
            .contains("  will change start  daemon-start: start sleep 60 (pidfile svc.pid)\n"),
        "{plan:?}"
    );
    assert_eq!(tree_digest(sb.path()), before);
    let r = sb.run(&["run", "svc", "--format", "json"]);
    assert_eq!(r.code, 0, "{r:?}");
    let pid = std::fs::read_to_string(sb.p("svc.pid"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse::<i64>()
        .unwrap();
    assert!(alive(pid), "the daemon did not outlive the run");
    let again = sb.run(&["plan", "svc"]);
    assert!(
        again.stdout.contains(&format!(
            "  no change   start  daemon-start: running as pid {pid} (svc.pid)\n"
        )),
        "{again:?}"
    );
    let second = sb.run(&["run", "svc"]);
    assert_eq!(second.code, 0);
    assert_eq!(
        std::fs::read_to_string(sb.p("svc.pid"))
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap(),
        pid.to_string(),
        "started twice"
    );
    let stop = sb.run(&["run", "svc", "--set", "action=stop"]);
    assert_eq!(stop.code, 0, "{stop:?}");
    assert!(!alive(pid), "still running after daemon-stop");
    assert!(!sb.p("svc.pid").exists());
    let plan = sb.run(&["plan", "svc", "--set", "action=stop"]);
    assert!(
        plan.stdout
            .contains("  no change   stop   daemon-stop: not running (svc.pid)\n"),
        "{plan:?}"
    );
}

#[test]
fn a_stale_pidfile_of_a_reused_pid_is_not_the_daemon() {
    let sb = Sandbox::new();
    // pid 1 exists, but its start time is not the one recorded.
    sb.write("svc.pid", "1 999999999\n");
    sb.write(
        "runbooks/stop.yaml",
        "version: 1\nsteps:\n  - id: stop\n    action: daemon-stop\n    with: {pidfile: svc.pid}\n",
    );
    let r = sb.run(&["run", "stop", "--format", "json"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout
            .contains(r#""outputs":{"pid":null,"stopped":false}"#),
        "{r:?}"
    );
    assert!(alive(1));
}

/// Killed right before or right after starting (or stopping) the daemon, the resumed
/// run ends with exactly one daemon running (or none).
#[test]
fn an_interrupted_daemon_start_or_stop_resumes_to_one_daemon_or_none() {
    for point in ["before", "after"] {
        let sb = Sandbox::new();
        sb.write(
            "runbooks/svc.yaml",
            "version: 1\nparams:\n  action: {type: string, default: start}\nsteps:\n  - id: start\n    action: daemon-start\n    when: action == 'start'\n    with: {argv: [sleep, \"60\"], pidfile: svc.pid, log: svc.log}\n  - id: stop\n    action: daemon-stop\n    when: action == 'stop'\n    with: {pidfile: svc.pid, timeout: 2s}\n",
        );
        let killed = sb
            .cmd(&["run", "svc"])
            .env("RUNBOOK_FAILPOINT", format!("{point}:start"))
            .output()
            .unwrap();
        assert_eq!(killed.status.code(), None, "{point}: not killed");
        let id = String::from_utf8_lossy(&killed.stdout)
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_string();
        let r = sb.run(&["resume", &id]);
        assert_eq!(r.code, 0, "{point}: {r:?}");
        let pid: i64 = std::fs::read_to_string(sb.p("svc.pid"))
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(alive(pid), "{point}: no daemon after resume");
        let killed = sb
            .cmd(&["run", "svc", "--set", "action=stop"])
            .env("RUNBOOK_FAILPOINT", format!("{point}:stop"))
            .output()
            .unwrap();
        assert_eq!(killed.status.code(), None, "{point}: stop not killed");
        let id = String::from_utf8_lossy(&killed.stdout)
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_string();
        let r = sb.run(&["resume", &id]);
        assert_eq!(r.code, 0, "{point}: {r:?}");
        assert!(
            !alive(pid),
            "{point}: the daemon survived an interrupted stop and its resume"
        );
        assert!(!sb.p("svc.pid").exists());
    }
}
