//! Adversarial cases the fuzz targets found (fuzz/, README "Fuzzing"): each is the
//! minimized input, run through the binary.

use crate::support::Sandbox;

/// `steps: [[[[...` 64 KB deep: libyaml scans the whole text before serde_yaml's
/// recursion limit refuses it, in time quadratic in the flow nesting (two minutes for
/// `validate` of this file in a debug build). It is refused before serde_yaml reads it,
/// with its position.
#[test]
fn deeply_nested_runbook_is_refused_before_yaml_is_scanned() {
    let sb = Sandbox::new();
    let deep = format!("version: 1\nsteps: {}\n", "[".repeat(60_000));
    sb.write("runbooks/deep.yaml", &deep);
    let r = sb.run(&["--path", "runbooks", "validate", "deep"]);
    assert_eq!(r.code, 2, "{r:?}");
    let first = r.stderr.lines().next().unwrap_or_default();
    assert_eq!(
        first,
        "runbooks/deep.yaml:2:263: error: nested deeper than 128 levels, the most a runbook or vars file may nest",
        "{r:?}"
    );
}

/// The same for a vars file, and the limit is serde_yaml's own: 128 levels (the top
/// mapping is one) are read as before, 129 are refused.
#[test]
fn deeply_nested_vars_file_is_refused_and_128_levels_still_read() {
    let sb = Sandbox::new();
    sb.write(
        "runbooks/v.yaml",
        "version: 1\nparams:\n  a: {type: string, default: x}\nsteps:\n  - id: s\n    action: assert\n    with: {that: \"true\"}\n",
    );
    let nested = |n: usize| format!("a: {}{}\n", "[".repeat(n), "]".repeat(n));
    sb.write("deep.yaml", &format!("a: {}\n", "[".repeat(60_000)));
    sb.write("at-limit.yaml", &nested(127));
    sb.write("past-limit.yaml", &nested(128));

    let r = sb.run(&["--path", "runbooks", "plan", "v", "--vars", "deep.yaml"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.starts_with(
            "error: deep.yaml:1:259: error: vars file: nested deeper than 128 levels, the most a runbook or vars file may nest\n"
        ),
        "{r:?}"
    );

    let r = sb.run(&[
        "--path",
        "runbooks",
        "plan",
        "v",
        "--vars",
        "past-limit.yaml",
    ]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.starts_with(
            "error: past-limit.yaml:1:131: error: vars file: nested deeper than 128 levels"
        ),
        "{r:?}"
    );

    // 128 levels are read: the value reaches the param, whose type refuses it.
    let r = sb.run(&["--path", "runbooks", "plan", "v", "--vars", "at-limit.yaml"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr
            .starts_with("error: param `a` is a string, not [[["),
        "{r:?}"
    );
}
