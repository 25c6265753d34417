//! Typed params: their declarations and the values given with `--set` and `--vars`.

use std::path::Path;

use indexmap::IndexMap;
use serde_json::Value as Json;

use crate::diagnostic::{Diagnostic, did_you_mean};
use crate::raw::ParamType;
use crate::source::SourceFile;

#[derive(Debug, Clone)]
pub struct ParamSpec {
    pub name: String,
    pub kind: ParamType,
    pub default: Option<Json>,
    pub required: bool,
    pub description: Option<String>,
    pub secret: bool,
    pub pattern: Option<regex::Regex>,
}

/// Values given on the command line, before they are checked against a runbook.
#[derive(Debug, Default, Clone)]
pub struct ParamInputs {
    /// From `--vars` files, in order (later files win); keys a runbook does not declare
    /// are ignored, so one deployment file can serve every runbook.
    pub files: IndexMap<String, Json>,
    /// From `--set k=v`; unknown keys are an error.
    pub sets: IndexMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ParamError {
    #[error("{0}")]
    Invalid(String),
    #[error("{}", .0.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("\n"))]
    File(Vec<Diagnostic>),
}

impl ParamInputs {
    pub fn add_set(&mut self, pair: &str) -> Result<(), ParamError> {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| ParamError::Invalid(format!("`--set {pair}`: expected NAME=VALUE")))?;
        self.sets.insert(k.trim().to_string(), v.to_string());
        Ok(())
    }

    /// Reads a vars file: a YAML mapping of param names to values.
    pub fn add_file(&mut self, path: &Path) -> Result<(), ParamError> {
        let text = if path == Path::new("-") {
            // `--vars -`: the fleet controller sends a host's values (secrets among
            // them) this way, so that none of them is in the process's argv.
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                .map(|_| text)
                .map_err(|e| ParamError::Invalid(format!("cannot read vars from stdin: {e}")))?
        } else {
            std::fs::read_to_string(path).map_err(|e| {
                ParamError::Invalid(format!("cannot read vars file {}: {e}", path.display()))
            })?
        };
        let label = if path == Path::new("-") {
            Path::new("<stdin>")
        } else {
            path
        };
        let src = SourceFile::new(label, text);
        src.check_nesting().map_err(|pos| {
            ParamError::File(vec![Diagnostic::at(
                &src,
                pos,
                format!("vars file: {}", crate::load::too_deep()),
            )])
        })?;
        let map: IndexMap<String, serde_yaml::Value> =
            serde_yaml::from_str(&src.text).map_err(|e| {
                ParamError::File(vec![Diagnostic::at(
                    &src,
                    yaml_pos(&e),
                    format!("vars file: {}", yaml_message(&e)),
                )])
            })?;
        for (k, v) in map {
            let json = serde_json::to_value(&v).map_err(|e| {
                ParamError::File(vec![
                    Diagnostic::at(&src, src.value_pos(&k), format!("vars file: {e}"))
                        .field(k.clone()),
                ])
            })?;
            self.files.insert(k, json);
        }
        Ok(())
    }
}

/// Where serde_yaml says its error is (the start of the file when it does not say).
pub fn yaml_pos(e: &serde_yaml::Error) -> crate::source::Pos {
    e.location()
        .map_or(crate::source::Pos { line: 1, col: 1 }, |l| {
            crate::source::Pos {
                line: l.line(),
                col: l.column(),
            }
        })
}

/// serde_yaml's message without the " at line L column C" of the reported location
/// (we print the location ourselves, in front).
pub fn yaml_message(e: &serde_yaml::Error) -> String {
    let msg = e.to_string();
    match e.location() {
        Some(l) => msg.replacen(
            &format!(" at line {} column {}", l.line(), l.column()),
            "",
            1,
        ),
        None => msg,
    }
}

/// A path as the run uses it: a relative one is taken from the current directory (the
/// directory the run was started in; resume and rollback work there too) and frozen
/// absolute, so that nothing reads it against another directory later.
pub fn absolute(path: &Path) -> std::path::PathBuf {
    if path.is_absolute() {
        return path.to_path_buf();
    }
    let cwd = std::env::current_dir().unwrap_or_else(|_| std::path::PathBuf::from("/"));
    // `components` drops the `.`s; `..` stay, for the kernel to resolve as it would.
    cwd.join(path).components().collect()
}

impl ParamSpec {
    /// Converts a given value to this param's type.
    pub fn coerce(&self, value: &Json) -> Result<Json, String> {
        self.coerce_value(value).map_err(|e| {
            if self.secret {
                // The message quotes the value: a secret is never quoted.
                e.replace(&value.to_string(), "the given value")
            } else {
                e
            }
        })
    }

    fn coerce_value(&self, value: &Json) -> Result<Json, String> {
        let text = match value {
            Json::String(s) => Some(s.as_str()),
            _ => None,
        };
        let out = match self.kind {
            ParamType::Bool => match (value, text) {
                (Json::Bool(b), _) => Json::Bool(*b),
                (_, Some("true" | "yes" | "1")) => Json::Bool(true),
                (_, Some("false" | "no" | "0")) => Json::Bool(false),
                _ => {
                    return Err(format!(
                        "param `{}` is a bool: give true or false, not {value}",
                        self.name
                    ));
                }
            },
            ParamType::Int => match (value, text.map(str::parse::<i64>)) {
                (Json::Number(n), _) if n.is_i64() => value.clone(),
                (_, Some(Ok(n))) => Json::from(n),
                _ => return Err(format!("param `{}` is an int, not {value}", self.name)),
            },
            ParamType::List => match value {
                Json::Array(items) if items.iter().all(Json::is_string) => value.clone(),
                Json::String(s) => match serde_json::from_str::<Vec<String>>(s) {
                    Ok(items) => Json::from(items),
                    Err(_) => {
                        return Err(format!(
                            "param `{}` is a list: give a JSON array of strings like [\"a\", \"b\"]",
                            self.name
                        ));
                    }
                },
                _ => {
                    return Err(format!(
                        "param `{}` is a list of strings, not {value}",
                        self.name
                    ));
                }
            },
            ParamType::String | ParamType::Path => match value {
                Json::String(_) => value.clone(),
                Json::Number(n) => Json::String(n.to_string()),
                Json::Bool(b) => Json::String(b.to_string()),
                _ => {
                    return Err(format!(
                        "param `{}` is a {}, not {value}",
                        self.name,
                        kind_name(self.kind)
                    ));
                }
            },
        };
        if let (Some(re), Json::String(s)) = (&self.pattern, &out)
            && !re.is_match(s)
        {
            let shown = if self.secret {
                "the given value"
            } else {
                s.as_str()
            };
            return Err(format!(
                "param `{}`: `{shown}` does not match the pattern `{}`",
                self.name,
                re.as_str()
            ));
        }
        if self.kind == ParamType::Path {
            match out.as_str() {
                Some("") => {
                    return Err(format!(
                        "param `{}` is a path and must not be empty",
                        self.name
                    ));
                }
                Some(p) => {
                    return Ok(Json::String(
                        absolute(Path::new(p)).to_string_lossy().into_owned(),
                    ));
                }
                None => {}
            }
        }
        Ok(out)
    }
}

pub fn kind_name(kind: ParamType) -> &'static str {
    match kind {
        ParamType::Bool => "bool",
        ParamType::Int => "int",
        ParamType::String => "string",
        ParamType::Path => "path",
        ParamType::List => "list",
    }
}

/// Resolves every declared param: `--set`, then vars files, then the default.
pub fn resolve(
    specs: &[ParamSpec],
    inputs: &ParamInputs,
) -> Result<IndexMap<String, Json>, ParamError> {
    for key in inputs.sets.keys() {
        if !specs.iter().any(|s| &s.name == key) {
            let hint = did_you_mean(key, specs.iter().map(|s| s.name.as_str()))
                .map_or_else(String::new, |h| format!(" ({h})"));
            let known: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
            return Err(ParamError::Invalid(format!(
                "`--set {key}`: the runbook has no param `{key}`{hint}; its params: {}",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )));
        }
    }
    let mut out = IndexMap::new();
    let mut missing = Vec::new();
    for spec in specs {
        let given = inputs
            .sets
            .get(&spec.name)
            .map(|s| Json::String(s.clone()))
            .or_else(|| inputs.files.get(&spec.name).cloned())
            .or_else(|| spec.default.clone());
        match given {
            Some(v) => {
                out.insert(
                    spec.name.clone(),
                    spec.coerce(&v).map_err(ParamError::Invalid)?,
                );
            }
            None if spec.required => missing.push(spec),
            None => {
                out.insert(spec.name.clone(), Json::Null);
            }
        }
    }
    if !missing.is_empty() {
        let lines: Vec<String> = missing
            .iter()
            .map(|s| {
                format!(
                    "  {} ({}){}",
                    s.name,
                    kind_name(s.kind),
                    s.description
                        .as_deref()
                        .map_or_else(String::new, |d| format!(": {d}"))
                )
            })
            .collect();
        return Err(ParamError::Invalid(format!(
            "missing required param{}:\n{}\ngive them with --set NAME=VALUE or in a --vars FILE",
            if missing.len() > 1 { "s" } else { "" },
            lines.join("\n")
        )));
    }
    Ok(out)
}
