//! Adversarial cases: resume (see mod.rs).
