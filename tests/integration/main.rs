//! Integration tests: the built binary against real files, processes and SQLite.

mod support;

mod adversarial;
mod atocore;
mod atocore_standin;
mod completions;
mod daemon;
mod drill;
mod dry_run;
mod errors;
mod expect_failure;
mod files;
mod fleet;
mod gates;
mod http;
mod interrupted;
mod journal;
mod json;
mod offsite;
mod offsite_attacks;
mod offsite_host;
mod retention;
mod schedule;
mod schema;
mod services;
mod sqlite;
