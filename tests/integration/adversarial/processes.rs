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
