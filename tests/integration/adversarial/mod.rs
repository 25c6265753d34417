//! The standing adversarial suite: each module attacks one class of the engine's
//! promises ("never outside `roots`", "secrets never shown", "the plan never lies",
//! "resume always finishes", limits and exit codes) as a hostile operator would,
//! through the built binary against real files, processes and SQLite.

mod fuzz_found;
mod limits;
mod paths;
mod plan_truth;
mod processes;
mod resume;
mod secrets;
