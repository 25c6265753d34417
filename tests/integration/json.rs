//! `json-check`: parse errors with line:col, jq expectations, validate-time syntax
//! errors, the dry-run, and a SIGKILL while the check is reading.

use std::io::{BufRead, BufReader};

use crate::support::{Sandbox, tree_digest};

const REGISTRY: &str = r#"{
  "projects": [
    {"id": "p05-interferometer", "root": "/srv/p05"},
    {"id": "p06-polisher", "root": "/srv/p06"}
  ]
}
"#;

const CHECK: &str = r#"version: 1
steps:
  - id: check
    action: json-check
    with:
      path: "{root}/registry.json"
      expect:
        - ".projects | length > 0"
        - "[.projects[].id] | index(\"p05-interferometer\") != null"
"#;

fn show_json(sb: &Sandbox, id: &str) -> serde_json::Value {
    let show = sb.run(&["show", id, "--format", "json"]);
    assert_eq!(show.code, 0, "{show:?}");
    serde_json::from_str(&show.stdout).unwrap()
}

#[test]
fn a_valid_file_passes_its_expectations_in_the_plan_and_the_run() {
    let sb = Sandbox::new();
    sb.write("registry.json", REGISTRY);
    sb.write("runbooks/check.yaml", CHECK);
    let before = tree_digest(sb.path());
    let plan = sb.run(&["plan", "check"]);
    assert_eq!(plan.code, 0, "{plan:?}");
    assert_eq!(tree_digest(sb.path()), before, "the plan wrote something");
    assert_eq!(
        sb.redact(&plan.stdout),
        "plan check (runbooks/check.yaml)
steps:
  no change   check  json-check: `{root}/registry.json` is valid JSON and its 2 expectations hold now
1 steps: 0 will change, 1 no change, 0 unknown, 0 skipped, 0 would fail
"
    );
    let r = sb.run(&["run", "check"]);
    assert_eq!(r.code, 0, "{r:?}");
    let id = sb.last_run_id();
    let step = &show_json(&sb, &id)["steps"][0];
    assert_eq!(step["status"], "succeeded");
    assert_eq!(
        step["outputs"],
        serde_json::json!({"valid": true, "values": [true, true]})
    );
}

#[test]
fn invalid_json_fails_with_registry_invalid_json_and_line_col() {
    let sb = Sandbox::new();
    let broken = "{\n  \"projects\": [\n    {\"id\": \"p05\"},\n  ]\n}\n";
    sb.write("registry.json", broken);
    sb.write("runbooks/check.yaml", CHECK);
    // The plan reads the real file and refuses the run before anything happens.
    let r = sb.run(&["run", "check"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        sb.redact(&r.stderr).starts_with(
            "error: refusing to run `check`: step `check` would fail: registry_invalid_json: {root}/registry.json:4:3: trailing comma\n"
        ),
        "{r:?}"
    );
    // A file that an earlier step writes is checked when the step runs.
    sb.write(
        "runbooks/written.yaml",
        &format!(
            "version: 1\nsteps:\n  - id: write\n    action: write-file\n    with: {{path: \"{{root}}/late.json\", content: {}}}\n  - id: check\n    action: json-check\n    with: {{path: \"{{root}}/late.json\"}}\n",
            serde_json::to_string(broken).unwrap()
        ),
    );
    let plan = sb.run(&["plan", "written"]);
    assert_eq!(plan.code, 0, "{plan:?}");
    assert!(
        sb.redact(&plan.stdout).contains(
            "  no change   check  json-check: will check `{root}/late.json` after the steps before it have written it\n"
        ),
        "{plan:?}"
    );
    let r = sb.run(&["run", "written"]);
    assert_eq!(r.code, 1, "{r:?}");
    let lines: Vec<String> = sb.redact(&r.stdout).lines().map(str::to_string).collect();
    assert_eq!(
        lines[2], "  FAILED   check: registry_invalid_json: {root}/late.json:4:3: trailing comma",
        "{r:?}"
    );
}

#[test]
fn an_expectation_that_does_not_hold_is_named() {
    let sb = Sandbox::new();
    sb.write("registry.json", REGISTRY);
    sb.write(
        "runbooks/check.yaml",
        &CHECK.replace("length > 0", "length > 5"),
    );
    let r = sb.run(&["plan", "check"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        sb.redact(&r.stdout).contains(
            "  would fail  check  json-check: `{root}/registry.json`: `.projects | length > 5` does not hold: expected true, got false\n"
        ),
        "{r:?}"
    );
    // A run-time failure says the same (the file changes between plan and step).
    sb.write(
        "runbooks/late.yaml",
        "version: 1\nsteps:\n  - id: write\n    action: write-file\n    with: {path: \"{root}/late.json\", content: '{\"projects\": []}'}\n  - id: check\n    action: json-check\n    with: {path: \"{root}/late.json\", expect: [\".projects | length > 0\"]}\n",
    );
    let r = sb.run(&["run", "late"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert_eq!(
        sb.redact(r.stdout.lines().nth(2).unwrap()),
        "  FAILED   check: `{root}/late.json`: `.projects | length > 0` does not hold: expected true, got false"
    );
}

#[test]
fn a_jq_syntax_error_is_a_validate_error_with_file_line_col() {
    let sb = Sandbox::new();
    sb.write(
        "runbooks/bad.yaml",
        "version: 1\nsteps:\n  - id: check\n    action: json-check\n    with:\n      path: registry.json\n      expect:\n        - \".projects | length > 0\"\n        - \".projects | lenght\"\n        - \".projects | length >\"\n",
    );
    let r = sb.run(&["validate", "bad"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert_eq!(
        r.stderr,
        "runbooks/bad.yaml:9:11: error: jq expression `.projects | lenght` does not parse: undefined filter `lenght` at column 13 (step `check`, field `steps[0].with.expect[1]`)
 9 |         - \".projects | lenght\"
   |           ^

"
    );
    assert!(!sb.p("state").exists(), "validate wrote state");
}

/// SIGKILL while the check is blocked reading (a FIFO no one writes), then resume: the
/// read-only step runs again and the run succeeds.
#[test]
fn sigkill_during_the_check_then_resume_runs_it_again() {
    let sb = Sandbox::new();
    sb.write("registry.json", REGISTRY);
    sb.write(
        "runbooks/fifo.yaml",
        "version: 1\nsteps:\n  - id: make-fifo\n    action: exec\n    with: {argv: [sh, -c, \"rm -f {root}/registry.json && mkfifo {root}/registry.json\"]}\n  - id: check\n    action: json-check\n    with: {path: \"{root}/registry.json\", expect: [\".projects | length == 2\"]}\n",
    );
    let mut child = sb.spawn(&["run", "fifo"]);
    let mut first = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut first)
        .unwrap();
    let id = first.split_whitespace().nth(1).unwrap().to_string();
    sb.wait_for("the check step to start", || {
        show_json(&sb, &id)["steps"][1]["status"] == "started"
    });
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    std::fs::remove_file(sb.p("registry.json")).unwrap();
    sb.write("registry.json", REGISTRY);
    let r = sb.run(&["resume", &id]);
    assert_eq!(r.code, 0, "{r:?}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(
        lines[1],
        "  done     make-fifo (finished in an earlier attempt)"
    );
    assert!(lines[2].starts_with("  ok       check ("), "{r:?}");
    let step = &show_json(&sb, &id)["steps"][1];
    assert_eq!(step["status"], "succeeded");
    assert_eq!(step["outputs"]["valid"], true);
}
