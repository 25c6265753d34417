//! The HTTP/1.1 server the testkit programs share (`http-serve`, `atocore-standin`):
//! reading a request, a route table, writing the answer. One thread and one request
//! per connection (`Connection: close`); bodies need a `Content-Length`.
//!
//! To serve something, implement [`Handler`] (a closure `Fn(&Request) -> Response`
//! will do) and add it with [`Router::add`].

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

impl<F: Fn(&Request) -> Response + Send + Sync> Handler for F {
    fn respond(&self, request: &Request) -> Response {
        self(request)
    }
}

struct Route {
    method: String,
    pattern: Vec<String>,
    handler: Box<dyn Handler>,
}

/// The route table, and (when recording) the log of requests.
#[derive(Default)]
pub struct Router {
    routes: Vec<Route>,
    /// Some: every request is kept and `GET /__requests` answers them.
    log: Option<Mutex<Vec<Json>>>,
}

fn segments(path: &str) -> Vec<String> {
    path.split('/')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

impl Router {
    /// A router that keeps every request and answers them at `GET /__requests`.
    pub fn recording() -> Router {
        Router {
            routes: Vec::new(),
            log: Some(Mutex::new(Vec::new())),
        }
    }

    pub fn add(&mut self, method: &str, pattern: &str, handler: Box<dyn Handler>) {
        self.routes.push(Route {
            method: method.to_ascii_uppercase(),
            pattern: segments(pattern),
            handler,
        });
    }

    /// Wraps the handler of the last route added.
    pub fn wrap_last(
        &mut self,
        wrap: impl FnOnce(Box<dyn Handler>) -> Box<dyn Handler>,
    ) -> Result<(), String> {
        let route = self
            .routes
            .last_mut()
            .ok_or("--fail-first and --delay follow a --route")?;
        let placeholder: Box<dyn Handler> = Box::new(|_: &Request| Response::text(500, ""));
        let inner = std::mem::replace(&mut route.handler, placeholder);
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
        if let Some(log) = &self.log {
            if request.method == "GET" && request.path == "/__requests" {
                let log = log.lock().map(|l| l.clone()).unwrap_or_default();
                return Response::json(200, &Json::Array(log));
            }
            if let Ok(mut log) = log.lock() {
                log.push(request.to_json());
            }
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
        422 => "Unprocessable Content",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// Reads one request; Err is the answer to a request that could not be read.
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

/// Answers one connection; with `log`, one line per request to stderr, headed `log`.
fn handle(router: &Router, mut stream: TcpStream, log: Option<&str>) {
    let started = Instant::now();
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let (line, response) = match read_request(&stream) {
        Ok(request) => {
            let line = format!("{} {}", request.method, request.path);
            (line, router.dispatch(request))
        }
        Err(response) => ("(unreadable request)".to_string(), response),
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
    if let Some(prefix) = log {
        eprintln!(
            "{prefix}: {line} -> {} ({:.1} ms)",
            response.status,
            started.elapsed().as_secs_f64() * 1000.0
        );
    }
}

/// Binds `addr` (`127.0.0.1:0` picks a free port) and prints `listening on ADDR` as
/// the first line on stdout.
pub fn bind(addr: &str) -> Result<TcpListener, String> {
    let listener = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening on {bound}")
        .and_then(|()| out.flush())
        .map_err(|e| e.to_string())?;
    Ok(listener)
}

/// Serves `router` on `listener` until the process ends; with `log`, one line per
/// request to stderr, headed `log`.
pub fn serve(listener: TcpListener, router: Router, log: Option<&'static str>) {
    let router = Arc::new(router);
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let router = router.clone();
        std::thread::spawn(move || handle(&router, stream, log));
    }
}

/// `humantime` durations (`500ms`, `2s`, `1m`) for the programs' flags.
pub fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("`{text}` is not a duration: {e}"))
}
