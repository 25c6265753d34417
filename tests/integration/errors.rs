//! Every class of runbook error: exact `FILE:LINE:COL` message, exit code 2, and
//! nothing runs (no journal, no file written).

use crate::support::Sandbox;

/// (file name, runbook text, exact stderr of `runbook run NAME`)
const CASES: &[(&str, &str, &str)] = &[
    (
        "syntax",
        "version: 1\nsteps:\n  - id: a\n    action: mkdir\n   with: {path: out/x}\n",
        "runbooks/syntax.yaml:5:4: error: did not find expected '-' indicator, while parsing a block collection at line 3 column 3
 5 |    with: {path: out/x}
   |    ^
",
    ),
    (
        "wrong-type",
        "version: 1\nsteps:\n  - id: make\n    action: mkdir\n    with: {path: out/x}\n    retry: {attempts: many}\n",
        "runbooks/wrong-type.yaml:6:23: error: invalid type: string \"many\", expected u32 (step `make`, field `steps[0].retry.attempts`)
 6 |     retry: {attempts: many}
   |                       ^
",
    ),
    (
        "unknown-key",
        "version: 1\nsteps:\n  - id: make\n    action: mkdir\n    wth: {path: out/x}\n",
        "runbooks/unknown-key.yaml:5:5: error: unknown key `wth` (step `make`, field `steps[0].wth`)
 5 |     wth: {path: out/x}
   |     ^
help: did you mean `with`?
",
    ),
    (
        "unknown-action",
        "version: 1\nsteps:\n  - id: make\n    action: mkdri\n    with: {path: out/x}\n",
        "runbooks/unknown-action.yaml:4:13: error: unknown action `mkdri` (step `make`, field `steps[0].action`)
 4 |     action: mkdri
   |             ^
help: did you mean `mkdir`?
",
    ),
    (
        "missing-arg",
        "version: 1\nsteps:\n  - id: copy-db\n    action: copy\n    with: {from: out/a}\n",
        "runbooks/missing-arg.yaml:5:5: error: missing argument `to` (step `copy-db`, field `steps[0].with`)
 5 |     with: {from: out/a}
   |     ^
",
    ),
    (
        "unknown-arg",
        "version: 1\nsteps:\n  - id: copy-db\n    action: copy\n    with: {from: out/a, too: out/b}\n",
        "runbooks/unknown-arg.yaml:5:25: error: unknown argument `too`, expected one of `from`, `to`, `overwrite`, `mode`, `owner`, `keep_replaced`, `if_exists`, `link_from` (step `copy-db`, field `steps[0].with.too`)
 5 |     with: {from: out/a, too: out/b}
   |                         ^
help: did you mean `to`?
",
    ),
    (
        "duplicate-id",
        "version: 1\nsteps:\n  - id: make\n    action: mkdir\n    with: {path: out/x}\n  - id: make\n    action: mkdir\n    with: {path: out/y}\n",
        "runbooks/duplicate-id.yaml:6:9: error: duplicate step id `make` (first used at line 3) (step `make`, field `steps[1].id`)
 6 |   - id: make
   |         ^
",
    ),
    (
        "undefined-var",
        "version: 1\nparams:\n  backup_dir: {type: path, required: true}\nsteps:\n  - id: make\n    action: mkdir\n    with: {path: \"{{ backup_dri }}/snapshots\"}\n",
        "runbooks/undefined-var.yaml:7:22: error: undefined variable `backup_dri` (step `make`, field `steps[0].with.path`)
 7 |     with: {path: \"{{ backup_dri }}/snapshots\"}
   |                      ^
help: did you mean `backup_dir`?
",
    ),
    (
        "bad-when",
        "version: 1\nparams:\n  include_chroma: {type: bool, default: false}\nsteps:\n  - id: make\n    action: mkdir\n    when: include_chroma ==\n    with: {path: out/x}\n",
        "runbooks/bad-when.yaml:7:11: error: expression syntax: unexpected end of input, expected expression (step `make`, field `steps[0].when`)
 7 |     when: include_chroma ==
   |           ^
",
    ),
    (
        "output-before-run",
        "version: 1\nsteps:\n  - id: first\n    action: exec\n    with: {argv: [echo, \"{{ steps.second.outputs.stdout }}\"]}\n  - id: second\n    action: exec\n    with: {argv: [echo, hi]}\n",
        "runbooks/output-before-run.yaml:5:35: error: `steps.second` is read before step `second` runs (step `first`, field `steps[0].with.argv[1]`)
 5 |     with: {argv: [echo, \"{{ steps.second.outputs.stdout }}\"]}
   |                                   ^
",
    ),
    (
        "unknown-output",
        "version: 1\nsteps:\n  - id: copy\n    action: copy\n    with: {from: a, to: b}\n  - id: note\n    action: exec\n    with: {argv: [echo, \"{{ steps.copy.outputs.byte }}\"]}\n",
        "runbooks/unknown-output.yaml:8:48: error: step `copy` has no output `byte` (step `note`, field `steps[1].with.argv[1]`)
 8 |     with: {argv: [echo, \"{{ steps.copy.outputs.byte }}\"]}
   |                                                ^
help: did you mean `bytes`?
",
    ),
    (
        "nested-unknown-arg",
        "version: 1\nsteps:\n  - id: health\n    action: http\n    with:\n      url: http://127.0.0.1:1/health\n      retry:\n        until_healthy: 10s\n        evry: 2s\n",
        "runbooks/nested-unknown-arg.yaml:9:9: error: unknown argument `evry`, expected `until_healthy` or `every` (step `health`, field `steps[0].with.retry.evry`)
 9 |         evry: 2s
   |         ^
help: did you mean `every`?
",
    ),
    (
        "nested-unknown-expect",
        "version: 1\nsteps:\n  - id: health\n    action: http\n    with:\n      url: http://127.0.0.1:1/health\n      expect:\n        status: 200\n        jqq: [.ok]\n",
        "runbooks/nested-unknown-expect.yaml:9:9: error: unknown argument `jqq`, expected `status` or `jq` (step `health`, field `steps[0].with.expect.jqq`)
 9 |         jqq: [.ok]
   |         ^
help: did you mean `jq`?
",
    ),
    (
        "nested-unknown-flow",
        "version: 1\nsteps:\n  - id: q\n    action: sqlite-query\n    with:\n      path: a.db\n      sql: select 1\n      expect: {rows: 1, max_row: 2}\n",
        "runbooks/nested-unknown-flow.yaml:8:25: error: unknown argument `max_row`, expected one of `rows`, `min_rows`, `max_rows` (step `q`, field `steps[0].with.expect.max_row`)
 8 |       expect: {rows: 1, max_row: 2}
   |                         ^
help: did you mean `max_rows`?
",
    ),
    (
        "param-typo",
        "version: 1\nparams:\n  dir:\n    type: path\n    defualt: /tmp\nsteps:\n  - id: make\n    action: mkdir\n    with: {path: out/x}\n",
        "runbooks/param-typo.yaml:5:5: error: unknown key `defualt` (field `params.dir.defualt`)
 5 |     defualt: /tmp
   |     ^
help: did you mean `default`?
",
    ),
    (
        "lock-typo",
        "version: 1\nsteps:\n  - id: make\n    action: mkdir\n    with: {path: out/x}\n    lock:\n      path: out.lock\n      timeot: 3s\n",
        "runbooks/lock-typo.yaml:8:7: error: unknown key `timeot` (step `make`, field `steps[0].lock.timeot`)
 8 |       timeot: 3s
   |       ^
help: did you mean `timeout`?
",
    ),
    (
        "no-steps",
        "version: 1\ndescription: cut by mistake\nsteps: []\n",
        "runbooks/no-steps.yaml:3:1: error: a runbook needs at least one step (field `steps`)
 3 | steps: []
   | ^
",
    ),
];

#[test]
fn each_error_class_names_file_line_col_step_and_field_and_nothing_runs() {
    let sb = Sandbox::new();
    for (name, text, expected) in CASES {
        sb.write(&format!("runbooks/{name}.yaml"), text);
        let r = sb.run(&["run", name]);
        assert_eq!(r.code, 2, "{name}: {r:?}");
        assert_eq!(r.stderr, *expected, "{name}");
        assert_eq!(r.stdout, "", "{name}");
        let v = sb.run(&["validate", name]);
        assert_eq!(
            (v.code, v.stderr.trim_end()),
            (2, expected.trim_end()),
            "validate {name}"
        );
    }
    assert!(!sb.p("out").exists(), "a step ran");
    assert!(!sb.p("state").exists(), "a journal was written");
}

#[test]
fn call_cycle_is_reported_where_it_closes() {
    let sb = Sandbox::new();
    sb.write(
        "runbooks/ops/a.yaml",
        "version: 1\nsteps:\n  - id: call-b\n    action: runbook\n    with: {name: ops/b}\n",
    );
    sb.write(
        "runbooks/ops/b.yaml",
        "version: 1\nsteps:\n  - id: call-a\n    action: runbook\n    with: {name: ops/a}\n",
    );
    let r = sb.run(&["validate", "ops/a"]);
    assert_eq!(r.code, 2);
    assert_eq!(
        r.stderr,
        "runbooks/ops/a.yaml:5:18: error: called runbook `ops/b` is invalid (see below) (step `call-b`, field `steps[0].with.name`)
 5 |     with: {name: ops/b}
   |                  ^

runbooks/ops/b.yaml:5:18: error: call cycle: ops/a -> ops/b -> ops/a (step `call-a`, field `steps[0].with.name`)
 5 |     with: {name: ops/a}
   |                  ^

"
    );
}

#[test]
fn an_unknown_param_of_a_called_runbook_is_reported_at_its_own_key() {
    let sb = Sandbox::new();
    sb.write(
        "runbooks/ops/child.yaml",
        "version: 1\nparams:\n  keep: {type: int, default: 1}\nsteps:\n  - id: a\n    action: assert\n    with: {that: keep > 0}\n",
    );
    sb.write(
        "runbooks/ops/parent.yaml",
        "version: 1\nsteps:\n  - id: call\n    action: runbook\n    with:\n      name: ops/child\n      params:\n        kep: 2\n",
    );
    let r = sb.run(&["validate", "ops/parent"]);
    assert_eq!(r.code, 2);
    assert_eq!(
        r.stderr,
        "runbooks/ops/parent.yaml:8:9: error: runbook `ops/child` has no param `kep` (step `call`, field `steps[0].with.params.kep`)
 8 |         kep: 2
   |         ^
help: did you mean `keep`?

"
    );
}

#[test]
fn errors_as_json_carry_the_same_positions() {
    let sb = Sandbox::new();
    sb.write(
        "runbooks/bad.yaml",
        CASES[3].1.replace("unknown-action", "bad").as_str(),
    );
    let r = sb.run(&["validate", "bad", "--format", "json"]);
    assert_eq!(r.code, 2);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let d = &v[0]["diagnostics"][0];
    assert_eq!(d["file"], "runbooks/bad.yaml");
    assert_eq!(
        (d["line"].as_u64(), d["column"].as_u64()),
        (Some(4), Some(13))
    );
    assert_eq!(d["step"], "make");
    assert_eq!(d["field"], "steps[0].action");
    assert_eq!(d["hint"], "did you mean `mkdir`?");
}

#[test]
fn bad_params_are_invalid_input_with_what_to_do() {
    let sb = Sandbox::new();
    sb.write(
        "runbooks/p.yaml",
        "version: 1\nparams:\n  stamp: {type: string, required: true, pattern: '[0-9]{8}T[0-9]{6}Z', description: Snapshot to use.}\n  keep: {type: int, default: 3}\nsteps:\n  - id: a\n    action: assert\n    with: {that: keep > 0}\n",
    );
    let r = sb.run(&["plan", "p"]);
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (
            2,
            "error: missing required param:\n  stamp (string): Snapshot to use.\ngive them with --set NAME=VALUE or in a --vars FILE\n"
        )
    );
    let r = sb.run(&["plan", "p", "--set", "stamp=yesterday"]);
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (
            2,
            "error: param `stamp`: `yesterday` does not match the pattern `^(?:[0-9]{8}T[0-9]{6}Z)$`\n"
        )
    );
    let r = sb.run(&[
        "plan",
        "p",
        "--set",
        "stamp=20260407T060000Z",
        "--set",
        "kep=2",
    ]);
    assert_eq!(r.code, 2);
    assert_eq!(
        r.stderr,
        "error: `--set kep`: the runbook has no param `kep` (did you mean `keep`?); its params: stamp, keep\n"
    );
    let r = sb.run(&[
        "plan",
        "p",
        "--set",
        "stamp=20260407T060000Z",
        "--set",
        "keep=three",
    ]);
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (2, "error: param `keep` is an int, not \"three\"\n")
    );
    let r = sb.run(&["plan", "nope"]);
    assert_eq!(r.code, 2);
    assert_eq!(
        r.stderr,
        "error: no runbook named `nope` (looked in runbooks); `runbook list` shows the runbooks there\n"
    );
}

#[test]
fn a_printing_command_whose_reader_goes_away_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let sb = Sandbox::new();
    // `runbook schema | true`: the reader is gone before the schema is written.
    let mut child = sb
        .cmd(&["schema"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "", "no panic message");
}
