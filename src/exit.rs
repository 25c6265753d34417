//! Every exit code of the binary, in one place (the README lists them).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Everything ran (or, for `plan`, nothing would fail).
    Success = 0,
    /// A step failed during a run (rollback may have run).
    StepFailed = 1,
    /// Invalid input: a runbook, vars file, param or command line is wrong. Nothing ran.
    Invalid = 2,
    /// Refused: a step would fail (plan/preflight), the lock is held, the runbook
    /// changed since the run began, or an interrupted step needs checking. Nothing ran
    /// (or nothing more).
    Refused = 3,
    /// The engine itself failed: the state dir or journal is unusable (a file, not
    /// writable, not a database) for any command that uses it, or an I/O error.
    Internal = 4,
}

impl Exit {
    pub fn code(self) -> i32 {
        self as i32
    }
}
