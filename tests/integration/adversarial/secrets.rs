//! Adversarial cases: secrets (see mod.rs).
