//! The journal: run ids, SIGKILL + resume, locks, rollback, secrets, changed runbooks.

use std::io::{BufRead, BufReader};
use std::process::Child;

use crate::support::{Run, Sandbox};

/// Steps that append to `count.log`; `wait` blocks until the file `go` exists.
const COUNTED: &str = r#"version: 1
lock: counted
steps:
  - id: one
    action: exec
    with: {argv: [sh, -c, "echo one >> count.log"]}
  - id: two
    action: exec
    with: {argv: [sh, -c, "echo two >> count.log"]}
  - id: wait
    action: exec
    idempotent: WAIT_IDEMPOTENT
    with: {argv: [sh, -c, "echo wait >> count.log; while [ ! -e go ] && [ -e count.log ]; do sleep 0.02; done"]}
  - id: three
    action: exec
    with: {argv: [sh, -c, "echo three >> count.log"]}
"#;

fn counted(idempotent: bool) -> Sandbox {
    let sb = Sandbox::new();
    sb.write(
        "runbooks/counted.yaml",
        &COUNTED.replace("WAIT_IDEMPOTENT", &idempotent.to_string()),
    );
    sb
}

/// Starts `runbook run NAME`, returns the child and the run id from its first line.
fn start(sb: &Sandbox, name: &str) -> (Child, String) {
    let mut child = sb.spawn(&["run", name]);
    let mut first = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut first)
        .unwrap();
    let mut words = first.split_whitespace();
    assert_eq!(words.next(), Some("run"), "first line: {first}");
    let id = words.next().unwrap().to_string();
    assert_eq!(words.next(), Some(name));
    (child, id)
}

fn count_lines(sb: &Sandbox) -> Vec<String> {
    std::fs::read_to_string(sb.p("count.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn runs_json(sb: &Sandbox) -> Vec<serde_json::Value> {
    let r = sb.run(&["runs", "--format", "json"]);
    assert_eq!(r.code, 0, "{r:?}");
    serde_json::from_str::<serde_json::Value>(&r.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn kill_during_wait(sb: &Sandbox) -> String {
    let (mut child, id) = start(sb, "counted");
    sb.wait_for("the wait step", || {
        count_lines(sb).last().map(String::as_str) == Some("wait")
    });
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    id
}

#[test]
fn sigkill_mid_run_then_resume_finishes_without_rerunning_finished_steps() {
    let sb = counted(true);
    let id = kill_during_wait(&sb);
    let runs = runs_json(&sb);
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0]["id"], id.as_str());
    assert_eq!(runs[0]["runbook"], "counted");
    assert_eq!(runs[0]["status"], "interrupted");
    assert!(runs[0]["started_at"].as_str().unwrap().starts_with("20"));
    let show = sb.run(&["show", &id]);
    assert!(show.stdout.contains("  succeeded one (exec)"), "{show:?}");
    assert!(
        show.stdout.contains("  started   wait (exec)\n"),
        "{show:?}"
    );
    assert!(
        show.stdout.contains("  pending   three (exec)\n"),
        "{show:?}"
    );

    sb.write("go", ""); // lets the orphaned `sh` of the killed run finish too
    sb.wait_lock_free("counted"); // the killed step's leftovers hold the run lock
    let r = sb.run(&["resume", &id]);
    assert_eq!(r.code, 0, "{r:?}");
    let out: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(out[0], format!("resume {id} counted"));
    assert_eq!(out[1], "  done     one (finished in an earlier attempt)");
    assert_eq!(out[2], "  done     two (finished in an earlier attempt)");
    assert!(out[3].starts_with("  ok       wait ("), "{r:?}");
    assert!(out[4].starts_with("  ok       three ("), "{r:?}");
    assert!(
        out[5].starts_with(&format!("run {id} succeeded in ")),
        "{r:?}"
    );
    // one and two ran once; the idempotent wait step ran again; three ran once.
    assert_eq!(count_lines(&sb), ["one", "two", "wait", "wait", "three"]);
    assert_eq!(runs_json(&sb)[0]["status"], "succeeded");
    let again = sb.run(&["resume", &id]);
    assert_eq!(
        (again.code, again.stdout.as_str()),
        (
            0,
            format!("run {id} already succeeded; nothing to resume\n").as_str()
        )
    );
}

#[test]
fn an_interrupted_step_that_is_not_idempotent_waits_for_the_operator() {
    let sb = counted(false);
    let id = kill_during_wait(&sb);
    sb.write("go", "");
    sb.wait_lock_free("counted"); // the killed step's leftovers hold the run lock
    let r = sb.run(&["resume", &id]);
    assert_eq!(r.code, 3, "{r:?}");
    let last = r.stdout.lines().last().unwrap();
    assert!(
        last.starts_with(&format!("run {id} failed after ")),
        "{r:?}"
    );
    assert!(
        last.ends_with(&format!(
            ": step `wait` needs checking: it was interrupted and the step is declared `idempotent: false`, so running it again could repeat its effect. Check whether it took effect (arguments: {{\"argv\":[\"sh\",\"-c\",\"echo wait >> count.log; while [ ! -e go ] && [ -e count.log ]; do sleep 0.02; done\"]}}), then run `runbook resume {id} --retry-step wait`"
        )),
        "{r:?}"
    );
    assert_eq!(count_lines(&sb), ["one", "two", "wait"], "nothing ran");
    let r = sb.run(&["resume", &id, "--retry-step", "wait"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(count_lines(&sb), ["one", "two", "wait", "wait", "three"]);
}

#[test]
fn a_second_run_is_refused_while_the_lock_is_held_and_a_dead_holder_holds_nothing() {
    let sb = counted(true);
    let (mut child, id) = start(&sb, "counted");
    sb.wait_for("the wait step", || {
        count_lines(&sb).last().map(String::as_str) == Some("wait")
    });
    let second = sb.run(&["run", "counted"]);
    assert_eq!(second.code, 3, "{second:?}");
    assert_eq!(
        second.stderr,
        format!(
            "error: lock `counted` is held by run {id}, pid {}; wait for it to finish (`runbook runs` shows it)\n",
            child.id()
        )
    );
    assert_eq!(
        runs_json(&sb).len(),
        1,
        "the refused run left a journal entry"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    sb.write("go", "");
    sb.wait_lock_free("counted"); // the killed step's leftovers hold the run lock
    // The killed holder's lock is gone with it.
    let third = sb.run(&["run", "counted"]);
    assert_eq!(third.code, 0, "{third:?}");
}

const FAILING: &str = r#"version: 1
roots: ["{root}/scratch"]
steps:
  - id: make
    action: mkdir
    with: {path: "{root}/scratch/work"}
  - id: mark
    action: write-file
    with: {path: "{root}/scratch/work/mark", content: made}
  - id: break
    action: exec
    with: {argv: [sh, -c, "echo boom >&2; exit 7"]}
  - id: never
    action: exec
    with: {argv: [touch, "{root}/never"]}
rollback:
  - id: undo
    action: remove
    with: {path: "{{ steps.make.outputs.path }}"}
"#;

#[test]
fn rollback_runs_after_a_failure_and_later_on_request() {
    let sb = Sandbox::new();
    sb.write("scratch/.keep", "");
    sb.write("runbooks/failing.yaml", FAILING);
    let r = sb.run(&["run", "failing"]);
    assert_eq!(r.code, 1, "{r:?}");
    let lines: Vec<String> = sb.redact(&r.stdout).lines().map(str::to_string).collect();
    assert!(
        lines[3].starts_with(
            "  FAILED   break: sh -c 'echo boom >&2; exit 7' failed with exit code 7: boom"
        ),
        "{lines:#?}"
    );
    assert_eq!(lines[4], "rollback (step `break` failed)");
    assert!(lines[5].starts_with("  ok       undo ("), "{lines:#?}");
    assert!(lines[6].contains(" rolled-back after "), "{lines:#?}");
    assert!(
        !sb.p("scratch/work").exists(),
        "rollback did not remove the work dir"
    );
    assert!(!sb.p("never").exists(), "a step after the failure ran");
    assert_eq!(runs_json(&sb)[0]["status"], "rolled-back");

    // --no-rollback leaves things for inspection; `runbook rollback` undoes them later.
    let r = sb.run(&["run", "failing", "--no-rollback"]);
    assert_eq!(r.code, 1);
    assert_eq!(sb.read("scratch/work/mark"), "made");
    let id = runs_json(&sb)[0]["id"].as_str().unwrap().to_string();
    assert_eq!(runs_json(&sb)[0]["status"], "failed");
    let rb = sb.run(&["rollback", &id]);
    assert_eq!(rb.code, 0, "{rb:?}");
    assert!(!sb.p("scratch/work").exists());
    assert_eq!(runs_json(&sb)[0]["status"], "rolled-back");
    let show = sb.run(&["show", &id, "--format", "json"]);
    let record: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    let undo = record["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["key"] == "undo")
        .unwrap();
    assert_eq!(
        (undo["section"].as_str(), undo["status"].as_str()),
        (Some("rollback"), Some("succeeded"))
    );
    assert_eq!(undo["outputs"]["removed"], true);
}

#[test]
fn secret_params_appear_nowhere_in_the_journal_plan_or_logs() {
    const SECRET: &str = "s3cr3t-T0KEN-value";
    let sb = Sandbox::new();
    sb.write(
        "runbooks/secret.yaml",
        r#"version: 1
params:
  token: {type: string, secret: true, required: true}
vars:
  header: "Bearer {{ token }}"
steps:
  - id: out
    action: mkdir
    with: {path: out}
  - id: use
    action: exec
    with: {argv: [echo, "{{ header }}"], env: {TOKEN: "{{ token }}"}}
  - id: keep
    action: write-file
    with: {path: out/config, content: "token={{ token }}\n"}
  - id: fail
    action: exec
    with: {argv: [sh, -c, "echo \"rejected $0\" >&2; exit 1", "{{ token }}"]}
"#,
    );
    let set = format!("token={SECRET}");
    let plan = sb.run(&["plan", "secret", "--set", &set, "--format", "json", "-vv"]);
    let run = sb.run(&["run", "secret", "--set", &set, "-vv"]);
    let run_json = sb.run(&["run", "secret", "--set", &set, "--format", "json"]);
    assert_eq!(plan.code, 0, "{plan:?}");
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stdout.contains("rejected ********"), "{run:?}");
    // The real value reached the step that needed it.
    assert_eq!(sb.read("out/config"), format!("token={SECRET}\n"));
    let id = runs_json(&sb)[0]["id"].as_str().unwrap().to_string();
    let show = sb.run(&["show", &id, "--format", "json"]);
    let resume = sb.run(&["resume", &id, "--set", &set]);
    assert_eq!(resume.code, 1);
    let missing = sb.run(&["resume", &id]);
    assert_eq!(missing.code, 2);
    assert!(missing.stderr.contains("secret param `token` is not stored in the journal: give it again with --set token=... or --vars FILE"), "{missing:?}");
    let mut seen = String::new();
    for r in [&plan, &run, &run_json, &show, &resume] {
        seen.push_str(&r.stdout);
        seen.push_str(&r.stderr);
    }
    assert!(seen.contains("********"));
    assert!(!seen.contains(SECRET), "secret in output:\n{seen}");
    for entry in std::fs::read_dir(sb.p("state")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                !bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
                "secret in {}",
                path.display()
            );
        }
    }
}

#[test]
fn resume_refuses_a_changed_runbook_unless_told_to_accept_it() {
    let sb = counted(true);
    let id = kill_during_wait(&sb);
    sb.write("go", "");
    sb.wait_lock_free("counted"); // the killed step's leftovers hold the run lock
    let text = sb
        .read("runbooks/counted.yaml")
        .replace("echo three", "echo THREE");
    sb.write("runbooks/counted.yaml", &text);
    let r: Run = sb.run(&["resume", &id]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(r.stderr.starts_with(&format!("error: the runbook changed since run {id} started:\n--- runbooks/counted.yaml (at run start)\n+++ runbooks/counted.yaml (now)\n")), "{r:?}");
    assert!(r.stderr.contains("-    with: {argv: [sh, -c, \"echo three >> count.log\"]}\n+    with: {argv: [sh, -c, \"echo THREE >> count.log\"]}\n"), "{r:?}");
    assert_eq!(count_lines(&sb), ["one", "two", "wait"]);
    let r = sb.run(&["resume", &id, "--accept-changes"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(count_lines(&sb), ["one", "two", "wait", "wait", "THREE"]);
}

#[test]
fn a_runbook_calls_another_and_reads_its_outputs() {
    let sb = Sandbox::new();
    sb.write(
        "runbooks/ops/child.yaml",
        "version: 1\nparams:\n  name: {type: string, required: true}\n  dir: {type: path, required: true}\nsteps:\n  - id: write\n    action: write-file\n    with: {path: \"{{ dir }}/{{ name }}.txt\", content: \"hello {{ name }}\"}\noutputs:\n  file: \"{{ steps.write.outputs.path }}\"\n",
    );
    sb.write(
        "runbooks/ops/parent.yaml",
        "version: 1\nparams:\n  dir: {type: path, required: true}\nsteps:\n  - id: make\n    action: mkdir\n    with: {path: \"{{ dir }}\"}\n  - id: call\n    action: runbook\n    with: {name: ops/child, params: {name: world}}\n  - id: check\n    action: assert\n    with: {that: \"steps.call.outputs.file == dir ~ '/world.txt'\", message: \"child wrote {{ steps.call.outputs.file }}\"}\n",
    );
    sb.write("vars.yaml", "dir: out\nunrelated: ignored\n");
    let plan = sb.run(&["plan", "ops/parent", "--vars", "vars.yaml"]);
    assert_eq!(plan.code, 0, "{plan:?}");
    // A relative path param is frozen absolute (against the directory of the run).
    assert!(sb.redact(&plan.stdout).contains("  will change call   runbook: runs `ops/child`: 1 step(s) will change, 0 unknown\n    will change write  write-file: create `{root}/out/world.txt` (11 bytes)\n"), "{plan:?}");
    let r = sb.run(&["run", "ops/parent", "--vars", "vars.yaml"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(sb.read("out/world.txt"), "hello world");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert!(lines[2].starts_with("  ok       call/write ("), "{r:?}");
    let list = sb.run(&["list"]);
    assert_eq!(list.stdout, "ops/child   \nops/parent  \n");
}

/// SIGKILL at many points of a run: every resume ends the run, no step that the
/// journal had recorded as succeeded runs again, and every step ran at least once.
#[test]
fn sigkill_at_any_point_loses_nothing() {
    let sb = Sandbox::new();
    let mut text =
        String::from("version: 1\nparams:\n  tag: {type: string, required: true}\nsteps:\n");
    for i in 0..12 {
        text.push_str(&format!(
            "  - id: s{i}\n    action: exec\n    idempotent: true\n    with: {{argv: [sh, -c, \"echo s{i} >> log-$0; sleep 0.05\", \"{{{{ tag }}}}\"]}}\n"
        ));
    }
    sb.write("runbooks/many.yaml", &text);
    let mut seen = std::collections::HashSet::new();
    let mut interrupted_mid_run = 0;
    // Kill points: at once (before or while the run is recorded), then right after the
    // k-th step's side effect, which races with the journal recording its success.
    let points: Vec<Option<usize>> = std::iter::once(None).chain((1..12).map(Some)).collect();
    for (round, point) in points.into_iter().enumerate() {
        let tag = format!("r{round}");
        let log = sb.p(&format!("log-{tag}"));
        let mut child = sb.spawn(&["run", "many", "--set", &format!("tag={tag}")]);
        if let Some(k) = point {
            sb.wait_for("the k-th step", || {
                std::fs::read_to_string(&log).is_ok_and(|t| t.lines().count() >= k)
            });
        }
        child.kill().unwrap();
        child.wait().unwrap();
        // The step that was running still holds the run lock until it ends.
        sb.wait_lock_free("many");
        let new_run = runs_json(&sb)
            .into_iter()
            .find(|r| !seen.contains(r["id"].as_str().unwrap()));
        let Some(run) = new_run else {
            assert!(
                !sb.p(&format!("log-{tag}")).exists(),
                "round {round}: steps ran without a journal entry"
            );
            continue;
        };
        let id = run["id"].as_str().unwrap().to_string();
        seen.insert(id.clone());
        let show = sb.run(&["show", &id, "--format", "json"]);
        let record: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
        let done_before: Vec<String> = record["steps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["status"] == "succeeded")
            .map(|s| s["key"].as_str().unwrap().to_string())
            .collect();
        if !done_before.is_empty() && done_before.len() < 12 {
            interrupted_mid_run += 1;
        }
        let r = sb.run(&["resume", &id]);
        assert_eq!(r.code, 0, "round {round}: {r:?}");
        let log = std::fs::read_to_string(sb.p(&format!("log-{tag}"))).unwrap_or_default();
        for i in 0..12 {
            let step = format!("s{i}");
            let n = log.lines().filter(|l| *l == step).count();
            if done_before.contains(&step) {
                assert_eq!(n, 1, "round {round}: finished step {step} ran again");
            } else {
                assert!(
                    (1..=2).contains(&n),
                    "round {round}: step {step} ran {n} times"
                );
            }
        }
    }
    assert!(
        interrupted_mid_run >= 8,
        "only {interrupted_mid_run} rounds were killed between steps"
    );
}

#[test]
fn retry_and_timeout_are_honoured_and_journaled() {
    let sb = Sandbox::new();
    sb.write(
        "runbooks/flaky.yaml",
        r#"version: 1
steps:
  - id: flaky
    action: exec
    retry: {attempts: 3, delay: 10ms}
    with: {argv: [sh, -c, "echo x >> tries; [ $(wc -l < tries) -ge 3 ]"]}
  - id: slow
    action: exec
    with: {argv: [sleep, "5"], timeout: 200ms}
"#,
    );
    let started = std::time::Instant::now();
    let r = sb.run(&["run", "flaky"]);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(4),
        "the timeout did not stop sleep"
    );
    assert_eq!(r.code, 1, "{r:?}");
    assert_eq!(sb.read("tries").lines().count(), 3);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert!(
        lines[1].starts_with("  FAILED   flaky: sh -c ")
            && lines[1].ends_with(" failed with exit code 1 (retrying)"),
        "{r:?}"
    );
    assert!(lines[3].starts_with("  ok       flaky ("), "{r:?}");
    // The reported time is the real one: at least the timeout, plus what a loaded
    // machine adds (212 ms was seen), far below the 5 s sleep.
    let took = lines[4]
        .strip_prefix("  FAILED   slow: timed out after ")
        .map(|d| humantime::parse_duration(d).unwrap())
        .unwrap_or_else(|| panic!("{r:?}"));
    assert!((200..2000).contains(&took.as_millis()), "{took:?}: {r:?}");
    let id = runs_json(&sb)[0]["id"].as_str().unwrap().to_string();
    let show = sb.run(&["show", &id]);
    assert!(
        show.stdout.contains("  succeeded flaky (exec)") && show.stdout.contains(" (3 attempts)\n"),
        "{show:?}"
    );
}

#[test]
fn failures_that_may_continue_list_params_and_native_outputs() {
    let sb = Sandbox::new();
    sb.write(
        "runbooks/report.yaml",
        r#"version: 1
params:
  checks: {type: list, default: ["true", "false"]}
  tool_argv: {type: list, default: ["echo", "from", "a list"]}
steps:
  - id: first
    action: exec
    on_failure: continue
    with: {argv: ["{{ checks[0] }}"]}
  - id: second
    action: exec
    on_failure: continue
    with: {argv: ["{{ checks[1] }}"]}
  - id: tool
    action: exec
    with: {argv: "{{ tool_argv }}"}
outputs:
  failed: "{{ ['first', 'second'] | select('in', ['second'] if steps.second.status == 'failed' else []) | list }}"
  errors: "{{ [steps.first.error, steps.second.error] | select | list }}"
  said: "{{ steps.tool.outputs.stdout }}"
  joined: "{{ ['first'] + (['second'] if steps.second.status == 'failed' else []) }}"
"#,
    );
    let r = sb.run(&["run", "report", "--format", "json"]);
    assert_eq!(r.code, 0, "{r:?}");
    let last: serde_json::Value = serde_json::from_str(r.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last["status"], "succeeded");
    assert_eq!(last["outputs"]["failed"], serde_json::json!(["second"]));
    assert_eq!(
        last["outputs"]["errors"],
        serde_json::json!(["false failed with exit code 1"])
    );
    assert_eq!(last["outputs"]["said"], "from a list");
    assert_eq!(
        last["outputs"]["joined"],
        serde_json::json!(["first", "second"])
    );
    let text = sb.run(&["run", "report", "--set", r#"tool_argv=["echo", "x"]"#]);
    assert!(
        text.stdout
            .contains("  FAILED   second: false failed with exit code 1\n"),
        "{text:?}"
    );
    assert!(text.stdout.ends_with("\n  output failed = [\"second\"]\n  output errors = [\"false failed with exit code 1\"]\n  output said = x\n  output joined = [\"first\",\"second\"]\n"), "{text:?}");
}

#[test]
fn resume_gives_called_runbooks_the_runs_vars_file_values_but_stores_no_secret() {
    let sb = Sandbox::new();
    sb.write(
        "runbooks/parent.yaml",
        r#"version: 1
steps:
  - id: wait
    action: exec
    idempotent: true
    with: {argv: [sh, -c, "echo wait >> count.log; while [ ! -e go ] && [ -e count.log ]; do sleep 0.02; done"]}
  - id: child
    action: runbook
    with: {name: child}
"#,
    );
    sb.write(
        "runbooks/child.yaml",
        r#"version: 1
params:
  greeting: {type: string, default: from the default}
  token: {type: string, secret: true, default: none}
steps:
  - id: say
    action: exec
    with: {argv: [sh, -c, "echo \"$0\" >> said.log", "{{ greeting }}"]}
"#,
    );
    sb.write(
        "deploy.yaml",
        "greeting: from the vars file\ntoken: s3cret-token\nunrelated: not-a-param\n",
    );
    let mut child = sb.spawn(&["run", "parent", "--vars", "deploy.yaml"]);
    let mut first = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut first)
        .unwrap();
    let id = first.split_whitespace().nth(1).unwrap().to_string();
    sb.wait_for("the wait step", || count_lines(&sb) == ["wait"]);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    sb.write("go", "");
    sb.wait_lock_free("parent"); // the killed step's leftovers hold the run lock

    // The child's secret came from the vars file: resume asks for it again (its
    // default is not what the run used).
    let r = sb.run(&["resume", &id]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("secret param `token` is not stored in the journal: give it again with --set token=... or --vars FILE"), "{r:?}");
    // No --vars this time: the child still gets the run's greeting.
    let r = sb.run(&["resume", &id, "--set", "token=s3cret-token"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(sb.read("said.log"), "from the vars file\n");
    let mut journal = std::fs::read(sb.p("state/journal.db")).unwrap();
    journal.extend(std::fs::read(sb.p("state/journal.db-wal")).unwrap_or_default());
    let text = String::from_utf8_lossy(&journal);
    assert!(
        text.contains("from the vars file"),
        "the inputs are journaled"
    );
    assert!(
        !text.contains("s3cret-token"),
        "a secret reached the journal"
    );
    assert!(
        !text.contains("not-a-param"),
        "an undeclared key reached the journal"
    );
}

/// `runs --status/--since/--runbook`: "did last night's backup work?" in one command.
#[test]
fn runs_filters_by_status_age_and_runbook() {
    let sb = Sandbox::new();
    sb.write(
        "runbooks/ok.yaml",
        "version: 1\nsteps:\n  - id: a\n    action: assert\n    with: {that: 'true'}\n",
    );
    sb.write(
        "runbooks/bad.yaml",
        "version: 1\nsteps:\n  - id: a\n    action: exec\n    with: {argv: [sh, -c, 'exit 7']}\n",
    );
    assert_eq!(sb.run(&["run", "ok"]).code, 0);
    assert_eq!(sb.run(&["run", "bad"]).code, 1);
    assert_eq!(sb.run(&["run", "ok"]).code, 0);
    let ids = |args: &[&str]| -> Vec<(String, String)> {
        let mut all = vec!["runs", "--format", "json"];
        all.extend_from_slice(args);
        let r = sb.run(&all);
        assert_eq!(r.code, 0, "{r:?}");
        serde_json::from_str::<Vec<serde_json::Value>>(&r.stdout)
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v["runbook"].as_str().unwrap().to_string(),
                    v["status"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let pair = |a: &str, b: &str| (a.to_string(), b.to_string());
    assert_eq!(ids(&[]).len(), 3);
    assert_eq!(ids(&["--status", "failed"]), [pair("bad", "failed")]);
    assert_eq!(
        ids(&["--runbook", "ok", "--since", "24h"]),
        [pair("ok", "succeeded"), pair("ok", "succeeded")]
    );
    assert_eq!(ids(&["--status", "failed", "--since", "1h"]).len(), 1);
    // A window that ends before these runs started holds none of them.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert!(ids(&["--since", "0s"]).is_empty());
    let r = sb.run(&["runs", "--since", "yesterday"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr
            .contains("`yesterday` is not a duration: give a number and s, m, h or d (24h, 7d)"),
        "{r:?}"
    );
    let r = sb.run(&["runs", "--status", "broken"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr
            .contains("possible values: running, succeeded, failed, interrupted, rolled-back"),
        "{r:?}"
    );
}
