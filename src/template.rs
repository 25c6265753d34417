//! Templates and expressions: minijinja with strict undefined.
//!
//! Checking happens twice. `validate` parses every template and compares the names it
//! uses with what the runbook declares (params, vars, earlier steps), so a typo is an
//! error before anything runs. Rendering then uses strict undefined, so a missing
//! attribute (say a step output that does not exist) is an error, never "".
//!
//! In a dry-run the outputs of earlier steps do not exist yet. They are stood in for by
//! placeholders such as `<db.outputs.bytes>`, and every step whose values used one is
//! reported as "unknown until db runs".

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use minijinja::value::{Enumerator, Object, ObjectRepr, Value};
use minijinja::{Environment, UndefinedBehavior};

pub struct Templates {
    env: Environment<'static>,
}

/// The most one rendered value (a var, an argument, an output) may hold. A runbook's
/// values are paths, names and file contents; vars that double each other
/// (`b: "{{ a ~ a }}"`) would otherwise grow until an allocation fails and the
/// process aborts.
pub const MAX_RENDERED_BYTES: usize = 16 << 20;

/// The work one rendering may do: minijinja's fuel is about one unit per instruction
/// and per 64 bytes of data created, so this bounds both a loop over `range(10**9)`
/// and the memory a single template can build up (about 128 MB) before its result is
/// measured against [`MAX_RENDERED_BYTES`].
pub const RENDER_FUEL: u64 = 2_000_000;

/// Refuses a rendered value above [`MAX_RENDERED_BYTES`].
fn bounded(len: usize) -> Result<(), String> {
    if len > MAX_RENDERED_BYTES {
        Err(format!(
            "it renders to more than {} MiB ({len} bytes), the limit of one rendered value",
            MAX_RENDERED_BYTES >> 20
        ))
    } else {
        Ok(())
    }
}

/// The names a template may use.
pub struct Scope<'a> {
    pub names: &'a BTreeSet<String>,
    /// Step ids whose outputs may be read (`steps.<id>`), with the outputs each
    /// declares (None when not known).
    pub steps: &'a BTreeMap<String, Option<Vec<String>>>,
    /// Every step id of the runbook: one not in `steps` runs later (for a better
    /// message). One set for the whole runbook, so checking a step costs no copy of it.
    pub all_steps: &'a BTreeSet<String>,
}

/// A problem found in a template before it runs.
#[derive(Debug)]
pub struct TemplateIssue {
    pub message: String,
    pub hint: Option<String>,
    /// The offending name, to point the column at it.
    pub name: Option<String>,
}

impl Default for Templates {
    fn default() -> Self {
        Self::new()
    }
}

fn now_utc(format: Option<String>) -> Result<String, minijinja::Error> {
    use std::fmt::Write;
    let format = format.unwrap_or_else(|| "%Y-%m-%dT%H:%M:%SZ".to_string());
    let mut out = String::new();
    write!(out, "{}", chrono::Utc::now().format(&format)).map_err(|_| {
        minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            format!("`{format}` is not a valid strftime format"),
        )
    })?;
    Ok(out)
}

/// The newest `YYYYMMDDTHHMMSSZ` directory in `dir`. Read when a var is rendered, so a
/// run freezes which snapshot "latest" meant when it was planned.
fn latest_stamp(dir: String) -> Result<String, minijinja::Error> {
    let entries = std::fs::read_dir(&dir).map_err(|e| {
        minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            format!("latest_stamp: cannot list {dir}: {e}"),
        )
    })?;
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| crate::actions::snapshots::parse_stamp(n).is_some())
        .max()
        .ok_or_else(|| {
            minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                format!("latest_stamp: no snapshots in {dir}"),
            )
        })
}

/// This host's name (for metadata such as a backup's source host).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}

impl Templates {
    pub fn new() -> Self {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_fuel(Some(RENDER_FUEL));
        // Multi-line content (write-file) keeps its final newline.
        if let Ok(syntax) = minijinja::syntax::SyntaxConfig::builder()
            .keep_trailing_newline(true)
            .build()
        {
            env.set_syntax(syntax);
        }
        env.set_formatter(format_value);
        env.add_filter("string", string_filter);
        env.add_filter("dirname", dirname_filter);
        env.add_function("now_utc", now_utc);
        env.add_function("hostname", hostname);
        env.add_function("latest_stamp", latest_stamp);
        env.add_global("runbook_version", env!("CARGO_PKG_VERSION"));
        Templates { env }
    }

    fn is_global(&self, name: &str) -> bool {
        self.env.globals().any(|(n, _)| n == name)
    }

    fn check_names(
        &self,
        used: impl IntoIterator<Item = String>,
        scope: &Scope,
    ) -> Result<(), TemplateIssue> {
        let mut used: Vec<String> = used.into_iter().collect();
        used.sort();
        for name in used {
            let mut parts = name.split('.');
            let root = parts.next().unwrap_or_default();
            if root == "steps" {
                let Some(id) = parts.next() else { continue };
                if let Some(declared) = scope.steps.get(id) {
                    check_step_field(id, parts.next(), parts.next(), declared.as_deref())?;
                    continue;
                }
                let message = if scope.all_steps.contains(id) {
                    format!("`steps.{id}` is read before step `{id}` runs")
                } else {
                    format!("undefined step `{id}` in `{name}`")
                };
                let hint =
                    crate::diagnostic::did_you_mean(id, scope.steps.keys().map(String::as_str));
                return Err(TemplateIssue {
                    message,
                    hint,
                    name: Some(id.to_string()),
                });
            }
            if scope.names.contains(root) || self.is_global(root) {
                continue;
            }
            let hint =
                crate::diagnostic::did_you_mean(root, scope.names.iter().map(String::as_str))
                    .or_else(|| {
                        Some(
                    "declare it under `params` (values come from --set or --vars) or `vars`"
                        .to_string(),
                )
                    });
            return Err(TemplateIssue {
                message: format!("undefined variable `{root}`"),
                hint,
                name: Some(root.to_string()),
            });
        }
        Ok(())
    }

    /// Parses a template and checks the names it uses.
    pub fn check_template(&self, source: &str, scope: &Scope) -> Result<(), TemplateIssue> {
        let tmpl = self
            .env
            .template_from_str(source)
            .map_err(|e| syntax_issue("template", &e))?;
        self.check_names(tmpl.undeclared_variables(true), scope)
    }

    /// Parses an expression (`when`, `assert.that`) and checks the names it uses.
    pub fn check_expression(&self, source: &str, scope: &Scope) -> Result<(), TemplateIssue> {
        let expr = self
            .env
            .compile_expression(source)
            .map_err(|e| syntax_issue("expression", &e))?;
        self.check_names(expr.undeclared_variables(true), scope)
    }

    pub fn render(&self, source: &str, ctx: &Value) -> Result<String, String> {
        if !source.contains("{{") && !source.contains("{%") {
            return Ok(source.to_string());
        }
        let out = self.env.render_str(source, ctx).map_err(|e| describe(&e))?;
        bounded(out.len())?;
        Ok(out)
    }

    /// Renders a template to JSON. A template that is one `{{ expression }}` whose value
    /// is a list (or a concatenation of lists) or a map gives that list or map (so `argv: "{{ service_argv }}"` is an
    /// argv); everything else renders to a string.
    pub fn render_value(&self, source: &str, ctx: &Value) -> Result<serde_json::Value, String> {
        self.render_typed(source, ctx, false)
    }

    /// As [`Templates::render_value`], and booleans and numbers keep their type too
    /// (a runbook's outputs: `valid: true`, not `"true"`).
    pub fn render_output(&self, source: &str, ctx: &Value) -> Result<serde_json::Value, String> {
        self.render_typed(source, ctx, true)
    }

    fn render_typed(
        &self,
        source: &str,
        ctx: &Value,
        scalars: bool,
    ) -> Result<serde_json::Value, String> {
        let trimmed = source.trim();
        let whole = trimmed
            .strip_prefix("{{")
            .and_then(|s| s.strip_suffix("}}"))
            .filter(|inner| !inner.contains("{{") && !inner.contains("}}"));
        if let Some(inner) = whole {
            let value = self.eval(inner, ctx)?;
            use minijinja::value::ValueKind;
            let typed = match value.kind() {
                // `a + b` of two lists is a lazy iterable, still a list to the reader.
                ValueKind::Seq | ValueKind::Map | ValueKind::Iterable => true,
                ValueKind::Bool | ValueKind::Number | ValueKind::None => scalars,
                _ => false,
            };
            if typed {
                let json = serde_json::to_value(&value).map_err(|e| e.to_string())?;
                bounded(json.to_string().len())?;
                return Ok(json);
            }
        }
        self.render(source, ctx).map(serde_json::Value::String)
    }

    pub fn eval(&self, source: &str, ctx: &Value) -> Result<Value, String> {
        let expr = self
            .env
            .compile_expression(source)
            .map_err(|e| describe(&e))?;
        expr.eval(ctx).map_err(|e| describe(&e))
    }
}

/// `steps.<id>.<field>.<output>`: field is `outputs` or `status`; the output must be
/// one the step declares.
fn check_step_field(
    id: &str,
    field: Option<&str>,
    output: Option<&str>,
    declared: Option<&[String]>,
) -> Result<(), TemplateIssue> {
    match (field, output, declared) {
        (None | Some("status" | "error" | "duration"), _, _)
        | (Some("outputs"), None, _)
        | (_, _, None) => Ok(()),
        (Some("outputs"), Some(name), Some(declared)) => {
            if declared.iter().any(|d| d == name) {
                return Ok(());
            }
            let hint = crate::diagnostic::did_you_mean(name, declared.iter().map(String::as_str))
                .or_else(|| {
                    Some(if declared.is_empty() {
                        format!("step `{id}` has no outputs")
                    } else {
                        format!("its outputs: {}", declared.join(", "))
                    })
                });
            Err(TemplateIssue {
                message: format!("step `{id}` has no output `{name}`"),
                hint,
                name: Some(name.to_string()),
            })
        }
        (Some(other), _, _) => Err(TemplateIssue {
            message: format!(
                "`steps.{id}.{other}` does not exist; a step has `outputs`, `status`, `error` and `duration`"
            ),
            hint: crate::diagnostic::did_you_mean(
                other,
                ["outputs", "status", "error", "duration"],
            ),
            name: Some(other.to_string()),
        }),
    }
}

fn syntax_issue(what: &str, e: &minijinja::Error) -> TemplateIssue {
    TemplateIssue {
        message: format!("{what} syntax: {}", describe(e)),
        hint: None,
        name: None,
    }
}

/// How every error about an undefined name or attribute starts (see
/// [`crate::frame::Frame::explain`], which names an unset optional param).
pub const UNDEFINED: &str = "undefined value";

/// Values as the runbook and the vars file write them: `true`/`false`, not Python's
/// `True`/`False` (minijinja's default), wherever a bool becomes text.
fn format_value(
    out: &mut minijinja::Output<'_>,
    state: &mut minijinja::State<'_, '_>,
    value: &Value,
) -> Result<(), minijinja::Error> {
    match as_bool(value) {
        Some(b) => out
            .write_str(if b { "true" } else { "false" })
            .map_err(|_| minijinja::Error::new(minijinja::ErrorKind::WriteFailure, "write")),
        None => minijinja::escape_formatter(out, state, value),
    }
}

fn as_bool(value: &Value) -> Option<bool> {
    (value.kind() == minijinja::value::ValueKind::Bool).then(|| value.is_true())
}

/// `| string`, with bools as `true`/`false`.
fn string_filter(value: Value) -> Value {
    match as_bool(&value) {
        Some(b) => Value::from(if b { "true" } else { "false" }),
        None if value.as_str().is_some() => value,
        None => Value::from(value.to_string()),
    }
}

/// `| dirname`: the directory a path is in (`/srv/a/db/atocore.db` -> `/srv/a/db`), as
/// `dirname(1)` says it, so a runbook can make the parent of a file param it restores.
fn dirname_filter(path: &str) -> String {
    let trimmed = path.trim_end_matches('/');
    match trimmed.rfind('/') {
        Some(0) => "/".to_string(),
        Some(i) => trimmed[..i].trim_end_matches('/').to_string(),
        None if path.starts_with('/') => "/".to_string(),
        None => ".".to_string(),
    }
}

/// minijinja's message without its template-name suffix.
pub fn describe(e: &minijinja::Error) -> String {
    let mut msg = e
        .detail()
        .map_or_else(|| e.kind().to_string(), str::to_string);
    if e.kind() == minijinja::ErrorKind::UndefinedError {
        msg = match e.detail() {
            None => format!("{UNDEFINED} (strict mode): a name or attribute does not exist"),
            Some(detail) => format!("{UNDEFINED} (strict mode): {detail}"),
        };
    }
    if e.kind() == minijinja::ErrorKind::OutOfFuel {
        msg = format!(
            "the template does more work than one rendering may ({RENDER_FUEL} steps, or about {} MB of data it builds)",
            RENDER_FUEL * 64 / 1_000_000
        );
    }
    msg
}

/// Records which earlier steps' outputs a rendering read before they existed.
#[derive(Debug, Default, Clone)]
pub struct UnknownReads(Arc<Mutex<BTreeSet<String>>>);

impl UnknownReads {
    pub fn take(&self) -> BTreeSet<String> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// `steps.<id>.outputs` of a step that has not run (dry-run).
#[derive(Debug)]
pub struct PendingOutputs {
    pub step: String,
    pub reads: UnknownReads,
}

impl Object for PendingOutputs {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.reads
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(self.step.clone());
        Some(Value::from(format!("<{}.outputs.{}>", self.step, key)))
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Empty
    }

    fn is_true(self: &Arc<Self>) -> bool {
        self.reads
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(self.step.clone());
        true
    }
}

impl Templates {
    /// `steps.<id>.<field>` references in a template or expression, as (id, field).
    pub fn step_refs(&self, source: &str, is_expr: bool) -> Vec<(String, String)> {
        let names = if is_expr {
            self.env
                .compile_expression(source)
                .map(|e| e.undeclared_variables(true))
                .unwrap_or_default()
        } else {
            self.env
                .template_from_str(source)
                .map(|t| t.undeclared_variables(true))
                .unwrap_or_default()
        };
        names
            .into_iter()
            .filter_map(|n| {
                let mut parts = n.split('.');
                (parts.next() == Some("steps")).then_some(())?;
                Some((
                    parts.next()?.to_string(),
                    parts.next().unwrap_or("").to_string(),
                ))
            })
            .collect()
    }

    /// The top-level names a template (or an expression) reads.
    pub fn names_read(&self, source: &str, is_expr: bool) -> BTreeSet<String> {
        if is_expr {
            return self
                .env
                .compile_expression(source)
                .map(|e| e.undeclared_variables(false).into_iter().collect())
                .unwrap_or_default();
        }
        self.names_used(source)
    }

    /// The top-level names a template reads (for secret tracking).
    pub fn names_used(&self, source: &str) -> BTreeSet<String> {
        self.env
            .template_from_str(source)
            .map(|t| {
                t.undeclared_variables(false)
                    .into_iter()
                    .collect::<BTreeSet<_>>()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::dirname_filter;

    #[test]
    fn dirname_says_what_dirname_1_says() {
        for (path, dir) in [
            ("/srv/atocore/data/db/atocore.db", "/srv/atocore/data/db"),
            ("/srv/atocore/data/chroma/", "/srv/atocore/data"),
            ("/atocore.db", "/"),
            ("/", "/"),
            ("atocore.db", "."),
            ("db//atocore.db", "db"),
        ] {
            assert_eq!(dirname_filter(path), dir, "dirname of {path}");
        }
    }
}
