//! `runbook-testkit`: programs the tests, benchmarks and the drill sandbox use as the
//! real counterparts of what runbooks act on (a database writer, the stand-in AtoCore
//! service, ...). Not part of the engine: `runbook` never calls it.
//!
//! Usage: runbook-testkit <program> [args...]; each program documents its own args.

use std::process::ExitCode;

mod sqlite_writer;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((program, rest)) = args.split_first() else {
        eprintln!(
            "usage: runbook-testkit <program> [args...]\nprograms: {}",
            PROGRAMS.join(", ")
        );
        return ExitCode::from(2);
    };
    let result: Result<(), String> = match program.as_str() {
        // One line per program: "name" => module::main(rest),
        "sqlite-writer" => sqlite_writer::main(rest),
        "version" => {
            println!("runbook-testkit {}", env!("CARGO_PKG_VERSION"));
            let _ = rest;
            Ok(())
        }
        other => Err(format!(
            "unknown program `{other}`; programs: {}",
            PROGRAMS.join(", ")
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("runbook-testkit {program}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The programs above, for the usage message.
const PROGRAMS: &[&str] = &["sqlite-writer", "version"];
