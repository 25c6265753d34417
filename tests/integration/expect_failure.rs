//! `expect_failure`: a step that succeeds by failing with the expected error (what a
//! drill needs to show that a check notices damage, or that a restore rolls back).

use serde_json::Value as Json;

use crate::support::{Sandbox, tree_digest};

fn runs(sb: &Sandbox) -> Json {
    serde_json::from_str(&sb.run(&["runs", "--format", "json"]).stdout).unwrap()
}

fn plan_steps(sb: &Sandbox, args: &[&str]) -> (i32, Vec<(String, String, String)>) {
    let mut all = vec!["plan"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--format", "json"]);
    let r = sb.run(&all);
    let plan: Json = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {r:?}"));
    let steps = plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_string(),
                s["verdict"].as_str().unwrap().to_string(),
                match &s["detail"] {
                    Json::Array(until) => format!("unknown until {until:?}"),
                    other => other.as_str().unwrap_or_default().to_string(),
                },
            )
        })
        .collect();
    (r.code, steps)
}

#[test]
fn an_expected_failure_passes_and_later_steps_read_its_error_and_status() {
    let sb = Sandbox::new();
    sb.write(
        "runbooks/t.yaml",
        r#"version: 1
roots: ["{root}/out"]
steps:
  - id: gone
    action: path-check
    expect_failure: {contains: "does not exist"}
    with: {path: "{root}/missing"}
  - id: boom
    action: exec
    expect_failure: {contains: "exit code 3: boom"}
    with: {argv: ["sh", "-c", "echo boom >&2; exit 3"]}
  - id: note
    action: write-file
    with:
      path: "{root}/out/note.txt"
      content: "{{ steps.gone.status }}|{{ steps.gone.error }}|{{ steps.boom.status }}|{{ steps.boom.error }}"
"#,
    );
    std::fs::create_dir(sb.p("out")).unwrap();
    let before = tree_digest(sb.path());
    let (code, steps) = plan_steps(&sb, &["t"]);
    assert_eq!(code, 0);
    let root = sb.path().display().to_string();
    assert_eq!(
        steps,
        [
            (
                "gone".into(),
                "no-change".into(),
                format!("fails as expected: `{root}/missing`: does not exist")
            ),
            (
                "boom".into(),
                "will-change".into(),
                "run sh -c 'echo boom >&2; exit 3'".into()
            ),
            (
                "note".into(),
                "unknown".into(),
                "unknown until [String(\"boom\")]".into()
            ),
        ]
    );
    assert_eq!(tree_digest(sb.path()), before, "the plan wrote something");

    let r = sb.run(&["run", "t"]);
    assert_eq!(r.code, 0, "{r:?}");
    let gone = r
        .stdout
        .lines()
        .find(|l| l.starts_with("  ok       gone ("))
        .unwrap();
    assert!(
        gone.ends_with(&format!(
            "s, failed as expected: precondition failed: `{root}/missing`: does not exist)"
        )),
        "{r:?}"
    );
    assert_eq!(
        sb.read("out/note.txt"),
        format!(
            "succeeded|precondition failed: `{root}/missing`: does not exist|succeeded|sh -c 'echo boom >&2; exit 3' failed with exit code 3: boom"
        )
    );
    // The journal has it done, with the error it failed with.
    let id = runs(&sb)[0]["id"].as_str().unwrap().to_string();
    let show = sb.run(&["show", &id]);
    assert!(
        show.stdout.contains(
            "  succeeded boom (exec)",
        ) && show.stdout.contains(
            "            failed as expected: sh -c 'echo boom >&2; exit 3' failed with exit code 3: boom\n"
        ),
        "{show:?}"
    );
}

#[test]
fn an_unexpected_success_or_a_different_error_fails_the_step() {
    let sb = Sandbox::new();
    sb.write(
        "runbooks/succeeds.yaml",
        r#"version: 1
steps:
  - id: fine
    action: exec
    expect_failure: {contains: "exit code 3"}
    with: {argv: ["true"]}
  - id: after
    action: exec
    with: {argv: ["true"]}
"#,
    );
    sb.write(
        "runbooks/other.yaml",
        r#"version: 1
params:
  want: {type: string, default: "exit code 4"}
steps:
  - id: boom
    action: exec
    expect_failure: {contains: "{{ want }}"}
    with: {argv: ["sh", "-c", "echo boom >&2; exit 3"]}
"#,
    );
    let r = sb.run(&["run", "succeeds"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout
            .contains("  FAILED   fine: expected to fail with `exit code 3`, but it succeeded\n"),
        "{r:?}"
    );
    assert!(
        !r.stdout.contains("ok       after"),
        "the run went on: {r:?}"
    );
    assert_eq!(runs(&sb)[0]["status"], "failed");

    let r = sb.run(&["run", "other"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout.contains(
            "  FAILED   boom: failed with a different error: sh -c 'echo boom >&2; exit 3' failed with exit code 3: boom (expected an error containing `exit code 4`)\n"
        ),
        "{r:?}"
    );
    // The expected text is a template.
    let r = sb.run(&["run", "other", "--set", "want=exit code 3"]);
    assert_eq!(r.code, 0, "{r:?}");
}

#[test]
fn the_plan_judges_an_expected_failure_by_what_it_sees() {
    let sb = Sandbox::new();
    sb.write("here.txt", "x");
    sb.write(
        "runbooks/t.yaml",
        r#"version: 1
steps:
  - id: other-error
    action: path-check
    expect_failure: {contains: "is a file"}
    with: {path: "{root}/missing"}
  - id: passes
    action: path-check
    expect_failure: {contains: "does not exist"}
    with: {path: "{root}/here.txt"}
"#,
    );
    let before = tree_digest(sb.path());
    let (code, steps) = plan_steps(&sb, &["t"]);
    assert_eq!(code, 3);
    let root = sb.path().display().to_string();
    assert_eq!(
        steps,
        [
            (
                "other-error".into(),
                "would-fail".into(),
                format!(
                    "would fail with a different error: `{root}/missing`: does not exist (expected an error containing `is a file`)"
                )
            ),
            (
                "passes".into(),
                "would-fail".into(),
                "expected to fail with `does not exist`, but it passes now".into()
            ),
        ]
    );
    // `run` refuses before anything runs, as for any step that would fail.
    let r = sb.run(&["run", "t"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        r.stderr.contains(
            "refusing to run `t`: step `other-error` would fail: would fail with a different error"
        ),
        "{r:?}"
    );
    assert_eq!(tree_digest(sb.path()), before);

    // `contains` must say something.
    sb.write(
        "runbooks/empty.yaml",
        "version: 1\nsteps:\n  - id: x\n    action: exec\n    expect_failure: {contains: \"\"}\n    with: {argv: [\"false\"]}\n",
    );
    let r = sb.run(&["validate", "empty"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr
            .contains("runbooks/empty.yaml:5:32: error: `contains` must name the expected error"),
        "{r:?}"
    );
}

/// A called runbook that fails as expected has run its own rollback; `run` does not
/// refuse the caller although the plan sees the callee fail (nor a call with
/// `on_failure: continue`), and the steps after it are judged without its effects.
#[test]
fn a_call_expected_to_fail_rolls_back_and_does_not_stop_the_run() {
    let sb = Sandbox::new();
    sb.write("live/data.txt", "the live data\n");
    sb.write(
        "runbooks/lib/bad-change.yaml",
        r#"version: 1
roots: ["{root}/live"]
steps:
  - id: change
    action: write-file
    with: {path: "{root}/live/data.txt", content: "changed\n"}
  - id: check
    action: assert
    with: {that: "false", message: "the change is bad"}
rollback:
  - id: undo
    action: write-file
    with: {path: "{root}/live/data.txt", content: "the live data\n"}
"#,
    );
    sb.write(
        "runbooks/t.yaml",
        r#"version: 1
steps:
  - id: before
    action: path-check
    with: {path: "{root}/live/data.txt", sha256: true}
  - id: bad
    action: runbook
    expect_failure: {contains: "the change is bad"}
    with: {name: lib/bad-change}
  - id: tolerated
    action: runbook
    on_failure: continue
    with: {name: lib/bad-change}
  - id: same
    action: path-check
    with: {path: "{root}/live/data.txt", sha256: "{{ steps.before.outputs.sha256 }}"}
"#,
    );
    let (code, steps) = plan_steps(&sb, &["t"]);
    assert_eq!(code, 0, "{steps:?}");
    assert_eq!(
        steps[1],
        (
            "bad".into(),
            "no-change".into(),
            "fails as expected: step `check` of `lib/bad-change` would fail: the change is bad"
                .into()
        )
    );
    let r = sb.run(&["run", "t"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("  ok       bad/undo"), "{r:?}");
    assert!(
        r.stdout.contains("  ok       bad ")
            && r.stdout.contains(
                "failed as expected: step `bad/check` of `lib/bad-change` failed: the change is bad"
            ),
        "{r:?}"
    );
    assert_eq!(sb.read("live/data.txt"), "the live data\n");

    // A digest that does not match fails, naming both.
    std::fs::write(sb.p("live/data.txt"), "other\n").unwrap();
    sb.write(
        "runbooks/mismatch.yaml",
        "version: 1\nsteps:\n  - id: same\n    action: path-check\n    with: {path: \"{root}/live/data.txt\", sha256: \"0000\"}\n",
    );
    let r = sb.run(&["run", "mismatch"]);
    assert_eq!(r.code, 3, "{r:?}");
    use sha2::Digest;
    let actual = sha2::Sha256::digest(b"other\n")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    assert!(
        r.stderr
            .contains(&format!("data.txt`: sha256 is {actual}, not 0000")),
        "{r:?}"
    );
}

/// `sha256: true` of a directory is a digest of the tree: names, types, contents and
/// link targets, leaving out `exclude`d names at any depth.
#[test]
fn a_tree_digest_sees_every_byte_but_what_it_excludes() {
    let sb = Sandbox::new();
    sb.write("tree/a/one.txt", "1");
    sb.write("tree/b/two.txt", "2");
    sb.write("tree/b/db-shm", "index");
    std::os::unix::fs::symlink("one.txt", sb.p("tree/a/link")).unwrap();
    sb.write(
        "runbooks/d.yaml",
        "version: 1\nsteps:\n  - id: d\n    action: path-check\n    with: {path: \"{root}/tree\", type: dir, sha256: true, exclude: [\"*-shm\"]}\noutputs:\n  sha256: \"{{ steps.d.outputs.sha256 }}\"\n",
    );
    let digest = |sb: &Sandbox| -> String {
        let r = sb.run(&["run", "d", "--format", "json"]);
        assert_eq!(r.code, 0, "{r:?}");
        let finished: Json = r
            .stdout
            .lines()
            .map(|l| serde_json::from_str::<Json>(l).unwrap())
            .find(|e| e["event"] == "run-finished")
            .unwrap();
        finished["outputs"]["sha256"].as_str().unwrap().to_string()
    };
    let first = digest(&sb);
    assert_eq!(first.len(), 64);
    std::fs::write(sb.p("tree/b/db-shm"), "rewritten by a reader").unwrap();
    assert_eq!(digest(&sb), first, "an excluded file counted");
    std::fs::write(sb.p("tree/b/two.txt"), "3").unwrap();
    let changed = digest(&sb);
    assert_ne!(changed, first, "a changed byte went unseen");
    std::fs::write(sb.p("tree/b/two.txt"), "2").unwrap();
    assert_eq!(digest(&sb), first);
    std::fs::remove_file(sb.p("tree/a/link")).unwrap();
    std::os::unix::fs::symlink("elsewhere", sb.p("tree/a/link")).unwrap();
    assert_ne!(digest(&sb), first, "a changed link target went unseen");
    let r = sb.run(&["validate", "--format", "json"]);
    assert_eq!(r.code, 0, "{r:?}");
    sb.write(
        "runbooks/bad.yaml",
        "version: 1\nsteps:\n  - id: d\n    action: path-check\n    with: {path: /x, exclude: [\"a/b\"]}\n",
    );
    let r = sb.run(&["validate", "bad"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr
            .contains("`a/b`: a pattern matches one name, without `/`"),
        "{r:?}"
    );
}

/// A call with `dry_run: true` plans the runbook (writes nothing) and outputs its plan;
/// it fails when a step of that plan would fail.
#[test]
fn a_dry_run_call_plans_the_runbook_and_changes_nothing() {
    let sb = Sandbox::new();
    sb.write(
        "runbooks/lib/make.yaml",
        r#"version: 1
params:
  name: {type: string, default: made}
roots: ["{root}/out"]
steps:
  - id: file
    action: write-file
    with: {path: "{root}/out/{{ name }}.txt", content: "x"}
"#,
    );
    sb.write(
        "runbooks/t.yaml",
        r#"version: 1
params:
  name: {type: string, default: made}
steps:
  - id: preview
    action: runbook
    with: {name: lib/make, dry_run: true, params: {name: "{{ name }}"}}
outputs:
  details: "{{ steps.preview.outputs.details }}"
  ok: "{{ steps.preview.outputs.ok }}"
"#,
    );
    std::fs::create_dir(sb.p("out")).unwrap();
    let (code, steps) = plan_steps(&sb, &["t"]);
    assert_eq!(code, 0);
    assert_eq!(
        steps[0],
        (
            "preview".into(),
            "no-change".into(),
            "plans `lib/make` (a dry-run: nothing changes)".into()
        )
    );
    let r = sb.run(&["run", "t"]);
    assert_eq!(r.code, 0, "{r:?}");
    let root = sb.path().display().to_string();
    assert!(
        r.stdout.contains(&format!(
            "  output details = file will change: create `{root}/out/made.txt` (1 bytes)\n"
        )),
        "{r:?}"
    );
    assert!(r.stdout.contains("  output ok = true"), "{r:?}");
    assert!(!sb.p("out/made.txt").exists(), "a dry-run call wrote");
    // A plan that would fail fails the step.
    let r = sb.run(&["run", "t", "--set", "name=no/such/dir/x"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        r.stderr
            .contains("refusing to run `t`: step `preview/file` would fail: parent directory"),
        "{r:?}"
    );
}
