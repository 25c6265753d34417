//! Integration tests: the built binary against real files, processes and SQLite.

mod support;

mod dry_run;
mod errors;
mod http;
mod journal;
mod json;
mod schema;
