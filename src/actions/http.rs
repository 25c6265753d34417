//! `http`: one HTTP request (JSON in, JSON out) with expectations on the answer, named
//! outputs taken from the body by jq, and an optional wait until a service is healthy.
//!
//! A dry-run never sends a request that could change anything; a GET is sent only
//! with `--probe`. Header values are never logged here: they may hold secrets (the
//! engine masks secret params in everything it stores and prints).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use indexmap::IndexMap;
use reqwest::Method;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value as Json, json};

use super::json::{check_static_exprs, compile_all};
use super::{
    Action, ActionCtx, ActionError, Effect, Outputs, Reconcile, Verdict, parse_duration,
    writes_scope,
};
use crate::jq::Jq;
use crate::world::{OpaqueScope, World};

/// A request timeout when the step gives none.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// A `--probe` in the plan waits at most this long for an answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// The wait between tries of `retry.until_healthy` when `every` is not given.
const DEFAULT_EVERY: Duration = Duration::from_secs(2);
/// A response body longer than this is refused (the action is for JSON APIs).
const MAX_BODY: u64 = 16 << 20;
/// The `body` output holds at most this much; a longer body is kept as truncated text.
const MAX_BODY_OUTPUT: usize = 256 << 10;

/// Send one HTTP request and check the answer.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpArgs {
    /// Request method: `GET` (default), `HEAD`, `OPTIONS` (read-only), `POST`, `PUT`,
    /// `PATCH`, `DELETE` (not idempotent: an interrupted attempt is not sent again
    /// without the operator).
    #[serde(default = "default_method")]
    pub method: String,
    /// The URL, `http://` or `https://` (TLS certificates are verified).
    pub url: String,
    /// Request headers. Values may hold secrets (e.g. `Bearer {{ token }}` with a
    /// secret param): they are masked in plans, logs and the journal.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// A JSON body, sent with `Content-Type: application/json`. Templated strings in it
    /// stay strings; use `json_text` for a templated number or boolean.
    #[serde(default)]
    pub json: Option<Json>,
    /// A JSON body written as text (a template), parsed before it is sent, e.g.
    /// `'{"include_chroma": {{ include_chroma | tojson }}}'`.
    #[serde(default)]
    pub json_text: Option<String>,
    /// Give up on one request after this long (default `30s`).
    #[serde(default)]
    pub timeout: Option<String>,
    /// What the answer must be; by default any 2xx status.
    #[serde(default)]
    pub expect: HttpExpect,
    /// Named values read from the JSON answer by jq expressions, each one output of the
    /// step: `{chunks_used: .chunks_used}` gives `steps.<id>.outputs.chunks_used`. Each
    /// expression must yield exactly one value.
    #[serde(default)]
    pub outputs: IndexMap<String, String>,
    /// Try again until the expectations hold: `{until_healthy: 60s, every: 2s}`. For
    /// waiting on a service that is starting.
    #[serde(default)]
    pub retry: Option<HttpRetry>,
    /// The paths (files or directories, with everything below them) this step may
    /// create, change or remove. Without it the plan cannot tell what the step does to
    /// files, so every later step that reads a path is "unknown until" it runs; with
    /// it, only those paths are. `[]`: it writes no file.
    #[serde(default)]
    pub writes: Option<Vec<PathBuf>>,
    /// Accept any TLS certificate. Only for a test service with a self-signed
    /// certificate; never for a real one.
    #[serde(default)]
    pub insecure: bool,
}

fn default_method() -> String {
    "GET".into()
}

/// Expectations on the answer.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpExpect {
    /// The status code, or a list of accepted codes (default: any 2xx).
    #[serde(default)]
    pub status: Option<StatusSpec>,
    /// jq expressions over the JSON answer; each must yield `true`.
    #[serde(default)]
    pub jq: Vec<String>,
}

/// One status code or a list of them.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum StatusSpec {
    One(u16),
    Any(Vec<u16>),
}

/// Retrying until healthy.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpRetry {
    /// Keep trying for this long (`60s`, `2m`).
    pub until_healthy: String,
    /// Wait this long between tries (default `2s`).
    #[serde(default)]
    pub every: Option<String>,
}

pub struct Http;

/// The outputs every `http` step has; `outputs:` adds more.
const FIXED_OUTPUTS: &[&str] = &["status", "duration", "body"];

/// A request checked and ready to send.
struct Prepared {
    method: Method,
    url: reqwest::Url,
    headers: HeaderMap,
    body: Option<Vec<u8>>,
    timeout: Duration,
    status: Option<Vec<u16>>,
    expect: Vec<Jq>,
    outputs: Vec<(String, Jq)>,
    retry: Option<(Duration, Duration)>,
    insecure: bool,
}

fn parse_method(text: &str) -> Result<Method, String> {
    let upper = text.trim().to_ascii_uppercase();
    match upper.as_str() {
        "GET" | "HEAD" | "OPTIONS" | "POST" | "PUT" | "PATCH" | "DELETE" => {
            Method::from_bytes(upper.as_bytes()).map_err(|e| e.to_string())
        }
        _ => Err(format!(
            "method `{text}` is not one of GET, HEAD, OPTIONS, POST, PUT, PATCH, DELETE"
        )),
    }
}

fn read_only(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

fn parse_url(text: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(text).map_err(|e| format!("`{text}` is not a URL ({e})"))?;
    match url.scheme() {
        "http" | "https" if url.has_host() => Ok(url),
        "http" | "https" => Err(format!("URL `{text}` names no host")),
        other => Err(format!(
            "URL `{text}` is `{other}:`; only http:// and https:// are supported"
        )),
    }
}

/// Checks a header; the message names the header, never its value.
fn parse_header(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), String> {
    let n = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("`{name}` is not a valid header name"))?;
    let mut v = HeaderValue::from_str(value)
        .map_err(|_| format!("the value of header `{name}` is not a valid header value"))?;
    v.set_sensitive(true);
    Ok((n, v))
}

fn parse_json_text(text: &str) -> Result<Json, String> {
    serde_json::from_str(text).map_err(|e| {
        format!(
            "`json_text` is not JSON: line {}, column {}: {} (write template values as `{{{{ name | tojson }}}}`)",
            e.line(),
            e.column(),
            e.to_string()
                .rsplit_once(" at line ")
                .map_or(e.to_string(), |(w, _)| w.to_string())
        )
    })
}

fn valid_output_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !ok {
        return Err(format!(
            "output name `{name}` may hold only letters, digits and `_` (not first)"
        ));
    }
    if FIXED_OUTPUTS.contains(&name) {
        return Err(format!(
            "output name `{name}` is taken: every http step has the outputs {}",
            FIXED_OUTPUTS.join(", ")
        ));
    }
    Ok(())
}

fn status_text(expected: &Option<Vec<u16>>) -> String {
    match expected.as_deref() {
        None => "2xx".into(),
        Some([one]) => one.to_string(),
        Some(many) => {
            let list: Vec<String> = many.iter().map(u16::to_string).collect();
            format!("one of {}", list.join(", "))
        }
    }
}

fn shown_status(status: reqwest::StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("{} {reason}", status.as_u16()),
        None => status.as_u16().to_string(),
    }
}

/// The first characters of a body, on one line, for messages.
fn excerpt(text: &str) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > 200 {
        format!("{}...", flat.chars().take(200).collect::<String>())
    } else {
        flat
    }
}

/// A transport error with its causes ("connection refused"), without the request.
fn transport_error(e: &reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        return format!("no answer within {}", humantime::format_duration(timeout));
    }
    let mut causes = Vec::new();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !causes.iter().any(|c: &String| c.contains(&text)) {
            causes.push(text);
        }
        source = s.source();
    }
    if causes.is_empty() {
        e.to_string()
    } else {
        causes.join(": ")
    }
}

/// The `body` output: the parsed JSON, or the text; cut when too long.
fn body_output(bytes: &[u8], parsed: Option<&Json>) -> Json {
    if let Some(doc) = parsed
        && bytes.len() <= MAX_BODY_OUTPUT
    {
        return doc.clone();
    }
    let text = String::from_utf8_lossy(bytes);
    if text.len() <= MAX_BODY_OUTPUT {
        return Json::String(text.into_owned());
    }
    let mut cut = MAX_BODY_OUTPUT;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    Json::String(format!(
        "{}\n... (truncated: {} bytes in all)",
        &text[..cut],
        bytes.len()
    ))
}

/// A successful answer.
struct Answer {
    status: u16,
    body: Json,
    named: Vec<(String, Json)>,
}

impl Prepared {
    fn new(args: &HttpArgs) -> Result<Prepared, String> {
        let method = parse_method(&args.method)?;
        let url = parse_url(&args.url)?;
        let mut headers = HeaderMap::new();
        for (name, value) in &args.headers {
            let (n, v) = parse_header(name, value)?;
            headers.insert(n, v);
        }
        let body = match (&args.json, &args.json_text) {
            (Some(_), Some(_)) => return Err("give either `json` or `json_text`, not both".into()),
            (Some(doc), None) => Some(doc.clone()),
            (None, Some(text)) => Some(parse_json_text(text)?),
            (None, None) => None,
        };
        let body = body.map(|doc| serde_json::to_vec(&doc).unwrap_or_default());
        let timeout = args
            .timeout
            .as_deref()
            .map(parse_duration)
            .transpose()?
            .unwrap_or(DEFAULT_TIMEOUT);
        let status = args.expect.status.clone().map(|s| match s {
            StatusSpec::One(code) => vec![code],
            StatusSpec::Any(codes) => codes,
        });
        if let Some(bad) = status.iter().flatten().find(|c| !(100..=599).contains(*c)) {
            return Err(format!("expected status {bad} is not an HTTP status code"));
        }
        let expect = compile_all("expect.jq", &args.expect.jq).map_err(|(_, why)| why)?;
        let mut outputs = Vec::new();
        for (name, expr) in &args.outputs {
            valid_output_name(name)?;
            let jq = Jq::compile(expr)
                .map_err(|why| format!("jq expression `{expr}` does not parse: {why}"))?;
            outputs.push((name.clone(), jq));
        }
        let retry = match &args.retry {
            None => None,
            Some(r) => Some((
                parse_duration(&r.until_healthy)?,
                r.every
                    .as_deref()
                    .map(parse_duration)
                    .transpose()?
                    .unwrap_or(DEFAULT_EVERY),
            )),
        };
        Ok(Prepared {
            method,
            url,
            headers,
            body,
            timeout,
            status,
            expect,
            outputs,
            retry,
            insecure: args.insecure,
        })
    }

    /// "POST http://host/path with a 23-byte JSON body"
    fn describe(&self) -> String {
        match &self.body {
            Some(b) => format!(
                "{} {} with a {}-byte JSON body",
                self.method,
                self.url,
                b.len()
            ),
            None => format!("{} {}", self.method, self.url),
        }
    }

    fn client(&self) -> Result<reqwest::blocking::Client, String> {
        reqwest::blocking::Client::builder()
            .user_agent(concat!("runbook/", env!("CARGO_PKG_VERSION")))
            .danger_accept_invalid_certs(self.insecure)
            .build()
            .map_err(|e| format!("cannot set up the HTTP client: {e}"))
    }

    /// Sends the request once and checks the answer.
    fn attempt(
        &self,
        client: &reqwest::blocking::Client,
        timeout: Duration,
    ) -> Result<Answer, String> {
        let mut request = client
            .request(self.method.clone(), self.url.clone())
            .timeout(timeout)
            .headers(self.headers.clone());
        if let Some(body) = &self.body {
            request = request
                .header(CONTENT_TYPE, "application/json")
                .body(body.clone());
        }
        let response = request.send().map_err(|e| transport_error(&e, timeout))?;
        let status = response.status();
        let mut bytes = Vec::new();
        response
            .take(MAX_BODY + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("reading the answer: {e}"))?;
        if bytes.len() as u64 > MAX_BODY {
            return Err(format!("the answer is longer than {} MiB", MAX_BODY >> 20));
        }
        let status_ok = match &self.status {
            None => status.is_success(),
            Some(codes) => codes.contains(&status.as_u16()),
        };
        if !status_ok {
            let body = excerpt(&String::from_utf8_lossy(&bytes));
            return Err(format!(
                "expected status {}, got {}{}",
                status_text(&self.status),
                shown_status(status),
                if body.is_empty() {
                    String::new()
                } else {
                    format!(": {body}")
                }
            ));
        }
        let parsed: Option<Json> = serde_json::from_slice(&bytes).ok();
        let needs_json = !self.expect.is_empty() || !self.outputs.is_empty();
        let doc = match (&parsed, needs_json) {
            (Some(doc), _) => doc.clone(),
            (None, false) => Json::Null,
            (None, true) => {
                return Err(format!(
                    "expected a JSON answer, got: {}",
                    excerpt(&String::from_utf8_lossy(&bytes))
                ));
            }
        };
        for jq in &self.expect {
            jq.holds(&doc)?;
        }
        let mut named = Vec::new();
        for (name, jq) in &self.outputs {
            named.push((
                name.clone(),
                jq.single(&doc)
                    .map_err(|why| format!("output `{name}`: {why}"))?,
            ));
        }
        Ok(Answer {
            status: status.as_u16(),
            body: body_output(&bytes, parsed.as_ref()),
            named,
        })
    }
}

impl Action for Http {
    type Args = HttpArgs;
    const NAME: &'static str = "http";
    const OUTPUTS: &'static [&'static str] = FIXED_OUTPUTS;
    const SUMMARY: &'static str = "send an HTTP request (JSON body), check status and jq expectations, read named outputs; can wait until a service is healthy";

    fn effect(&self, args: &HttpArgs) -> Effect {
        match parse_method(&args.method) {
            Ok(m) if read_only(&m) => Effect::ReadOnly,
            _ => Effect::NotIdempotent,
        }
    }

    /// What a `POST` (`PUT`, ...) makes the service do is the service's business: it
    /// may write anywhere on this host (a backup endpoint writes a snapshot), unless
    /// `writes:` says where. A read-only method changes nothing.
    fn opaque(&self, args: &HttpArgs) -> Option<OpaqueScope> {
        (Action::effect(self, args) != Effect::ReadOnly).then(|| writes_scope(&args.writes))
    }

    fn extra_outputs(&self, args: &HttpArgs) -> Vec<String> {
        args.outputs.keys().cloned().collect()
    }

    fn check_static(&self, args: &HttpArgs) -> Result<(), (String, String)> {
        let plain = |s: &str| !s.contains("{{") && !s.contains("{%");
        if plain(&args.method) {
            parse_method(&args.method).map_err(|e| ("method".into(), e))?;
        }
        if plain(&args.url) {
            parse_url(&args.url).map_err(|e| ("url".into(), e))?;
        }
        for (name, value) in &args.headers {
            let field = format!("headers.{name}");
            HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                (
                    field.clone(),
                    format!("`{name}` is not a valid header name"),
                )
            })?;
            if plain(value) {
                parse_header(name, value).map_err(|e| (field, e))?;
            }
        }
        if args.json.is_some() && args.json_text.is_some() {
            return Err((
                "json_text".into(),
                "give either `json` or `json_text`, not both".into(),
            ));
        }
        if let Some(text) = args.json_text.as_deref().filter(|t| plain(t)) {
            parse_json_text(text).map_err(|e| ("json_text".into(), e))?;
        }
        if let Some(t) = args.timeout.as_deref().filter(|t| plain(t)) {
            parse_duration(t).map_err(|e| ("timeout".into(), e))?;
        }
        if let Some(r) = &args.retry {
            if plain(&r.until_healthy) {
                parse_duration(&r.until_healthy).map_err(|e| ("retry.until_healthy".into(), e))?;
            }
            if let Some(every) = r.every.as_deref().filter(|t| plain(t)) {
                parse_duration(every).map_err(|e| ("retry.every".into(), e))?;
            }
        }
        check_static_exprs("expect.jq", &args.expect.jq)?;
        for (name, expr) in &args.outputs {
            let field = format!("outputs.{name}");
            valid_output_name(name).map_err(|e| (field.clone(), e))?;
            if plain(expr) {
                Jq::compile(expr).map_err(|why| {
                    (
                        field,
                        format!("jq expression `{expr}` does not parse: {why}"),
                    )
                })?;
            }
        }
        Ok(())
    }

    fn preflight(&self, args: &HttpArgs, _: &mut World, ctx: &ActionCtx) -> Verdict {
        let request = match Prepared::new(args) {
            Ok(r) => r,
            Err(e) => return Verdict::WouldFail(e),
        };
        let what = request.describe();
        if !read_only(&request.method) {
            return Verdict::WillChange(format!("would {what}"));
        }
        if !ctx.probe {
            return Verdict::NoChange(format!("will {what}"));
        }
        let client = match request.client() {
            Ok(c) => c,
            Err(e) => return Verdict::WouldFail(e),
        };
        let timeout = request.timeout.min(PROBE_TIMEOUT);
        match (request.attempt(&client, timeout), request.retry) {
            (Ok(answer), _) => Verdict::NoChange(format!(
                "probed {what}: {}, expectations hold",
                answer.status
            )),
            (Err(why), Some((window, _))) => Verdict::NoChange(format!(
                "probed {what}: {why} (the step waits up to {} for it)",
                humantime::format_duration(window)
            )),
            (Err(why), None) => Verdict::WouldFail(format!("probed {what}: {why}")),
        }
    }

    fn execute(&self, args: &HttpArgs, ctx: &ActionCtx) -> Result<Outputs, ActionError> {
        let request = Prepared::new(args).map_err(ActionError::Failed)?;
        let client = request.client().map_err(ActionError::Failed)?;
        let what = request.describe();
        let started = Instant::now();
        let give_up = request.retry.map(|(window, _)| started + window);
        let mut tries = 0u32;
        loop {
            tries += 1;
            let now = Instant::now();
            let mut timeout = request.timeout;
            for end in [give_up, ctx.deadline].into_iter().flatten() {
                timeout = timeout.min(end.saturating_duration_since(now));
            }
            if ctx.deadline.is_some_and(|d| now >= d) {
                return Err(ActionError::TimedOut(started.elapsed()));
            }
            let result = if timeout.is_zero() {
                Err(format!(
                    "no time left for a request (waited {})",
                    humantime::format_duration(round(started.elapsed()))
                ))
            } else {
                request.attempt(&client, timeout)
            };
            match result {
                Ok(answer) => {
                    let mut out = Outputs::new();
                    out.insert("status".into(), json!(answer.status));
                    out.insert(
                        "duration".into(),
                        json!((started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0),
                    );
                    out.insert("body".into(), answer.body);
                    for (name, value) in answer.named {
                        out.insert(name, value);
                    }
                    return Ok(out);
                }
                Err(why) => {
                    let Some((window, every)) = request.retry else {
                        return Err(ActionError::Failed(format!("{what}: {why}")));
                    };
                    let wake = Instant::now() + every;
                    let past = |limit: Option<Instant>| limit.is_some_and(|l| wake >= l);
                    if past(give_up) || past(ctx.deadline) {
                        return Err(ActionError::Failed(format!(
                            "{what}: not healthy after waiting {} ({tries} tries, every {}; until_healthy is {}); last answer: {why}",
                            humantime::format_duration(round(started.elapsed())),
                            humantime::format_duration(every),
                            humantime::format_duration(window),
                        )));
                    }
                    std::thread::sleep(every);
                }
            }
        }
    }

    fn reconcile(&self, args: &HttpArgs, _: &ActionCtx) -> Reconcile {
        match parse_method(&args.method) {
            Ok(m) if read_only(&m) => Reconcile::Rerun,
            _ => Reconcile::AskOperator(format!(
                "`{} {}` is not idempotent",
                args.method.to_ascii_uppercase(),
                args.url
            )),
        }
    }
}

/// Check a service with a request that only reads (`GET` or `HEAD`): the same
/// expectations, outputs and `retry.until_healthy` as `http`, and always read-only, so
/// `plan --probe` sends it and `resume` sends it again. For requests that change
/// things, use `http`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpCheckArgs {
    /// `GET` (default) or `HEAD`.
    #[serde(default)]
    pub method: CheckMethod,
    /// The URL, `http://` or `https://` (TLS certificates are verified).
    pub url: String,
    /// Request headers (values may hold secrets: they are masked everywhere).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Give up on one request after this long (default `30s`).
    #[serde(default)]
    pub timeout: Option<String>,
    /// What the answer must be; by default any 2xx status.
    #[serde(default)]
    pub expect: HttpExpect,
    /// Named values read from the JSON answer by jq expressions (as `http`'s).
    #[serde(default)]
    pub outputs: IndexMap<String, String>,
    /// Try again until the expectations hold: `{until_healthy: 60s, every: 2s}`.
    #[serde(default)]
    pub retry: Option<HttpRetry>,
    /// Accept any TLS certificate (a test service with a self-signed one only).
    #[serde(default)]
    pub insecure: bool,
}

/// The methods a check may send: those that only read.
#[derive(Debug, Clone, Copy, Default, Deserialize, JsonSchema)]
pub enum CheckMethod {
    #[default]
    #[serde(rename = "GET", alias = "get")]
    Get,
    #[serde(rename = "HEAD", alias = "head")]
    Head,
}

impl CheckMethod {
    fn as_str(self) -> &'static str {
        match self {
            CheckMethod::Get => "GET",
            CheckMethod::Head => "HEAD",
        }
    }
}

impl HttpCheckArgs {
    /// The same request as an `http` step: one implementation of sending and checking.
    fn as_http(&self) -> HttpArgs {
        HttpArgs {
            method: self.method.as_str().to_string(),
            url: self.url.clone(),
            headers: self.headers.clone(),
            json: None,
            json_text: None,
            timeout: self.timeout.clone(),
            expect: self.expect.clone(),
            outputs: self.outputs.clone(),
            retry: self.retry.clone(),
            writes: Some(Vec::new()),
            insecure: self.insecure,
        }
    }
}

pub struct HttpCheck;

impl Action for HttpCheck {
    type Args = HttpCheckArgs;
    const NAME: &'static str = "http-check";
    const OUTPUTS: &'static [&'static str] = FIXED_OUTPUTS;
    const SUMMARY: &'static str = "check a service with a GET or HEAD: status and jq expectations, named outputs, wait until healthy; read-only (plan --probe sends it, resume sends it again)";

    fn effect(&self, _: &HttpCheckArgs) -> Effect {
        Effect::ReadOnly
    }

    fn extra_outputs(&self, args: &HttpCheckArgs) -> Vec<String> {
        args.outputs.keys().cloned().collect()
    }

    fn check_static(&self, args: &HttpCheckArgs) -> Result<(), (String, String)> {
        Http.check_static(&args.as_http())
    }

    fn preflight(&self, args: &HttpCheckArgs, world: &mut World, ctx: &ActionCtx) -> Verdict {
        Http.preflight(&args.as_http(), world, ctx)
    }

    fn execute(&self, args: &HttpCheckArgs, ctx: &ActionCtx) -> Result<Outputs, ActionError> {
        Http.execute(&args.as_http(), ctx)
    }

    fn reconcile(&self, _: &HttpCheckArgs, _: &ActionCtx) -> Reconcile {
        Reconcile::Rerun
    }
}

/// A duration to the millisecond, for messages.
fn round(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(yaml: &str) -> HttpArgs {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn static_checks_name_the_field() {
        let check = |y: &str| Http.check_static(&args(y)).map_err(|(f, _)| f);
        assert_eq!(check("url: http://h/x"), Ok(()));
        assert_eq!(check("url: ftp://h/x"), Err("url".into()));
        assert_eq!(
            check("{url: 'http://h/x', method: FETCH}"),
            Err("method".into())
        );
        assert_eq!(
            check("{url: 'http://h', expect: {jq: ['.a', '.b |']}}"),
            Err("expect.jq[1]".into())
        );
        assert_eq!(
            check("{url: 'http://h', outputs: {status: .s}}"),
            Err("outputs.status".into())
        );
        assert_eq!(
            check("{url: 'http://h', json_text: '{\"a\": {{ x | tojson }}}'}"),
            Ok(())
        );
        assert_eq!(
            check("{url: 'http://h', json_text: '{\"a\": }'}"),
            Err("json_text".into())
        );
        assert_eq!(
            check("{url: 'http://h', retry: {until_healthy: soon}}"),
            Err("retry.until_healthy".into())
        );
    }

    #[test]
    fn header_errors_never_show_the_value() {
        let e = parse_header("Authorization", "Bearer secret\nvalue").unwrap_err();
        assert_eq!(
            e,
            "the value of header `Authorization` is not a valid header value"
        );
    }

    #[test]
    fn the_request_is_described_with_its_body_size() {
        let r = Prepared::new(&args(
            "{method: post, url: 'http://h:1/admin/backup', json: {include_chroma: false}}",
        ))
        .unwrap();
        assert_eq!(
            r.describe(),
            "POST http://h:1/admin/backup with a 24-byte JSON body"
        );
        assert_eq!(
            Http.effect(&args("{method: post, url: 'http://h'}")),
            Effect::NotIdempotent
        );
        assert_eq!(Http.effect(&args("{url: 'http://h'}")), Effect::ReadOnly);
    }
}
