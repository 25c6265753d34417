//! `http-serve`: a small HTTP/1.1 server on 127.0.0.1 that answers JSON from a route
//! table, for tests of the `http` action (and, later, a stand-in AtoCore service).
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
//! Each connection gets its own thread and one request (`Connection: close`).
//! To serve something new, implement [`Handler`] and add it with [`Router::add`].

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value as Json, json};

/// A request as the server read it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// The path without the query string.
    pub path: String,
    pub query: String,
    /// Header names in lower case, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Values of the `{name}` segments of the matched route.
    pub params: BTreeMap<String, String>,
}

impl Request {
    /// The request as JSON, as `/__requests` and `@echo` show it.
    pub fn to_json(&self) -> Json {
        let headers: serde_json::Map<String, Json> = self
            .headers
            .iter()
            .map(|(n, v)| (n.clone(), Json::String(v.clone())))
            .collect();
        json!({
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": headers,
            "body": String::from_utf8_lossy(&self.body),
        })
    }
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(status: u16, body: &Json) -> Response {
        Response {
            status,
            content_type: "application/json",
            body: body.to_string().into_bytes(),
        }
    }

    pub fn text(status: u16, body: &str) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.as_bytes().to_vec(),
        }
    }
}

/// What answers a route.
pub trait Handler: Send + Sync {
    fn respond(&self, request: &Request) -> Response;
}

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

struct Route {
    method: String,
    pattern: Vec<String>,
    handler: Box<dyn Handler>,
}

/// The route table and the log of requests.
#[derive(Default)]
pub struct Router {
    routes: Vec<Route>,
    log: Mutex<Vec<Json>>,
}

fn segments(path: &str) -> Vec<String> {
    path.split('/')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

impl Router {
    pub fn add(&mut self, method: &str, pattern: &str, handler: Box<dyn Handler>) {
        self.routes.push(Route {
            method: method.to_ascii_uppercase(),
            pattern: segments(pattern),
            handler,
        });
    }

    /// Wraps the handler of the last route added.
    fn wrap_last(
        &mut self,
        wrap: impl FnOnce(Box<dyn Handler>) -> Box<dyn Handler>,
    ) -> Result<(), String> {
        let route = self
            .routes
            .last_mut()
            .ok_or("--fail-first and --delay follow a --route")?;
        let inner = std::mem::replace(&mut route.handler, Box::new(Echo));
        route.handler = wrap(inner);
        Ok(())
    }

    fn matches(pattern: &[String], path: &[String]) -> Option<BTreeMap<String, String>> {
        if pattern.len() != path.len() {
            return None;
        }
        let mut params = BTreeMap::new();
        for (p, s) in pattern.iter().zip(path) {
            match p.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                Some(name) => {
                    params.insert(name.to_string(), s.clone());
                }
                None if p == s => {}
                None => return None,
            }
        }
        Some(params)
    }

    pub fn dispatch(&self, mut request: Request) -> Response {
        if request.method == "GET" && request.path == "/__requests" {
            let log = self.log.lock().map(|l| l.clone()).unwrap_or_default();
            return Response::json(200, &Json::Array(log));
        }
        if let Ok(mut log) = self.log.lock() {
            log.push(request.to_json());
        }
        let path = segments(&request.path);
        let mut allowed = Vec::new();
        for route in &self.routes {
            if let Some(params) = Self::matches(&route.pattern, &path) {
                if route.method == request.method {
                    request.params = params;
                    return route.handler.respond(&request);
                }
                allowed.push(route.method.clone());
            }
        }
        if allowed.is_empty() {
            Response::json(404, &json!({"error": "not found", "path": request.path}))
        } else {
            Response::json(
                405,
                &json!({"error": "method not allowed", "allowed": allowed}),
            )
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// Reads one request; None when the peer sent nothing usable.
fn read_request(stream: &TcpStream) -> Result<Request, Response> {
    let bad = |why: &str| Response::json(400, &json!({"error": why}));
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .map_err(|_| bad("unreadable request line"))?;
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Err(bad("malformed request line"));
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut headers = Vec::new();
    let mut total = line.len();
    loop {
        let mut h = String::new();
        let n = reader
            .read_line(&mut h)
            .map_err(|_| bad("unreadable header"))?;
        total += n;
        if total > 64 << 10 {
            return Err(bad("headers too long"));
        }
        let h = h.trim_end_matches(['\r', '\n']);
        if n == 0 || h.is_empty() {
            break;
        }
        if let Some((name, value)) = h.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    if header("transfer-encoding").is_some() {
        return Err(Response::json(
            411,
            &json!({"error": "send a Content-Length"}),
        ));
    }
    let len: usize = header("content-length")
        .map(|v| v.parse().map_err(|_| bad("bad Content-Length")))
        .transpose()?
        .unwrap_or(0);
    if len > 16 << 20 {
        return Err(Response::json(413, &json!({"error": "body too large"})));
    }
    let mut body = vec![0; len];
    reader
        .read_exact(&mut body)
        .map_err(|_| bad("body shorter than Content-Length"))?;
    Ok(Request {
        method: method.to_ascii_uppercase(),
        path: path.to_string(),
        query: query.to_string(),
        headers,
        body,
        params: BTreeMap::new(),
    })
}

fn handle(router: &Router, mut stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let response = match read_request(&stream) {
        Ok(request) => router.dispatch(request),
        Err(response) => response,
    };
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len()
    );
    let _ = stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(&response.body))
        .and_then(|()| stream.flush());
}

/// Binds 127.0.0.1:`port`, prints `listening on ...`, and serves until the process
/// ends.
pub fn serve(router: Router, port: u16, exit_after: Duration) -> Result<(), String> {
    let listener =
        TcpListener::bind(("127.0.0.1", port)).map_err(|e| format!("bind port {port}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {addr}")
            .and_then(|()| out.flush())
            .map_err(|e| e.to_string())?;
    }
    std::thread::spawn(move || {
        std::thread::sleep(exit_after);
        std::process::exit(0);
    });
    let router = Arc::new(router);
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let router = router.clone();
        std::thread::spawn(move || handle(&router, stream));
    }
    Ok(())
}

fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("`{text}` is not a duration: {e}"))
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
    let mut router = Router::default();
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
    serve(router, port, exit_after)
}
