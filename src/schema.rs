//! The JSON Schema of the runbook format, generated from the Rust types so it cannot
//! drift: `runbook schema` prints it and a test compares it with
//! `schemas/runbook.schema.json`.

use std::collections::BTreeSet;

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
    allow_whole_templates(&mut root, action_args.iter().map(|(_, _, args)| args));
    engine_rules(&mut root);
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

/// The name of the definition of a whole-value template string (`"{{ keep_daily }}"`).
const WHOLE_TEMPLATE: &str = "WholeTemplate";

/// The engine lets a whole-value template stand for any action argument that is not a
/// string (a list, a map, a bool, a number, one of an enum's names; see
/// `actions::deserialize_lenient`), but not for a struct (`retry: {...}`). The same
/// rule, over the generated schema: every such node of an action's arguments becomes
/// `anyOf: [the node, WholeTemplate]`. Strings need nothing: a template is a string.
fn allow_whole_templates<'a>(root: &mut Value, action_args: impl Iterator<Item = &'a Value>) {
    let original = root["$defs"].clone();
    let mut reachable = BTreeSet::new();
    for args in action_args {
        collect_refs(args, &original, &mut reachable);
    }
    for name in &reachable {
        if let Some(def) = root["$defs"].get_mut(name) {
            templatable(def, &original, true);
        }
    }
    root["$defs"][WHOLE_TEMPLATE] = json!({
        "description": "A whole-value template (one `{{ expression }}`), checked once rendered.",
        "type": "string",
        "pattern": r"^\s*\{\{([^{]|\{[^{])*\}\}\s*$",
    });
}

/// Every `$defs` name reachable from `node` through `$ref`s.
fn collect_refs(node: &Value, defs: &Value, out: &mut BTreeSet<String>) {
    match node {
        Value::Object(map) => {
            if let Some(name) = map
                .get("$ref")
                .and_then(Value::as_str)
                .and_then(|r| r.strip_prefix("#/$defs/"))
                && out.insert(name.to_string())
            {
                collect_refs(&defs[name], defs, out);
            }
            for v in map.values() {
                collect_refs(v, defs, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_refs(v, defs, out)),
        _ => {}
    }
}

/// What a schema node takes, as far as templates go.
#[derive(PartialEq)]
enum Shape {
    /// Strings (so templates already), or anything.
    Text,
    /// An object with named fields: never a template.
    Struct,
    /// A list, map, bool, number or enum: a whole template may stand for it.
    Other,
}

fn shape(node: &Value, defs: &Value) -> Shape {
    let Value::Object(map) = node else {
        return Shape::Text;
    };
    if let Some(name) = map
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix("#/$defs/"))
    {
        return shape(&defs[name], defs);
    }
    if map.contains_key("properties") {
        return Shape::Struct;
    }
    if map.contains_key("const") || map.contains_key("enum") {
        return Shape::Other;
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(Value::Array(branches)) = map.get(key) {
            let shapes: Vec<Shape> = branches
                .iter()
                .filter(|b| b.get("type") != Some(&json!("null")))
                .map(|b| shape(b, defs))
                .collect();
            return if shapes.contains(&Shape::Text) {
                Shape::Text
            } else if shapes.iter().all(|s| *s == Shape::Struct) {
                Shape::Struct
            } else {
                Shape::Other
            };
        }
    }
    match map.get("type") {
        None => Shape::Text,
        Some(Value::String(t)) if t == "string" => Shape::Text,
        Some(Value::Array(types)) if types.contains(&json!("string")) => Shape::Text,
        Some(_) => Shape::Other,
    }
}

/// Applies the rule of [`allow_whole_templates`] to `node` and what it contains
/// (`$ref`s are left alone: their definitions are rewritten themselves).
fn templatable(node: &mut Value, defs: &Value, is_def: bool) {
    if node.get("$ref").is_some() && !is_def {
        return;
    }
    let node_shape = shape(node, defs);
    if let Value::Object(map) = node {
        if let Some(Value::Object(props)) = map.get_mut("properties") {
            for v in props.values_mut() {
                templatable(v, defs, false);
            }
        }
        for key in ["items", "additionalProperties"] {
            if let Some(child @ Value::Object(_)) = map.get_mut(key) {
                templatable(child, defs, false);
            }
        }
    }
    if node_shape != Shape::Other {
        return;
    }
    let Value::Object(map) = node else { return };
    let mut inner = std::mem::take(map);
    let mut outer = serde_json::Map::new();
    for key in ["description", "default"] {
        if let Some(v) = inner.remove(key) {
            outer.insert(key.to_string(), v);
        }
    }
    outer.insert(
        "anyOf".into(),
        json!([Value::Object(inner), {"$ref": format!("#/$defs/{WHOLE_TEMPLATE}")}]),
    );
    *map = outer;
}

/// Rules the engine enforces beyond the Rust types, stated in the schema too so an
/// editor flags what `validate` would refuse.
fn engine_rules(root: &mut Value) {
    root["properties"]["version"] = json!({
        "description": "Format version. Only `1` exists.",
        "const": 1,
    });
    root["properties"]["steps"]["minItems"] = json!(1);
    root["properties"]["params"]["propertyNames"] = json!({"pattern": IDENTIFIER});
    root["properties"]["vars"]["propertyNames"] = json!({"pattern": IDENTIFIER});
    root["properties"]["vars"]["additionalProperties"] = json!({
        "description": "A template (a bare bool or number is taken as its text).",
        "type": ["string", "boolean", "number"],
    });
    let step = &mut root["$defs"]["Step"]["properties"];
    step["id"]["pattern"] = json!("^[A-Za-z0-9_-]+$");
    root["$defs"]["Retry"]["properties"]["attempts"]["minimum"] = json!(1);
}

/// A param or var name: templates read it as a variable.
const IDENTIFIER: &str = "^[A-Za-z_][A-Za-z0-9_]*$";

pub fn runbook_schema_text() -> String {
    let mut text = serde_json::to_string_pretty(&runbook_schema()).unwrap_or_default();
    text.push('\n');
    text
}
