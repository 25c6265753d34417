//! Adversarial cases: processes (see mod.rs).
