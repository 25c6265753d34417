//! Adversarial cases: a step's processes. Each `exec` runs in a process group of its
//! own, ended when the program exits or times out, so nothing it started in the
//! background outlives the step or overlaps a retry.

use std::time::Duration;

use crate::support::Sandbox;

/// The live (not zombie) processes of group `pgid`, from /proc.
fn members(pgid: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            f[0] != "Z" && f[2].parse::<i32>().ok() == Some(pgid)
        })
        .collect()
}

/// Kills the groups whose ids the test's shells wrote, whatever the test's outcome.
struct Groups(Vec<std::path::PathBuf>);

impl Groups {
    fn ids(&self) -> Vec<i32> {
        self.0
            .iter()
            .flat_map(|p| {
                std::fs::read_to_string(p)
                    .unwrap_or_default()
                    .lines()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Drop for Groups {
    fn drop(&mut self) {
        for g in self.ids() {
            // SAFETY: signals a group this test's runbook made.
            unsafe { libc::kill(-g, libc::SIGKILL) };
        }
    }
}

#[test]
fn a_timed_out_exec_leaves_no_process_of_its_group_and_retries_never_overlap() {
    let sb = Sandbox::new();
    sb.write(
        "runbooks/slow.yaml",
        r#"version: 1
steps:
  - id: slow
    action: exec
    retry: {attempts: 2, delay: 0s}
    with:
      argv: [sh, -c, 'echo $$ >> "$0/pgids"; echo start >> "$0/log"; (sleep 1.5; echo late >> "$0/log") & sleep 300 & wait', "{root}"]
      timeout: 500ms
"#,
    );
    let groups = Groups(vec![sb.p("pgids")]);
    let r = sb.run(&["run", "slow"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.contains("slow: timed out after 50"), "{r:?}");
    let ids = groups.ids();
    assert_eq!(ids.len(), 2, "two attempts: {ids:?}");
    for g in &ids {
        assert_eq!(
            members(*g),
            Vec::<i32>::new(),
            "group {g} still has processes"
        );
    }
    // Had the first attempt's background job survived, `late` would follow the
    // second `start`.
    std::thread::sleep(Duration::from_millis(2000));
    assert_eq!(sb.read("log"), "start\nstart\n");
}

#[test]
fn a_successful_run_leaves_no_leftover_of_its_exec_steps() {
    let sb = Sandbox::new();
    sb.write(
        "runbooks/bg.yaml",
        r#"version: 1
steps:
  - id: background
    action: exec
    with:
      argv: [sh, -c, 'echo $$ > "$0/pgid"; sleep 300 & sleep 300 & echo started', "{root}"]
"#,
    );
    let groups = Groups(vec![sb.p("pgid")]);
    let r = sb.run(&["run", "bg", "--format", "json"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains(r#""stdout":"started""#), "{r:?}");
    let ids = groups.ids();
    assert_eq!(ids.len(), 1);
    assert_eq!(members(ids[0]), Vec::<i32>::new());
}

#[test]
fn a_step_left_running_by_a_killed_engine_keeps_the_run_lock_until_it_ends() {
    let sb = Sandbox::new();
    sb.write(
        "runbooks/long.yaml",
        r#"version: 1
lock: drill-lock
steps:
  - id: long-step
    action: exec
    with:
      argv: [sh, -c, '[ -e "$0/release" ] || { echo $$ > "$0/pgid"; sleep 300 & wait; }', "{root}"]
  - id: after
    action: write-file
    with: {path: "{root}/after", content: done}
roots: ["{root}"]
"#,
    );
    let groups = Groups(vec![sb.p("pgid")]);
    let mut engine = sb.spawn(&["run", "long"]);
    sb.wait_for("the step's group id", || {
        sb.p("pgid").exists() && !groups.ids().is_empty()
    });
    engine.kill().unwrap();
    engine.wait().unwrap();
    let pgid = groups.ids()[0];
    assert!(
        !members(pgid).is_empty(),
        "the step's processes outlive the engine"
    );

    // The run lock is still held, by the step's processes: resume is refused, and the
    // refusal names the step, its group and what to do.
    let id = sb.last_run_id();
    let refused = sb.run(&["resume", &id]);
    assert_eq!(refused.code, 3, "{refused:?}");
    let line = refused
        .stderr
        .lines()
        .find(|l| l.contains("drill-lock"))
        .unwrap_or("");
    assert!(
        line.contains(&format!("lock `drill-lock` is held by process group {pgid}, started by step `long-step` of run "))
            && line.contains(&format!(", whose engine (pid {}) is gone; the step's processes still run; wait for them to end, or end them with `kill -TERM -- -{pgid}`, then try again", engine.id())),
        "{refused:?}"
    );
    // So is a new run of the same runbook.
    let second = sb.run(&["run", "long"]);
    assert_eq!(second.code, 3, "{second:?}");
    assert!(
        second.stderr.contains(&format!("process group {pgid}")),
        "{second:?}"
    );
    assert!(!sb.p("after").exists());

    // Once the leftovers end, the lock is free; the interrupted `exec` needs checking
    // (it is not idempotent), and the operator's retry finishes the run.
    // SAFETY: signals the group this test's runbook made.
    unsafe { libc::kill(-pgid, libc::SIGTERM) };
    sb.wait_for("the group to end", || members(pgid).is_empty());
    let checking = sb.run(&["resume", &id]);
    assert_eq!(checking.code, 3, "{checking:?}");
    assert!(
        checking.stdout.contains("step `long-step` needs checking"),
        "{checking:?}"
    );
    sb.write("release", "");
    let resumed = sb.run(&["resume", &id, "--retry-step", "long-step"]);
    assert_eq!(resumed.code, 0, "{resumed:?}");
    assert_eq!(sb.read("after"), "done");
}
