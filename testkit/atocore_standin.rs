//! `atocore-standin`: a stand-in for the AtoCore service that answers the endpoints the
//! backup and restore procedure checks, from the files it is given. The database is
//! opened read-only for each request, so a bad restore really fails verification.
//!
//! ```text
//! runbook-testkit atocore-standin --root ATOCORE_ROOT --listen 127.0.0.1:PORT
//!     [--exit-after DURATION] [--ingest-every DURATION]
//! ```
//!
//! - `GET /health`: 200 `{"status": "ok", "documents": N}` when the database opens,
//!   `PRAGMA quick_check` says ok, and the registry parses; else 503
//!   `{"status": "degraded", "errors": [...], "details": [...]}` with errors among
//!   `db_missing`, `db_open_failed`, `db_integrity_check_failed`, `db_query_failed`,
//!   `registry_missing`, `registry_invalid_json`, `registry_invalid`.
//! - `GET /stats`: `{"documents", "chunks", "projects", "vectors"}` (vectors: rows of
//!   `chroma.sqlite3`'s `embeddings`, 0 when it is missing); 503 as above when the
//!   database cannot be read.
//! - `GET /projects`: `{"projects": [...]}` from the registry file.
//! - `POST /context/build` `{"prompt": "...", "project": "..."}`: the prompt's toy
//!   embedding against the vectors of the vector store, best first (ties by chunk id);
//!   vector results whose chunk is not in the SQL store (or not in the project) are
//!   dropped, as the retriever's `_existing_chunk_ids` filter does; at most 8 are used.
//!   Answers `{"project", "chunks_used", "chunks": [{"id", "text", "document_id",
//!   "source_path", "score"}], "stale_vectors_dropped"}`; an unknown project is 404.
//! - `--ingest-every D`: every D, take an exclusive flock on `data/ingestion.lock`
//!   (waiting for whoever holds it), add one document of 3 chunks in one transaction
//!   and their vectors to the vector store, then release the lock.
//! - The first line on stdout is `listening on ADDR`; one line per request goes to
//!   stderr. SIGTERM or SIGINT (or `--exit-after`) stops it with status 0, after an
//!   ingestion in progress has finished.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension};
use serde_json::{Value as Json, json};

use crate::atocore::{self, Layout, Rng};
use crate::http::{self, Request, Response, Router, duration};

/// Chunks a context is built from, at most.
const MAX_CHUNKS: usize = 8;
/// Chunks of each ingested document.
const INGEST_CHUNKS: usize = 3;
const NAME: &str = "atocore-standin";

struct Options {
    root: std::path::PathBuf,
    listen: String,
    exit_after: Option<Duration>,
    ingest_every: Option<Duration>,
}

fn parse(args: &[String]) -> Result<Options, String> {
    const USAGE: &str = "usage: atocore-standin --root ATOCORE_ROOT --listen 127.0.0.1:PORT [--exit-after DURATION] [--ingest-every DURATION]";
    let mut root = None;
    let mut listen = None;
    let mut exit_after = None;
    let mut ingest_every = None;
    let mut rest = args.iter();
    while let Some(flag) = rest.next() {
        let mut value = || {
            rest.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value; {USAGE}"))
        };
        match flag.as_str() {
            "--root" => root = Some(std::path::PathBuf::from(value()?)),
            "--listen" => listen = Some(value()?),
            "--exit-after" => exit_after = Some(duration(&value()?)?),
            "--ingest-every" => {
                let every = duration(&value()?)?;
                if every.is_zero() {
                    return Err("--ingest-every must be longer than 0".into());
                }
                ingest_every = Some(every);
            }
            other => return Err(format!("unknown argument `{other}`; {USAGE}")),
        }
    }
    Ok(Options {
        root: root.ok_or(USAGE)?,
        listen: listen.ok_or(USAGE)?,
        exit_after,
        ingest_every,
    })
}

pub fn main(args: &[String]) -> Result<(), String> {
    let opts = parse(args)?;
    // Before any thread starts, so every thread inherits the handler's mask.
    let stop_signals = install_stop_handler()?;
    let standin = Arc::new(Standin {
        layout: Layout::new(&opts.root),
        ingesting: Mutex::new(()),
    });
    let listener = http::bind(&opts.listen)?;
    eprintln!(
        "{NAME}: serving {} on {}",
        opts.root.display(),
        listener.local_addr().map_err(|e| e.to_string())?
    );
    {
        let standin = standin.clone();
        std::thread::spawn(move || {
            let mut signal = [0u8; 1];
            let mut pipe = stop_signals;
            let why = match pipe.read(&mut signal) {
                Ok(1) if i32::from(signal[0]) == libc::SIGINT => "SIGINT",
                Ok(1) => "SIGTERM",
                _ => "signal pipe closed",
            };
            standin.stop(why);
        });
    }
    if let Some(after) = opts.exit_after {
        let standin = standin.clone();
        std::thread::spawn(move || {
            std::thread::sleep(after);
            standin.stop("--exit-after");
        });
    }
    if let Some(every) = opts.ingest_every {
        let standin = standin.clone();
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(every);
                standin.ingest_once();
            }
        });
    }
    let mut router = Router::default();
    let s = standin.clone();
    router.add("GET", "/health", Box::new(move |_: &Request| s.health()));
    let s = standin.clone();
    router.add("GET", "/stats", Box::new(move |_: &Request| s.stats()));
    let s = standin.clone();
    router.add(
        "GET",
        "/projects",
        Box::new(move |_: &Request| s.projects()),
    );
    let s = standin;
    router.add(
        "POST",
        "/context/build",
        Box::new(move |r: &Request| s.context_build(r)),
    );
    http::serve(listener, router, Some(NAME));
    Ok(())
}

// ---------------------------------------------------------------------------------
// Stopping on SIGTERM / SIGINT: the handler writes the signal's number to a pipe; a
// thread reads it and stops (a handler is needed: as PID 1 in a container, a signal
// without one is ignored).

static STOP_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_stop_signal(signal: libc::c_int) {
    let byte = signal as u8;
    // SAFETY: write(2) is async-signal-safe; the fd is the pipe's write end, open for
    // the life of the process.
    unsafe {
        libc::write(
            STOP_PIPE.load(Ordering::Relaxed),
            (&raw const byte).cast(),
            1,
        )
    };
}

/// Installs the handler for SIGTERM and SIGINT; returns the pipe's read end.
pub(crate) fn install_stop_handler() -> Result<File, String> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    STOP_PIPE.store(fds[1], Ordering::SeqCst);
    let handler: extern "C" fn(libc::c_int) = on_stop_signal;
    // SAFETY: a zeroed sigaction is valid; the handler only calls write(2); the sets
    // are initialised by sigemptyset before use.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&raw mut action.sa_mask);
        let mut unblock: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut unblock);
        for signal in [libc::SIGTERM, libc::SIGINT] {
            if libc::sigaction(signal, &raw const action, std::ptr::null_mut()) != 0 {
                return Err(format!("sigaction: {}", std::io::Error::last_os_error()));
            }
            libc::sigaddset(&raw mut unblock, signal);
        }
        // A parent may have started us with them blocked.
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &raw const unblock, std::ptr::null_mut());
        Ok(File::from_raw_fd(fds[0]))
    }
}

// ---------------------------------------------------------------------------------

struct Standin {
    layout: Layout,
    /// Held while an ingestion writes, so stopping waits for it to finish.
    ingesting: Mutex<()>,
}

/// What one ingestion added to the SQL store.
struct Ingested {
    document: i64,
    project: String,
    /// (chunk id, text)
    chunks: Vec<(i64, String)>,
}

/// An error string of the procedure's kind and a sentence for people.
type Problem = (&'static str, String);

fn degraded(problems: Vec<Problem>) -> Response {
    let (errors, details): (Vec<_>, Vec<_>) = problems.into_iter().unzip();
    Response::json(
        503,
        &json!({"status": "degraded", "errors": errors, "details": details}),
    )
}

impl Standin {
    /// Waits for an ingestion in progress, then ends the process (status 0).
    fn stop(&self, why: &str) -> ! {
        let _idle = self.ingesting.lock().unwrap_or_else(|e| e.into_inner());
        eprintln!("{NAME}: stopping ({why})");
        std::process::exit(0);
    }

    /// The database, read-only; it is never created.
    fn open_db(&self) -> Result<Connection, Problem> {
        let db = self.layout.db();
        if !db.is_file() {
            return Err(("db_missing", format!("{} does not exist", db.display())));
        }
        let conn = Connection::open_with_flags(
            &db,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| ("db_open_failed", format!("{}: {e}", db.display())))?;
        let _ = conn.busy_timeout(Duration::from_secs(5));
        Ok(conn)
    }

    fn query_failed(&self, e: rusqlite::Error) -> Problem {
        (
            "db_query_failed",
            format!("{}: {e}", self.layout.db().display()),
        )
    }

    /// `PRAGMA quick_check`, then the number of documents.
    fn check_db(&self) -> Result<i64, Problem> {
        let conn = self.open_db()?;
        let db = self.layout.db();
        let failed = |why: String| {
            (
                "db_integrity_check_failed",
                format!("{}: {why}", db.display()),
            )
        };
        let rows: Vec<String> = conn
            .prepare("PRAGMA quick_check")
            .and_then(|mut s| {
                s.query_map([], |r| r.get::<_, String>(0))?
                    .collect::<rusqlite::Result<_>>()
            })
            .map_err(|e| failed(e.to_string()))?;
        if rows != ["ok"] {
            return Err(failed(rows.join("; ")));
        }
        conn.query_row("SELECT count(*) FROM documents", [], |r| r.get(0))
            .map_err(|e| self.query_failed(e))
    }

    /// The registry's project list.
    fn registry(&self) -> Result<Vec<Json>, Problem> {
        let path = self.layout.registry();
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err((
                    "registry_missing",
                    format!("{} does not exist", path.display()),
                ));
            }
            Err(e) => return Err(("registry_missing", format!("{}: {e}", path.display()))),
        };
        let doc: Json = serde_json::from_slice(&text)
            .map_err(|e| ("registry_invalid_json", format!("{}: {e}", path.display())))?;
        match doc.get("projects") {
            Some(Json::Array(list)) => Ok(list.clone()),
            _ => Err((
                "registry_invalid",
                format!("{} has no `projects` list", path.display()),
            )),
        }
    }

    fn health(&self) -> Response {
        let mut problems = Vec::new();
        let documents = self.check_db().map_err(|p| problems.push(p)).ok();
        let _ = self.registry().map_err(|p| problems.push(p));
        match documents {
            Some(n) if problems.is_empty() => {
                Response::json(200, &json!({"status": "ok", "documents": n}))
            }
            _ => degraded(problems),
        }
    }

    /// Rows of the vector store's `embeddings`; 0 when it is missing or unreadable.
    fn vector_rows(&self) -> i64 {
        self.open_chroma()
            .and_then(|c| {
                c.query_row("SELECT count(*) FROM embeddings", [], |r| r.get(0))
                    .ok()
            })
            .unwrap_or(0)
    }

    fn open_chroma(&self) -> Option<Connection> {
        let path = self.layout.chroma_db();
        if !path.is_file() {
            return None;
        }
        Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .ok()
    }

    fn stats(&self) -> Response {
        let counts = self.open_db().and_then(|conn| {
            conn.query_row(
                "SELECT (SELECT count(*) FROM documents), (SELECT count(*) FROM chunks),
                        (SELECT count(*) FROM projects)",
                [],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                },
            )
            .map_err(|e| self.query_failed(e))
        });
        match counts {
            Ok((documents, chunks, projects)) => Response::json(
                200,
                &json!({
                    "documents": documents,
                    "chunks": chunks,
                    "projects": projects,
                    "vectors": self.vector_rows(),
                }),
            ),
            Err(p) => degraded(vec![p]),
        }
    }

    fn projects(&self) -> Response {
        match self.registry() {
            Ok(list) => Response::json(200, &json!({ "projects": list })),
            Err(p) => degraded(vec![p]),
        }
    }

    /// The vector store's vectors: rows of `embeddings` whose record is in their
    /// segment's files. Missing parts give no vectors.
    fn vectors(&self) -> Vec<(i64, [f32; atocore::DIM])> {
        let Some(chroma) = self.open_chroma() else {
            return Vec::new();
        };
        let rows: Vec<(i64, String)> = chroma
            .prepare("SELECT chunk_id, segment FROM embeddings")
            .and_then(|mut s| {
                s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<rusqlite::Result<_>>()
            })
            .unwrap_or_default();
        let mut segments: std::collections::HashMap<
            String,
            std::collections::HashMap<u64, [f32; atocore::DIM]>,
        > = std::collections::HashMap::new();
        let mut out = Vec::with_capacity(rows.len());
        for (chunk_id, segment) in rows {
            let elements = segments.entry(segment.clone()).or_insert_with(|| {
                atocore::read_segment(&self.layout.chroma().join(&segment))
                    .map(|e| e.into_iter().collect())
                    .unwrap_or_default()
            });
            if let Some(v) = elements.get(&chunk_id.unsigned_abs()) {
                out.push((chunk_id, *v));
            }
        }
        out
    }

    fn context_build(&self, request: &Request) -> Response {
        let Ok(body) = serde_json::from_slice::<Json>(&request.body) else {
            return Response::json(400, &json!({"error": "the body is not JSON"}));
        };
        let Some(prompt) = body.get("prompt").and_then(Json::as_str) else {
            return Response::json(422, &json!({"detail": "`prompt` (a string) is required"}));
        };
        let project = match body.get("project") {
            None | Some(Json::Null) => None,
            Some(Json::String(p)) => Some(p.clone()),
            Some(_) => {
                return Response::json(422, &json!({"detail": "`project` must be a string"}));
            }
        };
        let known = match self.registry() {
            Ok(list) => list,
            Err(p) => return degraded(vec![p]),
        };
        if let Some(p) = &project
            && !known
                .iter()
                .any(|k| k.get("id").and_then(Json::as_str) == Some(p))
        {
            return Response::json(404, &json!({"error": "unknown project", "project": p}));
        }
        match self.build_context(prompt, project.as_deref()) {
            Ok((chunks, stale)) => Response::json(
                200,
                &json!({
                    "project": project,
                    "chunks_used": chunks.len(),
                    "chunks": chunks,
                    "stale_vectors_dropped": stale,
                }),
            ),
            Err(p) => degraded(vec![p]),
        }
    }

    /// The chunks used (best first) and how many vector results had no SQL row.
    fn build_context(
        &self,
        prompt: &str,
        project: Option<&str>,
    ) -> Result<(Vec<Json>, usize), Problem> {
        let conn = self.open_db()?;
        let ids = |sql: &str, arg: Option<&str>| -> rusqlite::Result<HashSet<i64>> {
            let mut s = conn.prepare(sql)?;
            match arg {
                Some(a) => s.query_map([a], |r| r.get(0))?.collect(),
                None => s.query_map([], |r| r.get(0))?.collect(),
            }
        };
        let existing = ids("SELECT id FROM chunks", None).map_err(|e| self.query_failed(e))?;
        let wanted = match project {
            Some(p) => ids(
                "SELECT c.id FROM chunks c JOIN documents d ON d.id = c.document_id
                 WHERE d.project_id = ?1",
                Some(p),
            )
            .map_err(|e| self.query_failed(e))?,
            None => existing.clone(),
        };
        let query = atocore::embed(prompt);
        let mut scored: Vec<(f32, i64)> = self
            .vectors()
            .iter()
            .map(|(id, v)| (atocore::dot(&query, v), *id))
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        // The retriever's `_existing_chunk_ids` filter: stale vectors are dropped.
        let stale = scored
            .iter()
            .filter(|(_, id)| !existing.contains(id))
            .count();
        let mut text = conn
            .prepare(
                "SELECT c.text, c.document_id, d.source_path FROM chunks c
                 LEFT JOIN documents d ON d.id = c.document_id WHERE c.id = ?1",
            )
            .map_err(|e| self.query_failed(e))?;
        let mut chunks = Vec::new();
        for (score, id) in scored.into_iter().filter(|(_, id)| wanted.contains(id)) {
            if chunks.len() == MAX_CHUNKS {
                break;
            }
            let row: Option<(String, i64, Option<String>)> = text
                .query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()
                .map_err(|e| self.query_failed(e))?;
            if let Some((text, document_id, source_path)) = row {
                chunks.push(json!({
                    "id": id,
                    "text": text,
                    "document_id": document_id,
                    "source_path": source_path,
                    "score": (f64::from(score) * 1e4).round() / 1e4,
                }));
            }
        }
        Ok((chunks, stale))
    }

    /// One ingestion: the lock, one document of a few chunks, their vectors; logged.
    fn ingest_once(&self) {
        let lock_path = self.layout.ingestion_lock();
        let opened = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .and_then(|f| f.lock().map(|()| f));
        let mut lock = match opened {
            Ok(f) => f,
            Err(e) => {
                eprintln!(
                    "{NAME}: ingestion skipped: lock {}: {e}",
                    lock_path.display()
                );
                return;
            }
        };
        // Held until the line is logged, so a stop waits for both.
        let _busy = self.ingesting.lock().unwrap_or_else(|e| e.into_inner());
        // Who holds it, in the form `runbook` reads from its own lock files.
        let _ = lock
            .set_len(0)
            .and_then(|()| writeln!(lock, "atocore-ingestion {}", std::process::id()));
        let done = self.add_document().and_then(|new| {
            let vectors = self.add_vectors(&new.chunks)?;
            Ok(format!(
                "ingested document {} ({}, {} chunks, {vectors} vectors)",
                new.document,
                new.project,
                new.chunks.len()
            ))
        });
        match done {
            Ok(what) => eprintln!("{NAME}: {what}"),
            Err(e) => eprintln!("{NAME}: ingestion failed: {e}"),
        }
        // The flock goes with `lock`.
    }

    /// Adds one document and its chunks in one transaction.
    fn add_document(&self) -> Result<Ingested, String> {
        let db = self.layout.db();
        let sql = |e: rusqlite::Error| format!("{}: {e}", db.display());
        if !db.is_file() {
            return Err(format!("{} does not exist", db.display()));
        }
        let conn =
            Connection::open_with_flags(&db, OpenFlags::SQLITE_OPEN_READ_WRITE).map_err(sql)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(sql)?;
        conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))
            .map_err(sql)?;
        let tx = conn.unchecked_transaction().map_err(sql)?;
        let id: i64 = tx
            .query_row("SELECT coalesce(max(id), 0) + 1 FROM documents", [], |r| {
                r.get(0)
            })
            .map_err(sql)?;
        let projects: Vec<String> = tx
            .prepare("SELECT id FROM projects ORDER BY id")
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .map_err(sql)?;
        let project_id = if projects.is_empty() {
            atocore::PROJECTS[0].id.to_string()
        } else {
            projects[(id as usize - 1) % projects.len()].clone()
        };
        let spec = atocore::project(&project_id).unwrap_or(&atocore::PROJECTS[0]);
        let mut rng = Rng::new(0x1_6E57 ^ id as u64);
        let (title, path) = atocore::document_title_and_path(&mut rng, spec, id);
        let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
        tx.execute(
            "INSERT INTO documents VALUES (?1, ?2, ?3, ?4, ?5)",
            (id, &project_id, &path, &title, &now),
        )
        .map_err(sql)?;
        let mut chunks = Vec::new();
        for ordinal in 0..INGEST_CHUNKS {
            let text = atocore::chunk_text(&mut rng, spec);
            tx.execute(
                "INSERT INTO chunks(document_id, ordinal, text) VALUES (?1, ?2, ?3)",
                (id, ordinal as i64, &text),
            )
            .map_err(sql)?;
            chunks.push((tx.last_insert_rowid(), text));
        }
        tx.commit().map_err(sql)?;
        conn.close().map_err(|(_, e)| sql(e))?;
        Ok(Ingested {
            document: id,
            project: project_id,
            chunks,
        })
    }

    /// Adds the chunks' vectors: segment files first, then the rows of `chroma.sqlite3`.
    /// Returns how many; 0 when there is no vector store.
    fn add_vectors(&self, chunks: &[(i64, String)]) -> Result<usize, String> {
        let path = self.layout.chroma_db();
        if !path.is_file() {
            return Ok(0);
        }
        let sql = |e: rusqlite::Error| format!("{}: {e}", path.display());
        let conn =
            Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_WRITE).map_err(sql)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(sql)?;
        let mut segments: Vec<String> = conn
            .prepare("SELECT DISTINCT segment FROM embeddings ORDER BY segment")
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .map_err(sql)?;
        if segments.is_empty() {
            segments = std::fs::read_dir(self.layout.chroma())
                .map_err(|e| e.to_string())?
                .filter_map(|e| e.ok())
                .filter(|e| e.path().join("header.bin").is_file())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect();
            segments.sort();
        }
        if segments.is_empty() {
            return Ok(0);
        }
        for segment in &segments {
            let elements: Vec<_> = chunks
                .iter()
                .filter(|(id, _)| atocore::segment_for(&segments, *id) == segment)
                .map(|(id, text)| (id.unsigned_abs(), atocore::embed(text)))
                .collect();
            if !elements.is_empty() {
                atocore::append_segment(&self.layout.chroma().join(segment), &elements)?;
            }
        }
        let tx = conn.unchecked_transaction().map_err(sql)?;
        for (id, _) in chunks {
            tx.execute(
                "INSERT INTO embeddings(chunk_id, segment) VALUES (?1, ?2)",
                (id, atocore::segment_for(&segments, *id)),
            )
            .map_err(sql)?;
        }
        tx.commit().map_err(sql)?;
        Ok(chunks.len())
    }
}
