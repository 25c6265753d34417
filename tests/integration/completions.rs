//! `runbook completions SHELL` and `runbook man`: generated from the clap definitions,
//! checked by running them (bash for real, the completion protocol for the others,
//! `man -l` for the page).

use std::process::{Command, Stdio};

const RUNBOOK: &str = env!("CARGO_BIN_EXE_runbook");
const RUNBOOKS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/runbooks");
const SUBCOMMANDS: [&str; 12] = [
    "list",
    "validate",
    "plan",
    "run",
    "resume",
    "rollback",
    "runs",
    "show",
    "schema",
    "drill",
    "completions",
    "man",
];

fn stdout(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// What bash's completion offers for the words typed so far (the last one being
/// completed), with the script `runbook completions bash` printed loaded.
fn bash_completes(words: &[&str]) -> Vec<String> {
    let script = stdout(Command::new(RUNBOOK).args(["completions", "bash"]));
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let program = format!(
        "{script}\nCOMP_WORDS=({}); COMP_CWORD={}; COMP_TYPE=9\n_clap_complete_runbook runbook '{}' '{}'\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n",
        quoted.join(" "),
        words.len() - 1,
        words[words.len() - 1],
        words[words.len().saturating_sub(2)],
    );
    let out = stdout(
        Command::new("bash")
            .args(["--norc", "--noprofile", "-c", &program])
            .env("RUNBOOK_PATH", RUNBOOKS),
    );
    out.split(['\n', '\u{b}'])
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

#[test]
fn bash_completes_every_subcommand_and_the_names_of_runbooks() {
    let offered = bash_completes(&["runbook", ""]);
    for sub in SUBCOMMANDS {
        assert!(
            offered.iter().any(|o| o == sub),
            "no `{sub}` in {offered:?}"
        );
    }
    assert_eq!(
        bash_completes(&["runbook", "run", "atocore/re"]),
        [
            "atocore/recover",
            "atocore/restore",
            "atocore/restore-must-roll-back",
            "atocore/retention"
        ]
    );
    assert_eq!(
        bash_completes(&["runbook", "plan", "atocore/offsite-l"]),
        ["atocore/offsite-list"]
    );
    assert_eq!(
        bash_completes(&["runbook", "runs", "--status", "f"]),
        ["failed"]
    );
}

#[test]
fn zsh_and_fish_scripts_come_out_and_answer_through_the_same_protocol() {
    for shell in ["zsh", "fish"] {
        let script = stdout(Command::new(RUNBOOK).args(["completions", shell]));
        assert!(
            script.contains("RUNBOOK_COMPLETE") && script.contains(RUNBOOK),
            "{shell}: {script}"
        );
    }
    // What the fish script runs: every subcommand, with its help.
    let answer = stdout(
        Command::new(RUNBOOK)
            .args(["--", "runbook", ""])
            .env("RUNBOOK_COMPLETE", "fish"),
    );
    for sub in SUBCOMMANDS {
        assert!(
            answer.lines().any(|l| l.starts_with(&format!("{sub}\t"))),
            "no `{sub}` in {answer}"
        );
    }
    // And zsh's: runbook names.
    let answer = stdout(
        Command::new(RUNBOOK)
            .args(["--", "runbook", "plan", "atocore/ba"])
            .env("RUNBOOK_COMPLETE", "zsh")
            .env("_CLAP_COMPLETE_INDEX", "2")
            .env("RUNBOOK_PATH", RUNBOOKS),
    );
    assert_eq!(answer.trim_end(), "atocore/backup");
}

#[test]
fn the_man_page_renders_and_documents_every_subcommand() {
    let page = stdout(Command::new(RUNBOOK).arg("man"));
    assert!(page.contains(".TH runbook 1"), "{page}");
    for sub in SUBCOMMANDS {
        assert!(
            page.contains(&format!(".SH \"RUNBOOK {}\"", sub.to_uppercase())),
            "no section for {sub}"
        );
    }
    // man(1) formats it, with the examples and the exit codes of --help.
    let mut man = Command::new("man")
        .args(["-l", "-"])
        .env("MANWIDTH", "100")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    man.stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    let out = man.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    // Off a terminal, man overstrikes bold and underline ("N\x08N"): undo it.
    let mut text = String::new();
    for c in String::from_utf8_lossy(&out.stdout).chars() {
        if c == '\u{8}' {
            text.pop();
        } else {
            text.push(c);
        }
    }
    for needle in [
        "RUNBOOK RUN",
        "--dry-run",
        "Exit codes: 0 success, 1 a step failed, 2 invalid input, 3 refused",
        "runbook drill",
    ] {
        assert!(
            text.contains(needle),
            "no `{needle}` in the formatted page:\n{text}"
        );
    }
}
