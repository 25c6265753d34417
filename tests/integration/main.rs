//! Integration tests: the built binary against real files, processes and SQLite.

mod support;

mod dry_run;
mod errors;
mod journal;
mod schema;
mod sqlite;
