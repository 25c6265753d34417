//! Command-line definitions. `run()` parses, dispatches to `app`, and returns the
//! exit code; `main.rs` only calls it.

use std::path::PathBuf;

use clap::{Args, CommandFactory, Parser, Subcommand};
use clap_complete::engine::{ArgValueCompleter, CompletionCandidate};

use crate::render::Format;

const AFTER_HELP: &str = "\
Examples:
  runbook list                                   named runbooks on the search path
  runbook validate                               check every runbook; nothing runs
  runbook plan atocore/backup --vars env/sandbox.yaml
                                                 dry-run: what each step would do
  runbook run atocore/restore --set stamp=20260407T060000Z --vars env/dalidou.yaml
  runbook runs                                   history, newest first
  runbook resume RUN_ID                          continue an interrupted or failed run
  runbook drill                                  the whole AtoCore backup/restore drill on a sandbox

Exit codes: 0 success, 1 a step failed, 2 invalid input, 3 refused (a step would
fail, lock held, runbook changed, step needs checking), 4 internal error.";

/// Declarative runbooks: check them, dry-run them, run them with a durable journal.
#[derive(Debug, Parser)]
#[command(name = "runbook", version, about, after_help = AFTER_HELP)]
pub struct Cli {
    /// Directory holding named runbooks (repeatable). `atocore/backup` is
    /// `DIR/atocore/backup.yaml`.
    #[arg(
        long = "path",
        global = true,
        env = "RUNBOOK_PATH",
        value_name = "DIR",
        value_delimiter = ':',
        default_value = "runbooks"
    )]
    pub path: Vec<PathBuf>,
    /// Where the journal and locks live [default: $XDG_STATE_HOME/runbook or ~/.local/state/runbook].
    #[arg(long, global = true, env = "RUNBOOK_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub format: Format,
    /// More output: step starts, then debug logs on stderr (-vv).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Less output: only the run id and the result.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// `plan` and `run --dry-run` only: send the GET requests of `http` steps and report
    /// their status (other methods are never sent by a dry-run).
    #[arg(long, global = true)]
    pub probe: bool,
    /// Refuse (exit 3) unless the runbook's files have this digest (the fleet
    /// controller's check that a host runs the files it sent).
    #[arg(long, global = true, hide = true, value_name = "SHA256")]
    pub expect_digest: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args, Clone)]
pub struct Inputs {
    /// A YAML file of param values (deployment paths, URLs, owners). Repeatable; later
    /// files win. Keys the runbook does not declare are ignored. `-` reads one from
    /// standard input (for secrets: stdin is not visible in `ps`).
    #[arg(long = "vars", value_name = "FILE")]
    pub vars: Vec<PathBuf>,
    /// Set one param (repeatable); wins over --vars.
    #[arg(long = "set", value_name = "NAME=VALUE")]
    pub set: Vec<String>,
    /// Answer every `confirm` step yes (for CI and scripts).
    #[arg(long)]
    pub yes: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List the named runbooks on the search path.
    List,
    /// Check runbook files (all on the search path when none is named). Nothing runs.
    Validate {
        /// Runbook names or files.
        targets: Vec<String>,
    },
    /// Dry-run: render every value and judge every step read-only. Writes nothing.
    Plan {
        /// Runbook name or file.
        #[arg(add = ArgValueCompleter::new(complete_runbook_name))]
        name: String,
        #[command(flatten)]
        inputs: Inputs,
    },
    /// Run a runbook (after a dry-run that must pass).
    Run {
        /// Runbook name or file.
        #[arg(add = ArgValueCompleter::new(complete_runbook_name))]
        name: String,
        #[command(flatten)]
        inputs: Inputs,
        /// Only plan; the same as `runbook plan`.
        #[arg(long)]
        dry_run: bool,
        /// Do not run the rollback section when a step fails.
        #[arg(long)]
        no_rollback: bool,
        /// The run's id, chosen by the fleet controller so that it is on record before
        /// the run starts.
        #[arg(long, hide = true, value_name = "ID", value_parser = parse_run_id)]
        run_id: Option<String>,
    },
    /// Continue a failed or interrupted run with its frozen values.
    Resume {
        run_id: String,
        /// Secret params must be given again (they are never stored).
        #[command(flatten)]
        inputs: Inputs,
        /// Run this interrupted step again although it is not idempotent (after checking
        /// that it did not take effect). Repeatable.
        #[arg(long, value_name = "STEP")]
        retry_step: Vec<String>,
        /// Resume even though the runbook files changed since the run started.
        #[arg(long)]
        accept_changes: bool,
        /// Do not run the rollback section when a step fails.
        #[arg(long)]
        no_rollback: bool,
    },
    /// Run the rollback section of an earlier run, with its frozen values and outputs.
    Rollback {
        run_id: String,
        #[command(flatten)]
        inputs: Inputs,
        /// Roll back even though the runbook files changed since the run started.
        #[arg(long)]
        accept_changes: bool,
        /// Run the rollback section again although the run was already rolled back
        /// (refused without it).
        #[arg(long)]
        again: bool,
    },
    /// The journal's runs, newest first. Filters answer "did last night's backup
    /// work?": `runbook runs --runbook atocore/backup --since 24h --format json`, or
    /// `--status failed --since 24h` for what failed in the last day.
    Runs {
        /// Only runs in this state.
        #[arg(long, value_enum, value_name = "STATUS")]
        status: Option<RunStatusArg>,
        /// Only runs started within this long before now: a number and a unit, `s`, `m`,
        /// `h` or `d` (`30m`, `24h`, `7d`).
        #[arg(long, value_name = "DURATION", value_parser = parse_since)]
        since: Option<chrono::Duration>,
        /// Only runs of this runbook (`atocore/backup`).
        #[arg(long, value_name = "NAME")]
        runbook: Option<String>,
    },
    /// One run's journal, step by step.
    Show { run_id: String },
    /// Print the JSON Schema of the runbook format.
    Schema,
    /// The AtoCore restore drill on a sandbox it builds: backup, list, validate, damage,
    /// restore, verify, a forced failed restore that rolls back, the scratch-instance
    /// drill and a retention dry-run. Prints each stage and the time to restore.
    Drill {
        /// Leave the sandbox (data, journal, service log) for inspection.
        #[arg(long)]
        keep: bool,
        /// Build the sandbox here (default: a new directory under the temp dir).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Values for the cycle's params (`atocore/drill-cycle`), after the sandbox's
        /// own vars file, e.g. `--set damage_kind=corrupt-db`.
        #[command(flatten)]
        inputs: Inputs,
    },
    /// Print a shell completion script: `runbook completions bash >
    /// /etc/bash_completion.d/runbook` (zsh: a file in $fpath; fish:
    /// ~/.config/fish/completions/runbook.fish). It completes subcommands, options and
    /// the names of runbooks (`runbook run atocore/<TAB>`) from RUNBOOK_PATH or ./runbooks.
    Completions {
        #[arg(value_enum)]
        shell: CompletionShell,
    },
    /// The same runbook on many hosts over SSH: `fleet plan`, `fleet run`, `fleet runs`,
    /// `fleet show`, `fleet resume`. Each host keeps its own journal; see `runbook fleet
    /// --help`.
    Fleet {
        #[command(subcommand)]
        command: crate::fleet::cli::FleetCommand,
    },
    /// Print the manual page (roff): `runbook man > /usr/local/share/man/man1/runbook.1`.
    Man,
}

/// The shells `runbook completions` writes for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

/// The environment variable the completion scripts set when they ask this program for
/// candidates (clap's dynamic completion protocol).
const COMPLETE_VAR: &str = "RUNBOOK_COMPLETE";

/// The names of the runbooks on the search path (`RUNBOOK_PATH`, else `./runbooks`)
/// that start with what was typed. A shell cannot know `--path` yet, so the variable
/// and the default are what it looks at.
fn complete_runbook_name(current: &std::ffi::OsStr) -> Vec<CompletionCandidate> {
    let Some(typed) = current.to_str() else {
        return Vec::new();
    };
    let search_path = match std::env::var_os("RUNBOOK_PATH") {
        Some(p) => std::env::split_paths(&p).collect(),
        None => vec![PathBuf::from("runbooks")],
    };
    crate::catalog::Catalog { search_path }
        .list()
        .into_iter()
        .filter(|l| l.name.starts_with(typed))
        .map(|l| CompletionCandidate::new(l.name))
        .collect()
}

/// `runbook completions SHELL`: the script that registers this program's completion.
pub fn write_completions(
    shell: CompletionShell,
    out: &mut dyn std::io::Write,
) -> std::io::Result<()> {
    let name = match shell {
        CompletionShell::Bash => "bash",
        CompletionShell::Zsh => "zsh",
        CompletionShell::Fish => "fish",
    };
    let completer = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "runbook".into());
    let shells = clap_complete::env::Shells::builtins();
    let script = shells
        .completer(name)
        .ok_or_else(|| std::io::Error::other(format!("no completer for {name}")))?;
    script.write_registration(COMPLETE_VAR, "runbook", "runbook", &completer, out)
}

/// `runbook man`: one manual page, from the same definitions as `--help`: the global
/// options, then every subcommand with its synopsis and options (no separate
/// `runbook-run(1)` pages to install), then the examples and exit codes.
pub fn write_man(out: &mut dyn std::io::Write) -> std::io::Result<()> {
    let mut cmd = Cli::command();
    cmd.build();
    let man = clap_mangen::Man::new(cmd.clone());
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    man.render_options_section(out)?;
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        writeln!(out, ".SH \"RUNBOOK {}\"", sub.get_name().to_uppercase())?;
        let page = clap_mangen::Man::new(sub.clone());
        page.render_synopsis_section(out)?;
        page.render_description_section(out)?;
        if sub.get_arguments().any(|a| !a.is_hide_set()) {
            page.render_options_section(out)?;
        }
    }
    man.render_extra_section(out)?;
    man.render_version_section(out)
}

pub fn run() -> i32 {
    // A completion script asking for candidates: answer and exit.
    clap_complete::CompleteEnv::with_factory(Cli::command)
        .var(COMPLETE_VAR)
        .complete();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                _ => crate::exit::Exit::Invalid.code(),
            };
        }
    };
    if matches!(
        cli.command,
        Command::List
            | Command::Validate { .. }
            | Command::Plan { .. }
            | Command::Runs { .. }
            | Command::Show { .. }
            | Command::Schema
            | Command::Completions { .. }
            | Command::Man
            | Command::Fleet {
                command: crate::fleet::cli::FleetCommand::Runs
                    | crate::fleet::cli::FleetCommand::Show { .. }
            }
    ) {
        // Commands that only print end quietly when their reader goes away
        // (`runbook plan --format json | head`), as `cat` does, instead of panicking on
        // EPIPE. A run keeps ignoring SIGPIPE: a closed stdout must not kill it
        // mid-step (its reporter drops what it cannot write).
        // SAFETY: sets a signal disposition before any thread is started.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    init_logging(cli.verbose);
    crate::app::dispatch(&cli).code()
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 | 1 => tracing::Level::WARN,
        2 => tracing::Level::DEBUG,
        _ => tracing::Level::TRACE,
    };
    // Colour only for a person at a terminal, and never when NO_COLOR is set
    // (no-color.org): escape codes in a log file or a CI capture are noise.
    use std::io::IsTerminal;
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(colour)
        .with_writer(|| RedactedStderr)
        .with_target(false)
        .try_init();
}

/// Log lines go to stderr with every secret the process has seen masked: the debug logs
/// of libraries (the HTTP client's, say) see URLs and headers. Each event is written
/// whole in one call, so a secret is never split across two writes.
struct RedactedStderr;

impl std::io::Write for RedactedStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = crate::redact::mask_for_logs(&String::from_utf8_lossy(buf));
        std::io::stderr().write_all(text.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// A run's state, as `runbook runs --status` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RunStatusArg {
    Running,
    Succeeded,
    Failed,
    Interrupted,
    RolledBack,
}

impl RunStatusArg {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatusArg::Running => "running",
            RunStatusArg::Succeeded => "succeeded",
            RunStatusArg::Failed => "failed",
            RunStatusArg::Interrupted => "interrupted",
            RunStatusArg::RolledBack => "rolled-back",
        }
    }
}

/// `30m`, `24h`, `7d`, `90s`: how far back `runbook runs --since` looks (the engine's
/// duration syntax, as for a step's `timeout`), at most a century.
fn parse_since(text: &str) -> Result<chrono::Duration, String> {
    crate::actions::parse_duration(text)
        .ok()
        .filter(|d| d.as_secs() <= 100 * 365 * 86_400)
        .and_then(|d| chrono::Duration::from_std(d).ok())
        .ok_or_else(|| {
            format!("`{text}` is not a duration: give a number and s, m, h or d (24h, 7d)")
        })
}

/// A run id as `new_run_id` makes them (`20261203T081500Z-1a2b3c`): letters, digits
/// and `-` only, since it names journal rows and lock holders.
pub fn parse_run_id(text: &str) -> Result<String, String> {
    let ok = !text.is_empty()
        && text.len() <= 64
        && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if ok {
        Ok(text.to_string())
    } else {
        Err(format!(
            "`{text}` is not a run id (letters, digits and `-`, at most 64)"
        ))
    }
}
