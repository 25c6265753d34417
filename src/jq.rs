//! jq expressions over JSON values, through jaq (a jq implementation in Rust): used by
//! `json-check` (assertions over a file) and `http` (expectations and named outputs
//! over a response body).
//!
//! Expressions run with jq's standard library. `input`/`inputs` are not available (there
//! is one input), and `halt`/`halt_error` end the expression with an error instead of
//! exiting the engine.

use jaq_core::load::{Arena, File, Loader};
use jaq_core::{Compiler, Ctx, Vars, data};
use jaq_json::{Num, Rc, Val};
use serde_json::Value as Json;

type Data = data::JustLut<Val>;

/// At most this many outputs are collected from one expression, so an expression like
/// `repeat(.)` ends with an error instead of filling memory.
const MAX_OUTPUTS: usize = 10_000;

/// A compiled expression.
pub struct Jq {
    source: String,
    filter: jaq_core::Filter<Data>,
}

impl std::fmt::Debug for Jq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Jq({:?})", self.source)
    }
}

/// Where a compile error is, as a 1-based column in the expression, and why.
fn located(code: &str, part: &str, what: String) -> String {
    let start = jaq_core::load::span(code, part).start;
    let col = code[..start].chars().count() + 1;
    if part.is_empty() {
        format!("{what} at the end (column {col})")
    } else {
        format!("{what}, found `{part}` at column {col}")
    }
}

impl Jq {
    /// Parses and compiles `source`; the error says what is wrong and at which column.
    pub fn compile(source: &str) -> Result<Jq, String> {
        let defs = jaq_core::defs()
            .chain(jaq_std::defs())
            .chain(jaq_json::defs());
        let funs = jaq_core::funs::<Data>()
            .chain(jaq_std::funs::<Data>())
            .chain(jaq_json::funs::<Data>());
        let arena = Arena::default();
        let loader = Loader::new(defs);
        let modules =
            loader
                .load(
                    &arena,
                    File {
                        code: source,
                        path: (),
                    },
                )
                .map_err(|errors| {
                    let mut out = Vec::new();
                    for (_, e) in errors {
                        match e {
                            jaq_core::load::Error::Io(items) => {
                                out.extend(items.into_iter().map(|(path, why)| {
                                    format!("cannot load module `{path}`: {why}")
                                }));
                            }
                            jaq_core::load::Error::Lex(items) => {
                                out.extend(items.into_iter().map(|(expect, part)| {
                                    located(source, part, format!("expected {}", expect.as_str()))
                                }));
                            }
                            jaq_core::load::Error::Parse(items) => {
                                out.extend(items.into_iter().map(|(expect, part)| {
                                    located(source, part, format!("expected {}", expect.as_str()))
                                }));
                            }
                        }
                    }
                    out.join("; ")
                })?;
        let filter = Compiler::default()
            .with_funs(funs)
            .compile(modules)
            .map_err(|errors| {
                errors
                    .into_iter()
                    .flat_map(|(_, items)| items)
                    .map(|(name, undefined)| {
                        located(
                            source,
                            name,
                            format!("undefined {} `{name}`", undefined.as_str()),
                        )
                        .replacen(&format!(", found `{name}`"), "", 1)
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            })?;
        Ok(Jq {
            source: source.to_string(),
            filter,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Every output of the expression on `input`, or the first error it raised.
    pub fn run(&self, input: &Json) -> Result<Vec<Json>, String> {
        let ctx = Ctx::<Data>::new(&self.filter.lut, Vars::new([]));
        let mut out = Vec::new();
        for item in self.filter.id.run((ctx, to_val(input))) {
            match item {
                Ok(v) => out.push(to_json(&v)),
                Err(exn) => {
                    return Err(match exn.get_err() {
                        Ok(e) => e.to_string(),
                        Err(exn) => match exn.get_halt() {
                            Ok(code) => format!("the expression called `halt` (code {code})"),
                            Err(_) => "the expression raised an exception".into(),
                        },
                    });
                }
            }
            if out.len() > MAX_OUTPUTS {
                return Err(format!("it yields more than {MAX_OUTPUTS} values"));
            }
        }
        Ok(out)
    }

    /// The expression as a check: it must yield `true` (every output, at least one).
    /// The error says what it yielded instead.
    pub fn holds(&self, input: &Json) -> Result<Json, String> {
        let values = self
            .run(input)
            .map_err(|e| format!("`{}` failed: {e}", self.source))?;
        if !values.is_empty() && values.iter().all(|v| *v == Json::Bool(true)) {
            return Ok(Json::Bool(true));
        }
        Err(format!(
            "`{}` does not hold: expected true, got {}",
            self.source,
            shown_values(&values)
        ))
    }

    /// The expression as a named value: it must yield exactly one value.
    pub fn single(&self, input: &Json) -> Result<Json, String> {
        let mut values = self
            .run(input)
            .map_err(|e| format!("`{}` failed: {e}", self.source))?;
        match values.len() {
            1 => Ok(values.remove(0)),
            0 => Err(format!("`{}` yielded no value", self.source)),
            n => Err(format!(
                "`{}` yielded {n} values; wrap it in [ ] to collect them in an array",
                self.source
            )),
        }
    }
}

/// `false`, `nothing`, or `3 values: 1, 2, 3`, shortened.
fn shown_values(values: &[Json]) -> String {
    let short = |v: &Json| {
        let text = v.to_string();
        if text.chars().count() > 120 {
            format!("{}...", text.chars().take(120).collect::<String>())
        } else {
            text
        }
    };
    match values {
        [] => "no value".into(),
        [one] => short(one),
        many => format!(
            "{} values: {}",
            many.len(),
            many.iter()
                .take(5)
                .map(short)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn to_val(v: &Json) -> Val {
    match v {
        Json::Null => Val::Null,
        Json::Bool(b) => Val::Bool(*b),
        Json::Number(n) => Val::Num(if let Some(i) = n.as_i64() {
            Num::from_integral(i)
        } else if let Some(u) = n.as_u64() {
            Num::from_integral(u)
        } else {
            Num::Float(n.as_f64().unwrap_or(f64::NAN))
        }),
        Json::String(s) => Val::utf8_str(s.clone().into_bytes()),
        Json::Array(items) => Val::Arr(Rc::new(items.iter().map(to_val).collect())),
        Json::Object(map) => Val::obj(
            map.iter()
                .map(|(k, v)| (Val::utf8_str(k.clone().into_bytes()), to_val(v)))
                .collect(),
        ),
    }
}

fn to_json(v: &Val) -> Json {
    match v {
        Val::Null => Json::Null,
        Val::Bool(b) => Json::Bool(*b),
        Val::Num(Num::Int(i)) => Json::from(*i as i64),
        // NaN and the infinities are not JSON: null, as jq prints them.
        Val::Num(n) => n
            .to_string()
            .parse::<serde_json::Number>()
            .map_or(Json::Null, Json::Number),
        Val::TStr(b) | Val::BStr(b) => Json::String(String::from_utf8_lossy(b).into_owned()),
        Val::Arr(items) => Json::Array(items.iter().map(to_json).collect()),
        Val::Obj(map) => Json::Object(
            map.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Val::TStr(b) | Val::BStr(b) => String::from_utf8_lossy(b).into_owned(),
                        other => to_json(other).to_string(),
                    };
                    (key, to_json(v))
                })
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn runs_jq_over_json_and_back() {
        let doc = json!({"projects": [{"id": "p05", "n": 3}, {"id": "p06", "n": 1.5}], "big": 18446744073709551615u64});
        let jq = Jq::compile(".projects | length > 0").unwrap();
        assert_eq!(jq.holds(&doc), Ok(json!(true)));
        assert_eq!(
            Jq::compile("[.projects[].id]").unwrap().single(&doc),
            Ok(json!(["p05", "p06"]))
        );
        assert_eq!(
            Jq::compile(".projects | map(.n) | add")
                .unwrap()
                .single(&doc),
            Ok(json!(4.5))
        );
        assert_eq!(
            Jq::compile(".big").unwrap().single(&doc),
            Ok(json!(18446744073709551615u64))
        );
        assert_eq!(
            Jq::compile(".projects | length == 0").unwrap().holds(&doc),
            Err("`.projects | length == 0` does not hold: expected true, got false".into())
        );
        assert_eq!(
            Jq::compile(".projects[].id").unwrap().single(&doc),
            Err(
                "`.projects[].id` yielded 2 values; wrap it in [ ] to collect them in an array"
                    .into()
            )
        );
        assert!(
            Jq::compile(".projects | keys | .[0] | ascii_downcase")
                .unwrap()
                .run(&doc)
                .unwrap_err()
                .contains("cannot use 0")
        );
    }

    #[test]
    fn halt_is_an_error_not_an_exit() {
        let jq = Jq::compile("halt").unwrap();
        assert_eq!(
            jq.run(&json!(1)),
            Err("the expression called `halt` (code 0)".into())
        );
        let jq = Jq::compile("repeat(.)").unwrap();
        assert!(jq.run(&json!(1)).unwrap_err().contains("more than"));
    }

    #[test]
    fn compile_errors_name_the_column() {
        assert_eq!(
            Jq::compile(".projects | length >").unwrap_err(),
            "expected term at the end (column 21)"
        );
        assert_eq!(
            Jq::compile(".a | lenght").unwrap_err(),
            "undefined filter `lenght` at column 6"
        );
        assert!(
            Jq::compile("(.a")
                .unwrap_err()
                .contains("closing parenthesis")
        );
    }
}
