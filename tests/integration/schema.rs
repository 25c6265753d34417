//! The schema file is what the code generates.

use crate::support::Sandbox;

#[test]
fn schema_file_matches_the_code() {
    let sb = Sandbox::new();
    let r = sb.run(&["schema"]);
    assert_eq!(r.code, 0);
    let file = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/schemas/runbook.schema.json"
    ))
    .unwrap();
    assert!(
        r.stdout == file,
        "schemas/runbook.schema.json is stale: run `cargo run -- schema > schemas/runbook.schema.json`"
    );
    let schema: serde_json::Value = serde_json::from_str(&file).unwrap();
    let actions: Vec<&str> = schema["$defs"]["Step"]["properties"]["action"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "mkdir",
            "copy",
            "write-file",
            "remove",
            "move",
            "chown",
            "chmod",
            "path-check",
            "exec",
            "snapshot-list",
            "retention",
            "daemon-start",
            "daemon-stop",
            "json-check",
            "http",
            "http-check",
            "compose-stop",
            "compose-start",
            "systemd-stop",
            "systemd-start",
            "docker-exec",
            "sqlite-backup",
            "sqlite-check",
            "sqlite-query",
            "offsite-push",
            "offsite-list",
            "offsite-fetch",
            "offsite-retention",
            "offsite-check",
            "assert",
            "confirm",
            "runbook"
        ]
    );
}

#[test]
fn bundled_runbooks_declare_the_schema_and_validate() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/runbooks");
    let sb = Sandbox::new();
    let r = sb.run(&["--path", root, "validate"]);
    assert_eq!(r.code, 0, "{r:?}");
    for entry in walkdir::WalkDir::new(root) {
        let entry = entry.unwrap();
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        if text.lines().any(|l| l.starts_with("steps:")) {
            assert!(
                text.starts_with("# yaml-language-server: $schema="),
                "{} lacks the schema comment",
                entry.path().display()
            );
        }
    }
}

fn schema_validator() -> jsonschema::Validator {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/schemas/runbook.schema.json"
    ))
    .unwrap();
    let schema: serde_json::Value = serde_json::from_str(&text).unwrap();
    jsonschema::draft202012::new(&schema).expect("the schema is a valid draft 2020-12 schema")
}

/// The schema's complaints about one YAML document (read as the engine reads YAML).
fn schema_errors(validator: &jsonschema::Validator, yaml: &str) -> Vec<String> {
    let doc: serde_json::Value = serde_yaml::from_str(yaml).expect("YAML");
    validator
        .iter_errors(&doc)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

/// The ```yaml blocks of the README that are whole runbooks (not fragments of one).
fn readme_runbooks() -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in readme.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```yaml") => current = Some(String::new()),
            (Some(_), "```") => blocks.push(current.take().unwrap()),
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
        .into_iter()
        .filter(|b| {
            b.lines().any(|l| l.starts_with("version:"))
                && b.lines().any(|l| l.starts_with("steps:"))
        })
        .collect()
}

#[test]
fn bundled_runbooks_and_readme_examples_satisfy_the_schema() {
    let validator = schema_validator();
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/runbooks");
    let mut checked = 0;
    for entry in walkdir::WalkDir::new(root) {
        let entry = entry.unwrap();
        if entry.path().extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(entry.path()).unwrap();
        if !text.lines().any(|l| l.starts_with("steps:")) {
            continue; // a vars file
        }
        let errors = schema_errors(&validator, &text);
        assert!(errors.is_empty(), "{}: {errors:#?}", entry.path().display());
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} bundled runbooks found");
    let examples = readme_runbooks();
    assert!(!examples.is_empty(), "the README shows no whole runbook");
    let sb = Sandbox::new();
    for (i, example) in examples.iter().enumerate() {
        let errors = schema_errors(&validator, example);
        assert!(
            errors.is_empty(),
            "README example {i}: {errors:#?}\n{example}"
        );
        // The engine takes them too: the README shows only runbooks that validate.
        sb.write(&format!("runbooks/readme-{i}.yaml"), example);
        let r = sb.run(&["validate", &format!("readme-{i}")]);
        assert_eq!(r.code, 0, "README example {i}: {r:?}");
    }
}

/// (what it shows, runbook, whether `runbook validate` accepts it). The schema must
/// give the same verdict as the engine on each.
const AGREEMENT: &[(&str, &str, bool)] = &[
    (
        "whole-value templates where ints, bools, enums, lists and maps go",
        "version: 1\nparams:\n  keep: {type: int, default: 3}\n  mode: {type: string, default: replace}\n  off: {type: bool, default: false}\n  argv: {type: list, default: [echo, hi]}\n  code: {type: int, default: 200}\nroots: [/tmp/x]\nsteps:\n  - id: prune\n    action: retention\n    with: {dir: /tmp/x/s, keep_daily: \"{{ keep }}\", keep_weekly: '{{ keep }}', keep_monthly: 1}\n  - id: cp\n    action: copy\n    with: {from: /tmp/a, to: /tmp/x/b, overwrite: \"{{ mode }}\"}\n  - id: get\n    action: http\n    with: {url: \"https://127.0.0.1:1/\", insecure: \"{{ off }}\", expect: {status: \"{{ code }}\"}}\n  - id: bak\n    action: sqlite-backup\n    with: {source: /tmp/a.db, dest: /tmp/x/b.db, check: \"{{ mode }}\"}\n  - id: run\n    action: exec\n    with: {argv: \"{{ argv }}\", expect_exit: [0, \"{{ keep }}\"]}\n",
        true,
    ),
    (
        "a bare bool or number as a var",
        "version: 1\nvars:\n  n: 3\n  b: true\nsteps:\n  - id: a\n    action: assert\n    with: {that: n == '3'}\n",
        true,
    ),
    ("no steps", "version: 1\nsteps: []\n", false),
    (
        "version 2",
        "version: 2\nsteps:\n  - id: a\n    action: mkdir\n    with: {path: /tmp/x}\n",
        false,
    ),
    (
        "a step id with a space",
        "version: 1\nsteps:\n  - id: make it\n    action: mkdir\n    with: {path: /tmp/x}\n",
        false,
    ),
    (
        "an unknown action",
        "version: 1\nsteps:\n  - id: a\n    action: mkdri\n    with: {path: /tmp/x}\n",
        false,
    ),
    (
        "an unknown argument nested below with",
        "version: 1\nsteps:\n  - id: h\n    action: http\n    with:\n      url: http://127.0.0.1:1/\n      retry: {until_healthy: 10s, evry: 2s}\n",
        false,
    ),
    (
        "a template standing for a struct",
        "version: 1\nparams:\n  r: {type: string, default: x}\nsteps:\n  - id: h\n    action: http\n    with: {url: \"http://127.0.0.1:1/\", retry: \"{{ r }}\"}\n",
        false,
    ),
    (
        "a template with text around it where an int goes",
        "version: 1\nparams:\n  keep: {type: int, default: 3}\nroots: [/tmp/x]\nsteps:\n  - id: prune\n    action: retention\n    with: {dir: /tmp/x/s, keep_daily: \"{{ keep }}0\"}\n",
        false,
    ),
    (
        "a literal string where an int goes",
        "version: 1\nroots: [/tmp/x]\nsteps:\n  - id: prune\n    action: retention\n    with: {dir: /tmp/x/s, keep_daily: seven}\n",
        false,
    ),
    (
        "a var that is a list",
        "version: 1\nvars:\n  l: [a, b]\nsteps:\n  - id: a\n    action: mkdir\n    with: {path: /tmp/x}\n",
        false,
    ),
    (
        "a missing argument",
        "version: 1\nsteps:\n  - id: a\n    action: copy\n    with: {from: /tmp/a}\n",
        false,
    ),
    (
        "retry with no attempts",
        "version: 1\nsteps:\n  - id: a\n    action: mkdir\n    with: {path: /tmp/x}\n    retry: {attempts: 0}\n",
        false,
    ),
];

#[test]
fn the_schema_accepts_what_the_engine_accepts_and_rejects_what_it_rejects() {
    let validator = schema_validator();
    let sb = Sandbox::new();
    for (i, (what, text, engine_ok)) in AGREEMENT.iter().enumerate() {
        sb.write(&format!("runbooks/case-{i}.yaml"), text);
        let r = sb.run(&["validate", &format!("case-{i}")]);
        assert_eq!(r.code == 0, *engine_ok, "engine on {what}: {r:?}");
        let errors = schema_errors(&validator, text);
        assert_eq!(
            errors.is_empty(),
            *engine_ok,
            "schema on {what}: {errors:#?}"
        );
    }
}

#[test]
fn ints_bools_and_enums_come_from_params_through_whole_value_templates() {
    let sb = Sandbox::new();
    for stamp in ["20260101T000000Z", "20260102T000000Z", "20260103T000000Z"] {
        std::fs::create_dir_all(sb.p(&format!("snaps/{stamp}"))).unwrap();
    }
    sb.write("data/a.txt", "new\n");
    sb.write("snaps/copy.txt", "old\n");
    sb.write(
        "runbooks/tidy.yaml",
        "version: 1\nparams:\n  keep: {type: int, default: 1}\n  zero: {type: int, default: 0}\n  mode: {type: string, default: replace}\n  want: {type: bool, default: true}\nroots: [\"{root}/snaps\"]\nsteps:\n  - id: prune\n    action: retention\n    with: {dir: \"{root}/snaps\", keep_daily: \"{{ keep }}\", keep_weekly: \"{{ zero }}\", keep_monthly: \"{{ zero }}\"}\n  - id: cp\n    action: copy\n    with: {from: \"{root}/data/a.txt\", to: \"{root}/snaps/copy.txt\", overwrite: \"{{ mode }}\"}\n  - id: check\n    action: path-check\n    with: {path: \"{root}/snaps/copy.txt\", exists: \"{{ want }}\"}\n",
    );
    let r = sb.run(&["validate", "tidy"]);
    assert_eq!(r.code, 0, "{r:?}");
    let r = sb.run(&["run", "tidy"]);
    assert_eq!(r.code, 0, "{r:?}");
    let mut left: Vec<String> = std::fs::read_dir(sb.p("snaps"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["20260103T000000Z", "copy.txt"]);
    assert_eq!(sb.read("snaps/copy.txt"), "new\n");

    // What does not parse as what the field takes is refused by the plan, by name.
    let r = sb.run(&["plan", "tidy", "--set", "mode=sometimes"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        r.stdout.contains("would fail  cp     copy: invalid argument `overwrite`: unknown variant `sometimes`, expected `never` or `replace`\n"),
        "{r:?}"
    );
    sb.write(
        "runbooks/words.yaml",
        "version: 1\nparams:\n  keep: {type: string, default: seven}\nroots: [\"{root}/snaps\"]\nsteps:\n  - id: prune\n    action: retention\n    with: {dir: \"{root}/snaps\", keep_daily: \"{{ keep }}\"}\n",
    );
    let before_words = crate::support::tree_digest(&sb.p("snaps"));
    let r = sb.run(&["run", "words"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        r.stderr.contains("step `prune` would fail: invalid argument `keep_daily`: it renders to `seven`, expected usize"),
        "{r:?}"
    );
    assert_eq!(crate::support::tree_digest(&sb.p("snaps")), before_words);
}
