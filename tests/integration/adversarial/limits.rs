//! Adversarial cases: limits (see mod.rs). Sizes no runbook needs must be refused with
//! a message that names the value, never abort the process or take forever.

use crate::support::{Sandbox, tree_digest};

/// A runbook of `n` steps: a mkdir, then a write-file that reads its outputs, so every
/// step has templates and step references to check.
fn many_steps(n: usize) -> String {
    let mut text = String::from(
        "version: 1\nparams:\n  base: {type: path, default: out}\nroots: [\"{{ base }}\"]\nsteps:\n",
    );
    for i in (0..n).step_by(2) {
        text.push_str(&format!(
            "  - id: make{i}\n    action: mkdir\n    with: {{path: \"{{{{ base }}}}/d{i}\"}}\n  - id: note{i}\n    action: write-file\n    with: {{path: \"{{{{ steps.make{i}.outputs.path }}}}/note\", content: \"step {i}\"}}\n"
        ));
    }
    text
}

#[test]
fn a_hundred_thousand_step_runbook_validates() {
    // No timing here (benches/validate-scale.sh measures): a quadratic validate took
    // 14 s for 8,000 steps and never finished this one; the suite's timeout guards.
    let sb = Sandbox::new();
    sb.write("runbooks/huge.yaml", &many_steps(100_000));
    let r = sb.run(&["validate", "huge"]);
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (0, "ok  huge (runbooks/huge.yaml)\n"),
        "{r:?}"
    );
}

#[test]
fn errors_in_a_large_runbook_each_name_their_own_line() {
    // Every error looks up its line; with one scan of the file per error this was
    // quadratic too. The last one must still point at its own line.
    let sb = Sandbox::new();
    let mut text = String::from("version: 1\nsteps:\n");
    for i in 0..20_000 {
        text.push_str(&format!(
            "  - id: s{i}\n    action: mkdir\n    with: {{path: \"{{{{ nope{i} }}}}\"}}\n"
        ));
    }
    sb.write("runbooks/bad.yaml", &text);
    let r = sb.run(&["validate", "bad"]);
    assert_eq!(r.code, 2);
    assert_eq!(
        r.stderr.matches(": error: undefined variable").count(),
        20_000
    );
    let last_line = 2 + 20_000 * 3;
    assert!(
        r.stderr.contains(&format!(
            "runbooks/bad.yaml:{last_line}:22: error: undefined variable `nope19999` (step `s19999`, field `steps[19999].with.path`)\n {last_line} |     with: {{path: \"{{{{ nope19999 }}}}\"}}\n"
        )),
        "{}",
        &r.stderr[r.stderr.len().saturating_sub(600)..]
    );
}

/// `v0` is 32 bytes and every var doubles the one before it: `v20` would be 32 MiB.
fn doubling_vars(last: usize) -> String {
    let mut text = String::from(
        "version: 1\nparams:\n  x: {type: string, default: 0123456789abcdef}\nvars:\n  v0: \"{{ x ~ x }}\"\n",
    );
    for i in 1..=last {
        text.push_str(&format!("  v{i}: \"{{{{ v{p} ~ v{p} }}}}\"\n", p = i - 1));
    }
    text
}

#[test]
fn vars_that_double_each_other_stop_at_the_size_limit_before_anything_is_written() {
    let sb = Sandbox::new();
    let mut text = doubling_vars(29);
    text.push_str(
        "steps:\n  - id: w\n    action: write-file\n    with: {path: out.txt, content: \"{{ v29 }}\"}\n",
    );
    sb.write("runbooks/grow.yaml", &text);
    let before = tree_digest(sb.path());
    for cmd in ["plan", "run"] {
        let r = sb.run(&[cmd, "grow"]);
        assert_eq!(
            (r.code, r.stderr.as_str()),
            (
                2,
                "error: var `v20`: it renders to more than 16 MiB (33554432 bytes), the limit of one rendered value\n"
            ),
            "{cmd}: {r:?}"
        );
    }
    assert_eq!(tree_digest(sb.path()), before, "something was written");
}

#[test]
fn a_step_argument_over_the_size_limit_is_refused_by_the_plan() {
    let sb = Sandbox::new();
    // v18 is 8 MiB: a var of its own is fine, the content made of three is not.
    let mut text = doubling_vars(18);
    text.push_str(
        "steps:\n  - id: w\n    action: write-file\n    with: {path: out.txt, content: \"{{ v18 ~ v18 ~ v18 }}\"}\n",
    );
    sb.write("runbooks/wide.yaml", &text);
    let before = tree_digest(sb.path());
    let r = sb.run(&["run", "wide"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        r.stderr.starts_with(
            "error: refusing to run `wide`: step `w` would fail: `content`: it renders to more than 16 MiB (25165824 bytes), the limit of one rendered value\n"
        ),
        "{r:?}"
    );
    assert_eq!(tree_digest(sb.path()), before, "something was written");
}

#[test]
fn a_template_that_works_without_end_runs_out_of_fuel() {
    let sb = Sandbox::new();
    sb.write(
        "runbooks/spin.yaml",
        "version: 1\nsteps:\n  - id: w\n    action: write-file\n    with: {path: out.txt, content: \"{% for i in range(100000) %}{% for j in range(100000) %}.{% endfor %}{% endfor %}\"}\n",
    );
    let r = sb.run(&["plan", "spin"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        r.stdout.contains(
            "would fail  w  write-file: `content`: the template does more work than one rendering may (2000000 steps, or about 128 MB of data it builds)\n"
        ),
        "{r:?}"
    );
    sb.write(
        "runbooks/spin-var.yaml",
        "version: 1\nvars:\n  dots: \"{% for i in range(100000) %}{% for j in range(100000) %}.{% endfor %}{% endfor %}\"\nsteps:\n  - id: w\n    action: write-file\n    with: {path: out.txt, content: \"{{ dots }}\"}\n",
    );
    let r = sb.run(&["run", "spin-var"]);
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (
            2,
            "error: var `dots`: the template does more work than one rendering may (2000000 steps, or about 128 MB of data it builds)\n"
        ),
        "{r:?}"
    );
    assert!(!sb.p("out.txt").exists() && !sb.p("state").exists());
}

#[test]
fn write_file_content_is_journaled_once() {
    let sb = Sandbox::new();
    // 64 KiB of distinct lines, rendered from a var (frozen in the journal).
    sb.write(
        "runbooks/big.yaml",
        "version: 1\nvars:\n  body: \"{% for i in range(4000) %}line {{ '%012d' | format(i) }}\\n{% endfor %}\"\nsteps:\n  - id: w\n    action: write-file\n    with: {path: out.txt, content: \"{{ body }}\"}\n",
    );
    let r = sb.run(&["run", "big"]);
    assert_eq!(r.code, 0, "{r:?}");
    let content = sb.read("out.txt");
    assert!(content.len() > 64_000, "{}", content.len());
    let marker = "line 000000003999";
    let db = rusqlite::Connection::open(sb.p("state/journal.db")).unwrap();
    let mut copies = 0;
    for (table, column) in [
        ("runs", "vars"),
        ("runs", "params"),
        ("run_files", "content"),
        ("steps", "args"),
        ("steps", "outputs"),
        ("frames", "vars"),
    ] {
        let mut stmt = db
            .prepare(&format!("SELECT {column} FROM {table}"))
            .unwrap();
        let rows: Vec<Option<String>> = stmt
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        copies += rows
            .iter()
            .flatten()
            .filter(|text| text.contains(marker))
            .count();
    }
    assert_eq!(
        copies, 1,
        "the content should be journaled once (the frozen var)"
    );
    let args: String = db
        .query_row("SELECT args FROM steps WHERE key = 'w'", [], |r| r.get(0))
        .unwrap();
    let args: serde_json::Value = serde_json::from_str(&args).unwrap();
    use sha2::Digest;
    assert_eq!(
        args["content"],
        serde_json::json!({
            "bytes": content.len(),
            "sha256": runbook::actions::files::hex(&sha2::Sha256::digest(content.as_bytes())),
        })
    );
}

/// A read-only tmpfs mounted on a directory (root writes through mode bits, not
/// through a read-only mount), unmounted when dropped.
struct ReadOnlyMount(std::path::PathBuf);

impl ReadOnlyMount {
    fn at(dir: &std::path::Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mount -t tmpfs -o ro failed (these tests run as root)"
        );
        ReadOnlyMount(dir.to_path_buf())
    }
}

impl Drop for ReadOnlyMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn an_unusable_state_dir_is_exit_4_for_every_command_that_uses_it() {
    let sb = Sandbox::new();
    sb.write(
        "runbooks/ok.yaml",
        "version: 1\nsteps:\n  - id: a\n    action: assert\n    with: {that: \"true\"}\nrollback:\n  - id: r\n    action: assert\n    with: {that: \"true\"}\n",
    );
    sb.write("state-file", "not a directory\n");
    sb.write(
        "bad-journal/journal.db",
        "this is not a SQLite database, only text\n",
    );
    let _ro = ReadOnlyMount::at(&sb.p("read-only"));
    let root = sb.path().display().to_string();
    let cases = [
        (
            "state-file",
            format!(
                "error: state dir {root}/state-file is not a directory; fix it, or choose another state dir (--state-dir DIR or RUNBOOK_STATE_DIR)\n"
            ),
        ),
        (
            "read-only",
            format!(
                "error: state dir {root}/read-only is not writable (Read-only file system (os error 30)); fix it, or choose another state dir (--state-dir DIR or RUNBOOK_STATE_DIR)\n"
            ),
        ),
        (
            "bad-journal",
            format!(
                "error: journal {root}/bad-journal/journal.db cannot be opened: file is not a database; if it is damaged or not a runbook journal, move it aside, or choose another state dir (--state-dir DIR or RUNBOOK_STATE_DIR)\n"
            ),
        ),
    ];
    let commands: [&[&str]; 5] = [
        &["run", "ok"],
        &["resume", "20260101T000000Z-abcdef"],
        &["rollback", "20260101T000000Z-abcdef"],
        &["runs"],
        &["show", "20260101T000000Z-abcdef"],
    ];
    for (dir, expected) in &cases {
        let state = sb.p(dir);
        for args in commands {
            let r = sb
                .cmd(args)
                .env("RUNBOOK_STATE_DIR", &state)
                .output()
                .unwrap();
            let r = crate::support::Run::from(r);
            assert_eq!(
                (r.code, r.stderr.as_str()),
                (4, expected.as_str()),
                "{dir}: {args:?}: {r:?}"
            );
        }
        // The dry-run writes nothing and needs no state dir: it still plans.
        let r = crate::support::Run::from(
            sb.cmd(&["plan", "ok"])
                .env("RUNBOOK_STATE_DIR", &state)
                .output()
                .unwrap(),
        );
        assert_eq!(r.code, 0, "{dir}: plan: {r:?}");
    }
    assert_eq!(sb.read("state-file"), "not a directory\n");
    assert_eq!(
        sb.read("bad-journal/journal.db"),
        "this is not a SQLite database, only text\n"
    );
}

#[test]
fn debug_logs_are_coloured_only_on_a_terminal_and_never_with_no_color() {
    let sb = Sandbox::new();
    sb.write(
        "runbooks/ok.yaml",
        "version: 1\nsteps:\n  - id: a\n    action: assert\n    with: {that: \"true\"}\n",
    );
    // A pipe: plain text.
    let r = sb.run(&["-vv", "run", "ok"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains("DEBUG run starting"), "{r:?}");
    assert!(
        !r.stderr.contains('\u{1b}'),
        "escape codes in a pipe: {r:?}"
    );
    // A real terminal (script(1) gives the program a pty): colour, unless NO_COLOR.
    let bin = env!("CARGO_BIN_EXE_runbook");
    let on_tty = |no_color: &str| {
        let out = std::process::Command::new("script")
            .args([
                "-qec",
                &format!("env {no_color} {bin} -vv run ok"),
                "/dev/null",
            ])
            .current_dir(sb.path())
            .env("RUNBOOK_STATE_DIR", sb.p("state"))
            .env_remove("NO_COLOR")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run script");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let coloured = on_tty("");
    assert!(coloured.contains("run starting"), "{coloured}");
    assert!(
        coloured.contains("\u{1b}["),
        "no colour on a terminal: {coloured}"
    );
    let plain = on_tty("NO_COLOR=1");
    assert!(plain.contains("DEBUG run starting"), "{plain}");
    assert!(
        !plain.contains('\u{1b}'),
        "colour despite NO_COLOR: {plain}"
    );
}

#[test]
fn quiet_run_of_a_refused_plan_prints_only_the_refusal() {
    let sb = Sandbox::new();
    sb.write(
        "runbooks/refused.yaml",
        "version: 1\nsteps:\n  - id: one\n    action: mkdir\n    with: {path: out/a}\n  - id: two\n    action: path-check\n    with: {path: \"{root}/missing\"}\n",
    );
    let r = sb.run(&["-q", "run", "refused"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert_eq!(r.stdout, "", "-q printed the plan: {r:?}");
    // Two lines: which step would fail and why, and what to do. (The reason is the
    // action's own text, checked elsewhere.)
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{r:?}");
    assert!(
        lines[0].starts_with("error: refusing to run `refused`: step `two` would fail: ")
            && lines[0].contains("missing"),
        "{r:?}"
    );
    assert_eq!(
        lines[1],
        "nothing was changed; fix the cause and run again (`runbook plan` shows the whole plan)"
    );
    // Without -q the whole plan is shown, as before.
    let r = sb.run(&["run", "refused"]);
    assert!(r.stdout.starts_with("plan refused ("), "{r:?}");
}
