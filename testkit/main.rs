//! `runbook-testkit`: programs the tests, benchmarks and the drill sandbox use as the
//! real counterparts of what runbooks act on (a database writer, the stand-in AtoCore
//! service, ...). Not part of the engine: `runbook` never calls it.
//!
//! Usage: runbook-testkit <program> [args...]; each program documents its own args.

mod container;

use std::process::ExitCode;

mod age_keygen;
mod atocore;
mod atocore_damage;
mod atocore_sandbox;
mod atocore_standin;
mod http;
mod http_serve;
mod offsite_host;
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
        "age-keygen" => age_keygen::main(rest),
        "atocore-damage" => atocore_damage::main(rest),
        "atocore-sandbox" => atocore_sandbox::main(rest),
        "atocore-standin" => atocore_standin::main(rest),
        "http-serve" => http_serve::main(rest),
        "offsite-host" => offsite_host::main(rest),
        "sqlite-writer" => sqlite_writer::main(rest),
        "version" => {
            println!("runbook-testkit {}", env!("CARGO_PKG_VERSION"));
            let _ = rest;
            Ok(())
        }
        "health-serve" => container::serve(rest),
        "health-check" => container::check(rest),
        "wait-file" => container::wait_file(rest),
        "print-env" => container::print_env(rest),
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
const PROGRAMS: &[&str] = &[
    "version",
    "http-serve",
    "health-serve",
    "health-check",
    "wait-file",
    "print-env",
    "atocore-sandbox",
    "atocore-standin",
    "atocore-damage",
    "sqlite-writer",
    "offsite-host",
    "age-keygen",
];
