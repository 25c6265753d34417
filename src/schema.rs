//! The JSON Schema of the runbook format, generated from the Rust types so it cannot
//! drift: `runbook schema` prints it and a test compares it with
//! `schemas/runbook.schema.json`.

use schemars::generate::SchemaSettings;
use serde_json::{Value, json};

use crate::actions;
use crate::load::{AssertArgs, CallArgs};
use crate::raw::RawRunbook;

pub fn runbook_schema() -> Value {
    let mut generator = SchemaSettings::draft2020_12().into_generator();
    let mut action_args: Vec<(&str, &str, Value)> = actions::registry()
        .iter()
        .map(|a| {
            (
                a.name(),
                a.summary(),
                a.args_schema(&mut generator).to_value(),
            )
        })
        .collect();
    action_args.push((
        "assert",
        "fail unless an expression holds",
        generator.subschema_for::<AssertArgs>().to_value(),
    ));
    action_args.push((
        "confirm",
        "ask the operator to go on (answered by --yes)",
        generator
            .subschema_for::<crate::load::ConfirmArgs>()
            .to_value(),
    ));
    action_args.push((
        "runbook",
        "run another runbook as a step",
        generator.subschema_for::<CallArgs>().to_value(),
    ));
    let mut root = generator.into_root_schema_for::<RawRunbook>().to_value();
    root["$id"] = json!("https://runbook.dev/schemas/runbook.schema.json");
    let step = &mut root["$defs"]["Step"];
    step["properties"]["action"] = json!({
        "description": "The action to run.",
        "enum": action_args.iter().map(|(n, _, _)| *n).collect::<Vec<_>>(),
    });
    step["allOf"] = Value::Array(
        action_args
            .iter()
            .map(|(name, summary, args)| {
                json!({
                    "if": {"properties": {"action": {"const": name}}, "required": ["action"]},
                    "then": {"properties": {"with": {"description": summary, "allOf": [args]}}},
                })
            })
            .collect(),
    );
    root
}

pub fn runbook_schema_text() -> String {
    let mut text = serde_json::to_string_pretty(&runbook_schema()).unwrap_or_default();
    text.push('\n');
    text
}
