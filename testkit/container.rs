//! Programs for the test container image (`FROM scratch`: no shell, no coreutils).
//!
//! `health-serve`: the smallest stand-in for a containerised service. A HTTP/1.1 server
//! (std::net only) answering `GET /health` with `{"status":"ok"}`, that exits 0 on
//! SIGTERM or SIGINT, so that it can be PID 1 of a `FROM scratch` container and
//! `docker stop` takes milliseconds, not the 10 s grace period.
//!
//!   health-serve [--bind ADDR] [--port N] [--term-delay-ms N] [--term-mark PATH]
//!
//! `--term-delay-ms` waits that long after the signal before exiting (a slow shutdown,
//! for tests that must act while a stop is in progress); `--term-mark` creates that
//! file when the signal arrives (the test sees it through a bind mount).
//!
//! `health-check URL`: GET `http://HOST:PORT/PATH`; exits 0 when the answer is 200.
//! Small enough to be a container's `healthcheck` in an image without a shell or curl.
//!
//! `wait-file PATH`: creates `PATH.waiting`, then waits until PATH exists and prints
//! `released` (a step that lasts until the test lets it go, seen through a bind mount).
//!
//! `print-env NAME...`: prints `NAME=value` (or `NAME unset`) for each name.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

static TERM: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: libc::c_int) {
    TERM.store(true, Ordering::SeqCst);
}

pub fn serve(args: &[String]) -> Result<(), String> {
    let mut bind = "0.0.0.0".to_string();
    let mut port: u16 = 8080;
    let mut term_delay = Duration::ZERO;
    let mut term_mark: Option<String> = None;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("`{flag}` needs a value"))
        };
        match flag.as_str() {
            "--bind" => bind = value()?,
            "--port" => port = value()?.parse().map_err(|e| format!("--port: {e}"))?,
            "--term-delay-ms" => {
                term_delay = Duration::from_millis(
                    value()?
                        .parse()
                        .map_err(|e| format!("--term-delay-ms: {e}"))?,
                )
            }
            "--term-mark" => term_mark = Some(value()?),
            other => return Err(format!("unknown option `{other}`")),
        }
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_term as *const () as libc::sighandler_t);
    }
    let listener =
        TcpListener::bind((bind.as_str(), port)).map_err(|e| format!("bind {bind}:{port}: {e}"))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("set_nonblocking: {e}"))?;
    println!(
        "health-serve listening on {}",
        listener.local_addr().unwrap()
    );
    loop {
        if TERM.load(Ordering::SeqCst) {
            if let Some(mark) = &term_mark {
                std::fs::write(mark, b"term\n").map_err(|e| format!("write {mark}: {e}"))?;
            }
            std::thread::sleep(term_delay);
            println!("health-serve: terminated");
            return Ok(());
        }
        match listener.accept() {
            Ok((stream, _)) => {
                // One bad client must not take the service down.
                if let Err(e) = answer(stream) {
                    eprintln!("health-serve: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("accept: {e}")),
        }
    }
}

fn answer(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let request = String::from_utf8_lossy(&request);
    let mut first = request.lines().next().unwrap_or("").split_whitespace();
    let (status, body) = match (first.next(), first.next()) {
        (Some("GET"), Some("/health")) => ("200 OK", r#"{"status":"ok"}"#),
        (Some("GET"), Some(_)) => ("404 Not Found", r#"{"error":"not found"}"#),
        _ => ("405 Method Not Allowed", r#"{"error":"only GET"}"#),
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

pub fn check(args: &[String]) -> Result<(), String> {
    let [url] = args else {
        return Err("usage: health-check http://HOST:PORT/PATH".into());
    };
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("`{url}` is not an http:// URL"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr: SocketAddr = authority
        .to_socket_addrs()
        .map_err(|e| format!("{authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority}: no address"))?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("send: {e}"))?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| format!("read: {e}"))?;
    let status = response.lines().next().unwrap_or("");
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("");
    println!("{body}");
    if status.split_whitespace().nth(1) == Some("200") {
        Ok(())
    } else {
        Err(format!("{url} answered `{status}`"))
    }
}

pub fn wait_file(args: &[String]) -> Result<(), String> {
    let [path] = args else {
        return Err("usage: wait-file PATH".into());
    };
    let waiting = format!("{path}.waiting");
    std::fs::write(&waiting, b"").map_err(|e| format!("write {waiting}: {e}"))?;
    while !std::path::Path::new(path).exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("released");
    Ok(())
}

pub fn print_env(args: &[String]) -> Result<(), String> {
    for name in args {
        match std::env::var(name) {
            Ok(v) => println!("{name}={v}"),
            Err(_) => println!("{name} unset"),
        }
    }
    Ok(())
}
