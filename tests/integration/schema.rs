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
            "compose-stop",
            "compose-start",
            "systemd-stop",
            "systemd-start",
            "docker-exec",
            "sqlite-backup",
            "sqlite-check",
            "sqlite-query",
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
