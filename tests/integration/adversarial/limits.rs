//! Adversarial cases: limits (see mod.rs).
