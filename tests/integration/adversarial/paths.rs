//! Adversarial cases: paths (see mod.rs).
