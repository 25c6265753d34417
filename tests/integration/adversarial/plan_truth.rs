//! Adversarial cases: plan_truth (see mod.rs).
