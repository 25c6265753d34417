//! `json-check`: a JSON file parses, and jq expressions over it hold.

use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value as Json, json};

use super::{Action, ActionCtx, ActionError, Effect, Outputs, Verdict};
use crate::jq::Jq;
use crate::world::{Node, World};

/// Check that a file is valid JSON and that jq expressions over it yield `true`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JsonCheckArgs {
    /// The JSON file to check.
    pub path: PathBuf,
    /// jq expressions over the document (e.g. `.projects | length > 0`); each must
    /// yield `true`.
    #[serde(default)]
    pub expect: Vec<String>,
    /// Named values to read out of the document: `{name: jq expression}` (each must
    /// yield exactly one value), e.g. `{include_chroma: .include_chroma}`.
    #[serde(default)]
    pub outputs: indexmap::IndexMap<String, String>,
}

pub struct JsonCheck;

/// Compiles every expression; the error names the field and the expression.
pub(crate) fn compile_all(field: &str, exprs: &[String]) -> Result<Vec<Jq>, (String, String)> {
    exprs
        .iter()
        .enumerate()
        .map(|(i, e)| {
            Jq::compile(e).map_err(|why| {
                (
                    format!("{field}[{i}]"),
                    format!("jq expression `{e}` does not parse: {why}"),
                )
            })
        })
        .collect()
}

/// Checks of expressions that are not templates (those are checked once rendered).
pub(crate) fn check_static_exprs(field: &str, exprs: &[String]) -> Result<(), (String, String)> {
    for (i, e) in exprs.iter().enumerate() {
        if !e.contains("{{") {
            Jq::compile(e).map_err(|why| {
                (
                    format!("{field}[{i}]"),
                    format!("jq expression `{e}` does not parse: {why}"),
                )
            })?;
        }
    }
    Ok(())
}

/// Parses the file; the error starts with `registry_invalid_json:` and names
/// FILE:LINE:COL.
fn parse(path: &Path) -> Result<Json, String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    serde_json::from_slice(&text).map_err(|e| {
        let full = e.to_string();
        let what = full
            .rsplit_once(" at line ")
            .map_or(full.as_str(), |(what, _)| what);
        format!(
            "registry_invalid_json: {}:{}:{}: {what}",
            path.display(),
            e.line(),
            e.column()
        )
    })
}

/// Parses and checks; returns the outputs or the first failure.
fn check(args: &JsonCheckArgs) -> Result<Outputs, String> {
    let exprs = compile_all("expect", &args.expect).map_err(|(_, why)| why)?;
    let doc = parse(&args.path)?;
    let mut values = Vec::new();
    for jq in &exprs {
        values.push(
            jq.holds(&doc)
                .map_err(|why| format!("`{}`: {why}", args.path.display()))?,
        );
    }
    let mut out = Outputs::new();
    out.insert("valid".into(), json!(true));
    out.insert("values".into(), Json::Array(values));
    for (name, expr) in &args.outputs {
        let jq = Jq::compile(expr)
            .map_err(|why| format!("jq expression `{expr}` does not parse: {why}"))?;
        let value = jq
            .single(&doc)
            .map_err(|why| format!("output `{name}`: {why}"))?;
        out.insert(name.clone(), value);
    }
    Ok(out)
}

impl Action for JsonCheck {
    type Args = JsonCheckArgs;
    const NAME: &'static str = "json-check";
    const PLAN_RUNS_IT: bool = true;
    const OUTPUTS: &'static [&'static str] = &["valid", "values"];
    const SUMMARY: &'static str =
        "check that a file is valid JSON and that jq expressions over it yield true";

    fn extra_outputs(&self, args: &JsonCheckArgs) -> Vec<String> {
        args.outputs.keys().cloned().collect()
    }

    fn effect(&self, _: &JsonCheckArgs) -> Effect {
        Effect::ReadOnly
    }

    fn check_static(&self, args: &JsonCheckArgs) -> Result<(), (String, String)> {
        check_static_exprs("expect", &args.expect)?;
        for (name, expr) in args.outputs.iter().filter(|(_, e)| !e.contains("{{")) {
            Jq::compile(expr).map_err(|why| {
                (
                    format!("outputs.{name}"),
                    format!("jq expression `{expr}` does not parse: {why}"),
                )
            })?;
        }
        Ok(())
    }

    fn preflight(&self, args: &JsonCheckArgs, world: &mut World, _: &ActionCtx) -> Verdict {
        let shown = format!("`{}`", args.path.display());
        if let Err((_, why)) = compile_all("expect", &args.expect) {
            return Verdict::WouldFail(why);
        }
        match world.node_followed(&args.path) {
            Node::Missing => Verdict::WouldFail(format!("{shown} does not exist")),
            Node::Dir => Verdict::WouldFail(format!("{shown} is a directory")),
            _ if world.is_predicted(&args.path) => Verdict::Deferred(format!(
                "will check {shown} after the steps before it have written it"
            )),
            // Right before the step runs: `execute` checks, with its own messages.
            _ if !world.is_dry_run() => Verdict::Deferred(format!("will check {shown}")),
            _ => match check(args) {
                Ok(_) => Verdict::NoChange(format!(
                    "{shown} is valid JSON{}",
                    match args.expect.len() {
                        0 => String::new(),
                        1 => " and its expectation holds now".into(),
                        n => format!(" and its {n} expectations hold now"),
                    }
                )),
                Err(why) => Verdict::WouldFail(why),
            },
        }
    }

    fn execute(&self, args: &JsonCheckArgs, _: &ActionCtx) -> Result<Outputs, ActionError> {
        check(args).map_err(ActionError::Failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_errors_name_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        std::fs::write(&path, "{\n  \"projects\": [1,\n  }\n").unwrap();
        let e = parse(&path).unwrap_err();
        assert_eq!(
            e,
            format!(
                "registry_invalid_json: {}:3:3: expected value",
                path.display()
            )
        );
    }
}
