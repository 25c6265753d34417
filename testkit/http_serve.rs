//! `http-serve`: a small HTTP/1.1 server on 127.0.0.1 that answers JSON from a route
//! table, for tests of the `http` action.
//!
//! ```text
//! runbook-testkit http-serve [--port N] [--exit-after DURATION]
//!     [--route METHOD PATH STATUS BODY [--fail-first N] [--delay DURATION]]...
//! ```
//!
//! - `--port 0` (the default) picks a free port. The first line on stdout is always
//!   `listening on 127.0.0.1:PORT`.
//! - `--route GET /health 200 '{"status":"ok"}'`: BODY is JSON text (sent as
//!   `application/json`), `@echo` (answers `{method, path, query, headers, body, json}`
//!   of the request it got), or `@text:...` (sent as `text/plain`). A PATH segment
//!   `{name}` matches any one segment (`/admin/backup/{stamp}/validate`).
//! - `--fail-first N` (after a route): its first N requests get
//!   `503 {"status":"starting"}`, then it answers as declared.
//! - `--delay DURATION` (after a route): it waits this long before answering.
//! - `GET /__requests` (built in) answers every request received so far (not counting
//!   itself), oldest first, each `{method, path, query, headers, body}`; a request is
//!   recorded as soon as it has been read, before its route answers.
//! - The server exits by itself after `--exit-after` (default 60s), so a test that
//!   crashed never leaves it behind.
//!
//! The server itself (request parsing, routes, answers) is `crate::http`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value as Json, json};

use crate::http::{self, Handler, Request, Response, Router, duration};

/// The same answer every time.
pub struct Fixed(pub Response);

impl Handler for Fixed {
    fn respond(&self, _: &Request) -> Response {
        self.0.clone()
    }
}

/// Answers with the request it got, parsed body included (`json`, null if not JSON).
pub struct Echo;

impl Handler for Echo {
    fn respond(&self, request: &Request) -> Response {
        let mut doc = request.to_json();
        doc["json"] = serde_json::from_slice(&request.body).unwrap_or(Json::Null);
        doc["params"] = json!(request.params);
        Response::json(200, &doc)
    }
}

/// `503 {"status":"starting"}` for the first `n` requests, then `inner`.
pub struct FailFirst {
    pub n: u64,
    pub hits: AtomicU64,
    pub inner: Box<dyn Handler>,
}

impl Handler for FailFirst {
    fn respond(&self, request: &Request) -> Response {
        if self.hits.fetch_add(1, Ordering::SeqCst) < self.n {
            Response::json(503, &json!({"status": "starting"}))
        } else {
            self.inner.respond(request)
        }
    }
}

/// Waits, then answers as `inner`.
pub struct Delay {
    pub delay: Duration,
    pub inner: Box<dyn Handler>,
}

impl Handler for Delay {
    fn respond(&self, request: &Request) -> Response {
        std::thread::sleep(self.delay);
        self.inner.respond(request)
    }
}

fn body_handler(status: u16, body: &str) -> Result<Box<dyn Handler>, String> {
    if body == "@echo" {
        return Ok(Box::new(Echo));
    }
    if let Some(text) = body.strip_prefix("@text:") {
        return Ok(Box::new(Fixed(Response::text(status, text))));
    }
    let doc: Json =
        serde_json::from_str(body).map_err(|e| format!("route body `{body}` is not JSON: {e}"))?;
    Ok(Box::new(Fixed(Response::json(status, &doc))))
}

pub fn main(args: &[String]) -> Result<(), String> {
    let mut router = Router::recording();
    let mut port = 0u16;
    let mut exit_after = Duration::from_secs(60);
    let mut rest = args.iter();
    let mut next = |what: &str| {
        rest.next()
            .cloned()
            .ok_or_else(|| format!("{what} is missing"))
    };
    while let Ok(flag) = next("") {
        match flag.as_str() {
            "--port" => {
                port = next("--port N")?
                    .parse()
                    .map_err(|e| format!("--port: {e}"))?;
            }
            "--exit-after" => exit_after = duration(&next("--exit-after DURATION")?)?,
            "--route" => {
                let method = next("--route METHOD")?;
                let path = next("--route METHOD PATH")?;
                let status: u16 = next("--route METHOD PATH STATUS")?
                    .parse()
                    .map_err(|e| format!("--route status: {e}"))?;
                let body = next("--route METHOD PATH STATUS BODY")?;
                router.add(&method, &path, body_handler(status, &body)?);
            }
            "--fail-first" => {
                let n: u64 = next("--fail-first N")?
                    .parse()
                    .map_err(|e| format!("--fail-first: {e}"))?;
                router.wrap_last(|inner| {
                    Box::new(FailFirst {
                        n,
                        hits: AtomicU64::new(0),
                        inner,
                    })
                })?;
            }
            "--delay" => {
                let delay = duration(&next("--delay DURATION")?)?;
                router.wrap_last(|inner| Box::new(Delay { delay, inner }))?;
            }
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    let listener = http::bind(&format!("127.0.0.1:{port}"))?;
    std::thread::spawn(move || {
        std::thread::sleep(exit_after);
        std::process::exit(0);
    });
    http::serve(listener, router, None);
    Ok(())
}
