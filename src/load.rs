//! Raw file -> validated [`Runbook`]. Every problem is a [`Diagnostic`] that points
//! into the file; nothing runs until a runbook (and every runbook it calls) is valid.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_yaml::Value as Yaml;
use sha2::{Digest, Sha256};

use crate::actions::{self, ActionKind, parse_duration};
use crate::catalog::{Catalog, NotFound};
use crate::diagnostic::{Diagnostic, did_you_mean};
use crate::params::{ParamSpec, yaml_message};
use crate::raw::{RawRunbook, RawStep};
use crate::source::{Pos, SourceFile};
use crate::template::{Scope, TemplateIssue, Templates};

/// A runbook that passed every check.
#[derive(Debug)]
pub struct Runbook {
    pub name: String,
    pub source: Arc<SourceFile>,
    pub description: Option<String>,
    pub params: Vec<ParamSpec>,
    pub vars: Vec<Var>,
    pub roots: Vec<String>,
    pub lock: String,
    pub steps: Vec<Step>,
    pub rollback: Vec<Step>,
    pub outputs: Vec<(String, String)>,
}

#[derive(Debug)]
pub struct Var {
    pub name: String,
    pub template: String,
    /// Derived from a secret param: never frozen in the journal, rendered again on resume.
    pub secret: bool,
}

#[derive(Debug)]
pub struct Step {
    pub id: String,
    pub kind: StepKind,
    pub description: Option<String>,
    pub when: Option<String>,
    /// The raw arguments; strings are templates.
    pub args: Yaml,
    pub attempts: u32,
    pub retry_delay: Duration,
    pub timeout: Option<Duration>,
    pub idempotent: Option<bool>,
    pub lock: Option<StepLock>,
    pub continue_on_failure: bool,
    /// `expect_failure.contains` (a template): the step succeeds only by failing with it.
    pub expect_failure: Option<String>,
}

#[derive(Debug)]
pub struct StepLock {
    /// A template.
    pub path: String,
    pub timeout: Duration,
}

pub enum StepKind {
    Action(&'static dyn ActionKind),
    Assert,
    Confirm,
    Call(Arc<Runbook>),
}

impl std::fmt::Debug for StepKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.action_name())
    }
}

impl StepKind {
    /// The outputs a step of this kind has, for checking `steps.<id>.outputs.<name>`.
    pub fn output_names(&self, args: &serde_yaml::Value) -> Vec<String> {
        match self {
            StepKind::Action(a) => a.output_names(args),
            StepKind::Assert => Vec::new(),
            StepKind::Confirm => vec!["answer".to_string()],
            StepKind::Call(_) if args.get("dry_run") == Some(&Yaml::Bool(true)) => {
                DRY_RUN_OUTPUTS.iter().map(|s| s.to_string()).collect()
            }
            StepKind::Call(child) => child.outputs.iter().map(|(k, _)| k.clone()).collect(),
        }
    }

    pub fn action_name(&self) -> &'static str {
        match self {
            StepKind::Action(a) => a.name(),
            StepKind::Assert => "assert",
            StepKind::Confirm => "confirm",
            StepKind::Call(_) => "runbook",
        }
    }
}

/// `assert`: an expression that must hold.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AssertArgs {
    /// An expression (no braces) over params, vars and earlier steps' outputs.
    pub that: String,
    /// Said when it does not hold (a template).
    #[serde(default)]
    pub message: Option<String>,
}

/// Actions the planner and executor implement themselves (they read the template
/// context, ask the operator, or call the engine).
pub const CONTROL_ACTIONS: [&str; 3] = ["assert", "confirm", "runbook"];

/// `confirm`: an operator gate. Answered by `--yes`; otherwise asked on the terminal,
/// and it fails when there is no terminal.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfirmArgs {
    /// The question (a template), e.g. "About to overwrite the live database. Continue?"
    pub message: String,
}

/// The outputs of a `runbook` call with `dry_run: true` (see `Plan::as_outputs`).
pub const DRY_RUN_OUTPUTS: [&str; 4] = ["details", "summary", "ok", "steps"];

/// `runbook`: run another runbook as part of this one.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CallArgs {
    /// The runbook's name on the search path (not a template).
    pub name: String,
    /// Its params (values are templates); params not given here come from the run's
    /// `--vars` files, then from their defaults.
    #[serde(default)]
    #[schemars(with = "IndexMap<String, serde_json::Value>")]
    pub params: IndexMap<String, Yaml>,
    /// Plan the runbook instead of running it (read-only, like `runbook plan`): the
    /// step succeeds when no step of that plan would fail, and outputs the plan
    /// (`details`, `summary`, `ok`, `steps`: id, action, verdict, detail of each).
    #[serde(default)]
    pub dry_run: bool,
}

impl Runbook {
    /// This file and every file it calls, each once: what the journal keeps so that
    /// resume can tell whether anything changed.
    pub fn files(&self) -> Vec<(PathBuf, String)> {
        let mut out: Vec<(PathBuf, String)> = Vec::new();
        self.collect_files(&mut out);
        out
    }

    fn collect_files(&self, out: &mut Vec<(PathBuf, String)>) {
        if out.iter().any(|(p, _)| p == &self.source.path) {
            return;
        }
        out.push((self.source.path.clone(), self.source.text.clone()));
        for step in self.steps.iter().chain(&self.rollback) {
            if let StepKind::Call(child) = &step.kind {
                child.collect_files(out);
            }
        }
    }

    /// sha256 over every file of [`Runbook::files`].
    pub fn content_hash(&self) -> String {
        hash_files(&self.files())
    }

    /// Every param of this runbook and of the runbooks it calls (transitively), with
    /// whether any of them declares it secret.
    pub fn call_tree_params(&self) -> BTreeMap<String, bool> {
        fn walk(rb: &Runbook, seen: &mut BTreeSet<PathBuf>, out: &mut BTreeMap<String, bool>) {
            if !seen.insert(rb.source.path.clone()) {
                return;
            }
            for p in &rb.params {
                *out.entry(p.name.clone()).or_default() |= p.secret;
            }
            for step in rb.steps.iter().chain(&rb.rollback) {
                if let StepKind::Call(child) = &step.kind {
                    walk(child, seen, out);
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(self, &mut BTreeSet::new(), &mut out);
        out
    }

    pub fn secret_names(&self) -> BTreeSet<String> {
        self.params
            .iter()
            .filter(|p| p.secret)
            .map(|p| p.name.clone())
            .chain(
                self.vars
                    .iter()
                    .filter(|v| v.secret)
                    .map(|v| v.name.clone()),
            )
            .collect()
    }
}

pub fn hash_files(files: &[(PathBuf, String)]) -> String {
    let mut h = Sha256::new();
    for (path, text) in files {
        h.update(path.to_string_lossy().as_bytes());
        h.update([0]);
        h.update(text.as_bytes());
        h.update([0]);
    }
    crate::actions::files::hex(&h.finalize())
}

/// A unified diff from the files a run started with (`old`) to the files now: what a
/// refused resume shows. `start` names the beginning ("run start").
pub fn files_diff(old: &[(PathBuf, String)], now: &[(PathBuf, String)], start: &str) -> String {
    let mut report = String::new();
    for (path, before) in old {
        let new = now
            .iter()
            .find(|(p, _)| p == path)
            .map_or("", |(_, t)| t.as_str());
        if new != before {
            let diff = similar::TextDiff::from_lines(before.as_str(), new);
            report.push_str(&format!(
                "{}",
                diff.unified_diff().context_radius(2).header(
                    &format!("{} (at {start})", path.display()),
                    &format!("{} (now)", path.display())
                )
            ));
        }
    }
    for (path, _) in now.iter().filter(|(p, _)| !old.iter().any(|(q, _)| q == p)) {
        report.push_str(&format!("+ {} is now called too\n", path.display()));
    }
    report
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    NotFound(#[from] NotFound),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n\n"))]
    Invalid(Vec<Diagnostic>),
}

pub struct Loader<'a> {
    catalog: &'a Catalog,
    templates: &'a Templates,
    /// Runbooks being loaded, outermost first: a name seen again is a call cycle.
    stack: Vec<String>,
    done: HashMap<PathBuf, Arc<Runbook>>,
}

impl<'a> Loader<'a> {
    pub fn new(catalog: &'a Catalog, templates: &'a Templates) -> Self {
        Loader {
            catalog,
            templates,
            stack: Vec::new(),
            done: HashMap::new(),
        }
    }

    pub fn load(&mut self, name_or_file: &str) -> Result<Arc<Runbook>, LoadError> {
        let located = self.catalog.locate(name_or_file)?;
        if let Some(rb) = self.done.get(&located.path) {
            return Ok(rb.clone());
        }
        let text = std::fs::read_to_string(&located.path).map_err(|source| LoadError::Io {
            path: located.path.clone(),
            source,
        })?;
        let src = Arc::new(SourceFile::new(&located.path, text));
        self.stack.push(located.name.clone());
        let result = self.check(&located.name, src);
        self.stack.pop();
        let rb = Arc::new(result?);
        self.done.insert(located.path, rb.clone());
        Ok(rb)
    }

    fn check(&mut self, name: &str, src: Arc<SourceFile>) -> Result<Runbook, LoadError> {
        src.check_nesting()
            .map_err(|pos| LoadError::Invalid(vec![Diagnostic::at(&src, pos, too_deep())]))?;
        let raw: RawRunbook = serde_yaml::from_str(&src.text)
            .map_err(|e| LoadError::Invalid(vec![serde_diagnostic(&src, &e)]))?;
        let mut c = Checker {
            src: &src,
            templates: self.templates,
            errors: Vec::new(),
        };
        if raw.version != 1 {
            c.error(
                c.src.value_pos("version"),
                None,
                "version",
                format!(
                    "unsupported version {}; this engine reads version 1",
                    raw.version
                ),
                None,
            );
        }
        if raw.steps.is_empty() {
            // A run of nothing "succeeds" silently, which hides a runbook cut by mistake.
            c.error(
                c.src.key_pos("steps"),
                None,
                "steps",
                "a runbook needs at least one step",
                None,
            );
        }
        let params = c.params(&raw);
        let secret_params: BTreeSet<String> = params
            .iter()
            .filter(|p| p.secret)
            .map(|p| p.name.clone())
            .collect();
        let mut names: BTreeSet<String> = params.iter().map(|p| p.name.clone()).collect();
        let vars = c.vars(&raw, &mut names, &secret_params);
        let none = BTreeSet::new();
        let no_steps = BTreeMap::new();
        let scope_all = Scope {
            names: &names,
            steps: &no_steps,
            all_steps: &none,
        };
        for (i, root) in raw.roots.iter().enumerate() {
            c.template(root, &scope_all, &format!("roots[{i}]"), None);
        }
        let all_ids: BTreeSet<String> = raw
            .steps
            .iter()
            .chain(&raw.rollback)
            .map(|s| s.id.clone())
            .collect();
        let mut first_seen: HashMap<&str, Pos> = HashMap::new();
        // Step id -> the outputs it declares (None: not known, e.g. an invalid step).
        // Rollback steps come after every main step, so they may read any of them.
        let mut earlier: BTreeMap<String, Option<Vec<String>>> = BTreeMap::new();
        let mut steps = Vec::new();
        for (section, list) in [("steps", &raw.steps), ("rollback", &raw.rollback)] {
            for (i, step) in list.iter().enumerate() {
                let path = format!("{section}[{i}]");
                let id_pos = src.value_pos(&format!("{path}.id"));
                if let Some(first) = first_seen.get(step.id.as_str()) {
                    c.error(
                        id_pos,
                        Some(&step.id),
                        &format!("{path}.id"),
                        format!(
                            "duplicate step id `{}` (first used at line {})",
                            step.id, first.line
                        ),
                        None,
                    );
                } else {
                    first_seen.insert(&step.id, id_pos);
                }
                let scope = Scope {
                    names: &names,
                    steps: &earlier,
                    all_steps: &all_ids,
                };
                let checked = self.step(&mut c, step, &path, &scope);
                let outputs = checked.as_ref().map(|s| s.kind.output_names(&s.args));
                if let Some(s) = checked {
                    steps.push((section, s));
                }
                earlier.entry(step.id.clone()).or_insert(outputs);
            }
        }
        let scope_end = Scope {
            names: &names,
            steps: &earlier,
            all_steps: &none,
        };
        for (key, tmpl) in &raw.outputs {
            c.template(tmpl, &scope_end, &format!("outputs.{key}"), None);
        }
        if !c.errors.is_empty() {
            return Err(LoadError::Invalid(c.errors));
        }
        let (main, rollback): (Vec<_>, Vec<_>) =
            steps.into_iter().partition(|(s, _)| *s == "steps");
        let lock = raw
            .lock
            .clone()
            .unwrap_or_else(|| match name.rsplit_once('/') {
                Some((dir, _)) => dir.to_string(),
                None => name.to_string(),
            });
        Ok(Runbook {
            name: name.to_string(),
            description: raw.description,
            params,
            vars,
            roots: raw.roots,
            lock,
            steps: main.into_iter().map(|(_, s)| s).collect(),
            rollback: rollback.into_iter().map(|(_, s)| s).collect(),
            outputs: raw.outputs.into_iter().collect(),
            source: src,
        })
    }

    fn step(&mut self, c: &mut Checker, step: &RawStep, path: &str, scope: &Scope) -> Option<Step> {
        let id = step.id.as_str();
        let errors_before = c.errors.len();
        if id.is_empty()
            || !id
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
        {
            c.error(
                c.src.value_pos(&format!("{path}.id")),
                Some(id),
                &format!("{path}.id"),
                format!("step id `{id}` may hold only letters, digits, `_` and `-`"),
                None,
            );
        }
        let when = match &step.when {
            None => None,
            Some(Yaml::Bool(b)) => Some(b.to_string()),
            Some(Yaml::String(s)) => Some(s.clone()),
            Some(_) => {
                c.error(
                    c.src.value_pos(&format!("{path}.when")),
                    Some(id),
                    &format!("{path}.when"),
                    "`when` must be an expression string or a boolean",
                    None,
                );
                None
            }
        };
        if let Some(expr) = &when {
            c.expression(expr, scope, &format!("{path}.when"), Some(id));
        }
        let with_path = format!("{path}.with");
        let kind = match step.action.as_str() {
            "assert" => {
                if let Some(args) = c.typed_args::<AssertArgs>(&step.args, &with_path, id) {
                    c.expression(&args.that, scope, &format!("{with_path}.that"), Some(id));
                    if let Some(m) = &args.message {
                        c.template(m, scope, &format!("{with_path}.message"), Some(id));
                    }
                }
                Some(StepKind::Assert)
            }
            "confirm" => {
                if let Some(args) = c.typed_args::<ConfirmArgs>(&step.args, &with_path, id) {
                    c.template(
                        &args.message,
                        scope,
                        &format!("{with_path}.message"),
                        Some(id),
                    );
                }
                Some(StepKind::Confirm)
            }
            "runbook" => self.call(c, step, &with_path, scope),
            other => match actions::find(other) {
                Some(action) => {
                    if let Err(e) = action.check_raw(&step.args) {
                        c.arg_error(&with_path, id, &e.path, &e.message);
                    }
                    c.templates_in(&step.args, scope, &with_path, id);
                    Some(StepKind::Action(action))
                }
                None => {
                    let names: Vec<&str> = actions::registry()
                        .iter()
                        .map(|a| a.name())
                        .chain(CONTROL_ACTIONS)
                        .collect();
                    let hint = did_you_mean(other, names.iter().copied())
                        .or_else(|| Some(format!("known actions: {}", names.join(", "))));
                    c.error(
                        c.src.value_pos(&format!("{path}.action")),
                        Some(id),
                        &format!("{path}.action"),
                        format!("unknown action `{other}`"),
                        hint,
                    );
                    None
                }
            },
        };
        let (attempts, retry_delay) = match &step.retry {
            None => (1, Duration::ZERO),
            Some(r) => {
                if r.attempts == 0 {
                    c.error(
                        c.src.value_pos(&format!("{path}.retry.attempts")),
                        Some(id),
                        &format!("{path}.retry.attempts"),
                        "`attempts` counts the first try too: it must be at least 1",
                        None,
                    );
                }
                let delay = r
                    .delay
                    .as_deref()
                    .map_or(Ok(Duration::ZERO), parse_duration)
                    .unwrap_or_else(|e| {
                        c.error(
                            c.src.value_pos(&format!("{path}.retry.delay")),
                            Some(id),
                            &format!("{path}.retry.delay"),
                            e,
                            None,
                        );
                        Duration::ZERO
                    });
                (r.attempts.max(1), delay)
            }
        };
        let timeout = step
            .timeout
            .as_deref()
            .and_then(|t| match parse_duration(t) {
                Ok(d) => Some(d),
                Err(e) => {
                    c.error(
                        c.src.value_pos(&format!("{path}.timeout")),
                        Some(id),
                        &format!("{path}.timeout"),
                        e,
                        None,
                    );
                    None
                }
            });
        let lock = step.lock.as_ref().map(|l| {
            c.template(&l.path, scope, &format!("{path}.lock.path"), Some(id));
            let timeout = l
                .timeout
                .as_deref()
                .map_or(Ok(Duration::from_secs(30)), parse_duration);
            StepLock {
                path: l.path.clone(),
                timeout: timeout.unwrap_or_else(|e| {
                    c.error(
                        c.src.value_pos(&format!("{path}.lock.timeout")),
                        Some(id),
                        &format!("{path}.lock.timeout"),
                        e,
                        None,
                    );
                    Duration::ZERO
                }),
            }
        });
        let expect_failure = step.expect_failure.as_ref().map(|e| {
            let field = format!("{path}.expect_failure.contains");
            if e.contains.trim().is_empty() {
                c.error(
                    c.src.value_pos(&field),
                    Some(id),
                    &field,
                    "`contains` must name the expected error (any failure is not an expectation)",
                    None,
                );
            }
            c.template(&e.contains, scope, &field, Some(id));
            e.contains.clone()
        });
        if c.errors.len() > errors_before {
            return None;
        }
        Some(Step {
            expect_failure,
            lock,
            continue_on_failure: step.on_failure == crate::raw::OnFailure::Continue,
            id: id.to_string(),
            kind: kind?,
            description: step.description.clone(),
            when,
            args: step.args.clone(),
            attempts,
            retry_delay,
            timeout,
            idempotent: step.idempotent,
        })
    }

    fn call(
        &mut self,
        c: &mut Checker,
        step: &RawStep,
        with_path: &str,
        scope: &Scope,
    ) -> Option<StepKind> {
        let id = step.id.as_str();
        let args = c.typed_args::<CallArgs>(&step.args, with_path, id)?;
        let name_path = format!("{with_path}.name");
        if args.name.contains("{{") {
            c.error(
                c.src.value_pos(&name_path),
                Some(id),
                &name_path,
                "the called runbook's name must be written out, not a template",
                None,
            );
            return None;
        }
        if let Some(start) = self.stack.iter().position(|n| n == &args.name) {
            let mut chain: Vec<&str> = self.stack[start..].iter().map(String::as_str).collect();
            chain.push(&args.name);
            c.error(
                c.src.value_pos(&name_path),
                Some(id),
                &name_path,
                format!("call cycle: {}", chain.join(" -> ")),
                None,
            );
            return None;
        }
        let child = match self.load(&args.name) {
            Ok(child) => child,
            Err(LoadError::Invalid(diags)) => {
                c.error(
                    c.src.value_pos(&name_path),
                    Some(id),
                    &name_path,
                    format!("called runbook `{}` is invalid (see below)", args.name),
                    None,
                );
                c.errors.extend(diags);
                return None;
            }
            Err(e) => {
                c.error(
                    c.src.value_pos(&name_path),
                    Some(id),
                    &name_path,
                    e.to_string(),
                    None,
                );
                return None;
            }
        };
        for (key, value) in &args.params {
            let p = format!("{with_path}.params.{key}");
            if !child.params.iter().any(|s| &s.name == key) {
                let hint = did_you_mean(key, child.params.iter().map(|s| s.name.as_str()));
                c.error(
                    c.src.key_pos(&p),
                    Some(id),
                    &p,
                    format!("runbook `{}` has no param `{key}`", args.name),
                    hint,
                );
            }
            c.templates_in(value, scope, &p, id);
        }
        Some(StepKind::Call(child))
    }
}

struct Checker<'s> {
    src: &'s SourceFile,
    templates: &'s Templates,
    errors: Vec<Diagnostic>,
}

impl Checker<'_> {
    fn error(
        &mut self,
        pos: Pos,
        step: Option<&str>,
        field: &str,
        message: impl Into<String>,
        hint: Option<String>,
    ) {
        self.errors.push(
            Diagnostic::at(self.src, pos, message)
                .step(step)
                .field(field)
                .hint(hint),
        );
    }

    fn params(&mut self, raw: &RawRunbook) -> Vec<ParamSpec> {
        let mut out = Vec::new();
        for (name, p) in &raw.params {
            let path = format!("params.{name}");
            if !is_identifier(name) {
                self.error(self.src.key_pos(&path), None, &path, format!("param name `{name}` must be an identifier (letters, digits, `_`) so templates can use it"), None);
            }
            let pattern = p.pattern.as_deref().and_then(|re| {
                match regex::Regex::new(&format!("^(?:{re})$")) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        self.error(
                            self.src.value_pos(&format!("{path}.pattern")),
                            None,
                            &format!("{path}.pattern"),
                            format!("invalid pattern: {e}"),
                            None,
                        );
                        None
                    }
                }
            });
            let mut spec = ParamSpec {
                name: name.clone(),
                kind: p.kind,
                default: None,
                required: p.required,
                description: p.description.clone(),
                secret: p.secret,
                pattern,
            };
            if let Some(default) = &p.default {
                match serde_json::to_value(default)
                    .map_err(|e| e.to_string())
                    .and_then(|v| spec.coerce(&v))
                {
                    Ok(v) => spec.default = Some(v),
                    Err(e) => self.error(
                        self.src.value_pos(&format!("{path}.default")),
                        None,
                        &format!("{path}.default"),
                        e,
                        None,
                    ),
                }
            }
            out.push(spec);
        }
        out
    }

    fn vars(
        &mut self,
        raw: &RawRunbook,
        names: &mut BTreeSet<String>,
        secret_params: &BTreeSet<String>,
    ) -> Vec<Var> {
        let none = BTreeSet::new();
        let no_steps = BTreeMap::new();
        let mut secret_names = secret_params.clone();
        let mut out = Vec::new();
        for (name, value) in &raw.vars {
            let path = format!("vars.{name}");
            if names.contains(name) {
                self.error(
                    self.src.key_pos(&path),
                    None,
                    &path,
                    format!("`{name}` is already declared as a param"),
                    None,
                );
            } else if !is_identifier(name) {
                self.error(
                    self.src.key_pos(&path),
                    None,
                    &path,
                    format!("var name `{name}` must be an identifier (letters, digits, `_`)"),
                    None,
                );
            }
            let template = match value {
                Yaml::String(s) => s.clone(),
                Yaml::Bool(b) => b.to_string(),
                Yaml::Number(n) => n.to_string(),
                _ => {
                    self.error(
                        self.src.value_pos(&path),
                        None,
                        &path,
                        "a var is a template string",
                        None,
                    );
                    continue;
                }
            };
            let scope = Scope {
                names,
                steps: &no_steps,
                all_steps: &none,
            };
            self.template(&template, &scope, &path, None);
            // A var that reads a secret is a secret too.
            let secret = self
                .templates
                .names_used(&template)
                .iter()
                .any(|n| secret_names.contains(n));
            if secret {
                secret_names.insert(name.clone());
            }
            names.insert(name.clone());
            out.push(Var {
                name: name.clone(),
                template,
                secret,
            });
        }
        out
    }

    fn typed_args<T: serde::de::DeserializeOwned>(
        &mut self,
        raw: &Yaml,
        with_path: &str,
        id: &str,
    ) -> Option<T> {
        let raw = match raw {
            Yaml::Null => Yaml::Mapping(Default::default()),
            other => other.clone(),
        };
        match serde_path_to_error::deserialize::<_, T>(raw) {
            Ok(v) => Some(v),
            Err(e) => {
                let path = e.path().to_string();
                let path = if path == "." { String::new() } else { path };
                self.arg_error(with_path, id, &path, &e.inner().to_string());
                None
            }
        }
    }

    fn arg_error(&mut self, with_path: &str, id: &str, arg_path: &str, message: &str) {
        let (field, pos, hint) = if let Some((unknown, expected)) = parse_unknown_field(message) {
            // serde_path_to_error's path leads to the map that holds the unknown key
            // (`retry` for `retry.evry`), or already ends in it: either way the field is
            // the whole path down to the key, so its own line is found.
            let holder = if arg_path == unknown {
                ""
            } else {
                arg_path
                    .strip_suffix(&format!(".{unknown}"))
                    .unwrap_or(arg_path)
            };
            let field = match holder {
                "" => format!("{with_path}.{unknown}"),
                h => format!("{with_path}.{h}.{unknown}"),
            };
            let hint = did_you_mean(&unknown, expected.iter().map(String::as_str));
            (field.clone(), self.src.key_pos(&field), hint)
        } else if arg_path.is_empty() {
            (with_path.to_string(), self.src.key_pos(with_path), None)
        } else {
            let field = format!("{with_path}.{arg_path}");
            (field.clone(), self.src.value_pos(&field), None)
        };
        let message = if let Some(rest) = message.strip_prefix("missing field ") {
            format!("missing argument {rest}")
        } else if message.starts_with("unknown field") {
            message.replacen("unknown field", "unknown argument", 1)
        } else {
            message.to_string()
        };
        self.error(pos, Some(id), &field, message, hint);
    }

    fn report(&mut self, issue: TemplateIssue, source: &str, field: &str, step: Option<&str>) {
        let mut pos = self.src.value_pos(field);
        // Point at the offending name when the value sits on its line.
        if let (Some(name), Some(line)) = (&issue.name, self.src.line_text(pos.line)) {
            let start = line
                .char_indices()
                .nth(pos.col - 1)
                .map_or(line.len(), |(i, _)| i);
            if source.contains(name.as_str())
                && let Some(off) = line[start..].find(name.as_str())
            {
                pos.col += line[start..start + off].chars().count();
            }
        }
        self.error(pos, step, field, issue.message, issue.hint);
    }

    fn template(&mut self, source: &str, scope: &Scope, field: &str, step: Option<&str>) {
        if let Err(issue) = self.templates.check_template(source, scope) {
            self.report(issue, source, field, step);
        }
    }

    fn expression(&mut self, source: &str, scope: &Scope, field: &str, step: Option<&str>) {
        if let Err(issue) = self.templates.check_expression(source, scope) {
            self.report(issue, source, field, step);
        }
    }

    /// Checks every string inside an argument tree as a template.
    fn templates_in(&mut self, value: &Yaml, scope: &Scope, path: &str, id: &str) {
        match value {
            Yaml::String(s) => self.template(s, scope, path, Some(id)),
            Yaml::Sequence(items) => {
                for (i, item) in items.iter().enumerate() {
                    self.templates_in(item, scope, &format!("{path}[{i}]"), id);
                }
            }
            Yaml::Mapping(map) => {
                for (k, v) in map {
                    let key = k.as_str().map_or_else(|| format!("{k:?}"), str::to_string);
                    self.templates_in(v, scope, &format!("{path}.{key}"), id);
                }
            }
            _ => {}
        }
    }
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// What a file nested deeper than [`crate::source::MAX_NESTING`] is told.
pub fn too_deep() -> String {
    format!(
        "nested deeper than {} levels, the most a runbook or vars file may nest",
        crate::source::MAX_NESTING
    )
}

/// serde's "unknown field `x`, expected one of `a`, `b`" (or "expected `a` or `b`",
/// or "there are no fields") -> (x, [a, b]).
fn parse_unknown_field(message: &str) -> Option<(String, Vec<String>)> {
    let rest = message.strip_prefix("unknown field `")?;
    let (name, tail) = rest.split_once('`')?;
    let expected = tail
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect();
    Some((name.to_string(), expected))
}

/// A serde_yaml error (syntax, type, unknown key, missing key) as a diagnostic.
fn serde_diagnostic(src: &SourceFile, e: &serde_yaml::Error) -> Diagnostic {
    let pos = crate::params::yaml_pos(e);
    let mut message = yaml_message(e);
    // serde_yaml puts the path first: "steps[0].action: invalid type ...".
    let mut field = String::new();
    if let Some((head, rest)) = message.split_once(": ")
        && !head.contains(' ')
        && (["steps", "rollback", "params", "vars", "roots", "outputs"]
            .iter()
            .any(|s| head.starts_with(s))
            || head.contains('.')
            || head.contains('['))
    {
        field = head.to_string();
        message = rest.to_string();
    }
    let mut hint = None;
    if let Some((unknown, expected)) = parse_unknown_field(&message) {
        hint = did_you_mean(&unknown, expected.iter().map(String::as_str));
        message = format!("unknown key `{unknown}`");
        field = if field.is_empty() {
            unknown
        } else {
            format!("{field}.{unknown}")
        };
    } else if let Some(rest) = message.strip_prefix("missing field ") {
        message = format!("missing key {rest}");
    }
    let step = step_id_at(src, &field);
    Diagnostic::at(src, pos, message)
        .step(step.as_deref())
        .field(field)
        .hint(hint)
}

/// The id of the step that `field` (`steps[2].with.x`) lies in, read from the index.
fn step_id_at(src: &SourceFile, field: &str) -> Option<String> {
    let end = field.find(']')?;
    src.step_id(&field[..=end]).map(str::to_string)
}
