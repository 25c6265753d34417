//! `runbook-testkit atocore-sandbox`, `atocore-standin` and `atocore-damage`: the drill's
//! deployment is deterministic, the stand-in answers from the files it is given (so a
//! bad restore fails verification), its ingestion honours the ingestion lock, it stops
//! on SIGTERM, and a runbook of `http` steps verifies it.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};
use serde_json::{Value as Json, json};
use sha2::{Digest, Sha256};

use crate::support::{Run, Sandbox};

const TESTKIT: &str = env!("CARGO_BIN_EXE_runbook-testkit");

fn testkit(args: &[&str]) -> Run {
    Command::new(TESTKIT)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run runbook-testkit")
        .into()
}

/// A sandbox built by `atocore-sandbox` in a temp dir.
struct Deployment {
    dir: tempfile::TempDir,
}

impl Deployment {
    fn build(args: &[&str]) -> Deployment {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().display().to_string();
        let mut all = vec!["atocore-sandbox", path.as_str()];
        all.extend_from_slice(args);
        let r = testkit(&all);
        assert_eq!(r.code, 0, "{r:?}");
        Deployment { dir }
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("srv/storage/atocore")
    }

    fn db(&self) -> PathBuf {
        self.root().join("data/db/atocore.db")
    }

    fn vars(&self) -> serde_yaml::Mapping {
        let text = std::fs::read_to_string(self.dir().join("sandbox.yaml")).unwrap();
        serde_yaml::from_str(&text).unwrap()
    }

    /// A read-only look at the database, as the test's own witness.
    fn sql(&self) -> Connection {
        Connection::open_with_flags(self.db(), OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap()
    }

    fn count(&self, sql: &str) -> i64 {
        self.sql().query_row(sql, [], |r| r.get(0)).unwrap()
    }

    fn damage(&self, kind: &str) -> Run {
        let root = self.root().display().to_string();
        testkit(&["atocore-damage", &root, "--kind", kind])
    }

    fn standin(&self, extra: &[&str]) -> Standin {
        let root = self.root().display().to_string();
        let mut args = vec![
            "atocore-standin",
            "--root",
            root.as_str(),
            "--listen",
            "127.0.0.1:0",
            "--exit-after",
            "120s",
        ];
        args.extend_from_slice(extra);
        Standin::spawn(TESTKIT, &args, &self.dir().join("run/test-standin.log"))
    }
}

/// A running stand-in (killed when dropped); its stderr goes to `log`.
struct Standin {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Standin {
    fn spawn(program: &str, args: &[&str], log: &Path) -> Standin {
        let mut cmd = Command::new(program);
        cmd.args(args).stderr(File::create(log).unwrap());
        let (child, port) = crate::support::spawn_listening(cmd);
        Standin {
            child,
            port,
            log: log.to_path_buf(),
        }
    }

    fn request(&self, method: &str, path: &str, body: &str) -> (u16, Json) {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        let doc = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer}"));
        (status, doc)
    }

    fn get(&self, path: &str) -> (u16, Json) {
        self.request("GET", path, "")
    }

    fn context(&self, prompt: &str, project: &str) -> (u16, Json) {
        let body = json!({"prompt": prompt, "project": project}).to_string();
        self.request("POST", "/context/build", &body)
    }

    fn documents(&self) -> i64 {
        let (status, stats) = self.get("/stats");
        assert_eq!(status, 200, "{stats}");
        stats["documents"].as_i64().unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(
            unsafe { libc::kill(self.child.id() as i32, signal) },
            0,
            "kill"
        );
    }

    /// Waits up to `limit` for the process to end; its exit code and how long it took.
    fn wait_exit(&mut self, limit: Duration) -> (Option<i32>, Duration) {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status.code(), started.elapsed());
            }
            assert!(
                started.elapsed() < limit,
                "still running after {limit:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Standin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kills the service recorded in a pidfile when the test ends, passed or not (the
/// sandbox's `service_argv` has no `--exit-after`).
struct StopOnDrop(PathBuf);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = runbook::actions::daemon::running(&self.0) {
            // SAFETY: kill(2) on the pid the pidfile records, checked to be that process.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// sha256 of every file below `root`, by relative path.
fn file_digests(root: &Path) -> BTreeMap<String, String> {
    walkdir::WalkDir::new(root)
        .sort_by_file_name()
        .into_iter()
        .map(Result::unwrap)
        .filter(|e| e.file_type().is_file())
        .map(|e| {
            let rel = e.path().strip_prefix(root).unwrap().display().to_string();
            let digest = Sha256::digest(std::fs::read(e.path()).unwrap());
            (rel, runbook::actions::files::hex(&digest))
        })
        .collect()
}

fn is_uuid(name: &str) -> bool {
    let parts: Vec<&str> = name.split('-').collect();
    parts.iter().map(|p| p.len()).collect::<Vec<_>>() == [8, 4, 4, 4, 12]
        && parts
            .iter()
            .all(|p| p.chars().all(|c| c.is_ascii_hexdigit()))
}

#[test]
fn the_sandbox_is_byte_identical_for_a_seed_and_shaped_like_the_deployment() {
    let a = Deployment::build(&["--seed", "7"]);
    let b = Deployment::build(&["--seed", "7"]);
    let c = Deployment::build(&["--seed", "8", "--port", "18123"]);
    let (da, db, dc) = (
        file_digests(&a.dir().join("srv")),
        file_digests(&b.dir().join("srv")),
        file_digests(&c.dir().join("srv")),
    );
    assert_eq!(da, db, "two builds with seed 7 differ");
    let db_file = "storage/atocore/data/db/atocore.db";
    assert_ne!(
        da[db_file], dc[db_file],
        "seeds 7 and 8 gave the same database"
    );

    // The files, and nothing the checkpoint should have folded in.
    let chroma = a.root().join("data/chroma");
    let mut segments: Vec<String> = std::fs::read_dir(&chroma)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_dir())
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    segments.sort();
    assert!(
        (1..=2).contains(&segments.len()) && segments.iter().all(|s| is_uuid(s)),
        "{segments:?}"
    );
    let mut expected: Vec<String> = [
        "storage/atocore/config/project-registry.json",
        "storage/atocore/data/chroma/chroma.sqlite3",
        db_file,
        "storage/atocore/data/ingestion.lock",
    ]
    .map(String::from)
    .to_vec();
    for s in &segments {
        for f in [
            "data_level0.bin",
            "header.bin",
            "length.bin",
            "link_lists.bin",
        ] {
            expected.push(format!("storage/atocore/data/chroma/{s}/{f}"));
        }
    }
    expected.sort();
    assert_eq!(da.keys().cloned().collect::<Vec<_>>(), expected);
    for dir in [
        "srv/storage/atocore/backups/snapshots",
        "srv/storage/atocore/logs",
        "run",
    ] {
        assert!(a.dir().join(dir).is_dir(), "{dir}");
    }
    assert_eq!(
        std::fs::read_dir(a.root().join("backups/snapshots"))
            .unwrap()
            .count(),
        0
    );

    // The database: WAL mode, three projects with p05, documents from the vault.
    let size = std::fs::metadata(a.db()).unwrap().len();
    assert!((1 << 20..16 << 20).contains(&size), "{size} bytes");
    let journal: String = a
        .sql()
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(journal, "wal");
    let projects: Vec<String> = a
        .sql()
        .prepare("SELECT id FROM projects ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(projects.len(), 3);
    assert!(projects.contains(&"p05-interferometer".to_string()));
    assert_eq!(a.count("SELECT count(*) FROM documents"), 300);
    let chunks = a.count("SELECT count(*) FROM chunks");
    assert!((4500..=7500).contains(&chunks), "{chunks} chunks");
    assert_eq!(
        a.count(
            "SELECT count(*) FROM documents
             WHERE source_path NOT LIKE '/srv/storage/atocore/sources/vault/%'
                OR project_id NOT IN (SELECT id FROM projects)"
        ),
        0
    );
    assert_eq!(
        a.count("SELECT count(*) FROM chunks WHERE document_id NOT IN (SELECT id FROM documents) OR length(text) < 100"),
        0
    );

    // The registry names the same projects.
    let registry: Json = serde_json::from_str(
        &std::fs::read_to_string(a.root().join("config/project-registry.json")).unwrap(),
    )
    .unwrap();
    let mut ids: Vec<String> = registry["projects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            assert!(p["name"].is_string() && p["description"].is_string());
            assert!(!p["source_dirs"].as_array().unwrap().is_empty());
            p["id"].as_str().unwrap().to_string()
        })
        .collect();
    ids.sort();
    assert_eq!(ids, projects);

    // Every chunk has one embedding, and one vector in its segment's data_level0.bin.
    let vectors = Connection::open_with_flags(
        chroma.join("chroma.sqlite3"),
        OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let embedded: Vec<(i64, String)> = vectors
        .prepare("SELECT chunk_id, segment FROM embeddings ORDER BY chunk_id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let chunk_ids: Vec<i64> = a
        .sql()
        .prepare("SELECT id FROM chunks ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        embedded.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        chunk_ids
    );
    let mut record_sizes = HashSet::new();
    for s in &segments {
        let rows = embedded.iter().filter(|(_, seg)| seg == s).count() as u64;
        assert!(rows > 0, "segment {s} holds no embeddings");
        let bytes = std::fs::metadata(chroma.join(s).join("data_level0.bin"))
            .unwrap()
            .len();
        assert_eq!(bytes % rows, 0, "{s}: {bytes} bytes for {rows} vectors");
        record_sizes.insert(bytes / rows);
    }
    assert_eq!(record_sizes.len(), 1, "{record_sizes:?}");
    assert!(record_sizes.iter().all(|&r| (64..1024).contains(&r)));

    // Owner and modes as on Dalidou.
    let me = std::fs::metadata(a.dir()).unwrap();
    let (uid, gid) = if me.uid() == 0 {
        (1000, 1000)
    } else {
        (me.uid(), me.gid())
    };
    for (path, mode) in [
        (a.db(), 0o600),
        (a.root().join("config/project-registry.json"), 0o644),
        (chroma.join("chroma.sqlite3"), 0o644),
    ] {
        let m = std::fs::metadata(&path).unwrap();
        assert_eq!(
            (m.uid(), m.gid(), m.permissions().mode() & 0o777),
            (uid, gid, mode),
            "{}",
            path.display()
        );
    }

    // The vars file.
    let vars = c.vars();
    let dir = c.dir().canonicalize().unwrap().display().to_string();
    let root = format!("{dir}/srv/storage/atocore");
    let s = |k: &str| {
        vars[k]
            .as_str()
            .unwrap_or_else(|| panic!("{k}"))
            .to_string()
    };
    for (key, value) in [
        ("atocore_root", root.clone()),
        ("data_dir", format!("{root}/data")),
        ("db_path", format!("{root}/data/db/atocore.db")),
        (
            "registry_path",
            format!("{root}/config/project-registry.json"),
        ),
        ("chroma_dir", format!("{root}/data/chroma")),
        ("backup_dir", format!("{root}/backups")),
        ("ingestion_lock", format!("{root}/data/ingestion.lock")),
        ("service_url", "http://127.0.0.1:18123".to_string()),
        ("service_addr", "127.0.0.1:18123".to_string()),
        ("service_manager", "process".to_string()),
        ("service_pidfile", format!("{dir}/run/atocore.pid")),
        ("service_log", format!("{dir}/run/atocore.log")),
        ("owner", format!("{uid}:{gid}")),
        ("known_project", "p05-interferometer".to_string()),
        ("known_prompt", "what is p05 about".to_string()),
    ] {
        assert_eq!(s(key), value, "{key}");
    }
    assert_eq!(vars["min_documents"].as_i64(), Some(1));
    assert_eq!(vars["min_projects"].as_i64(), Some(1));
    let argv: Vec<String> = vars["service_argv"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let testkit_path = Path::new(TESTKIT).canonicalize().unwrap();
    assert_eq!(
        argv,
        [
            testkit_path.display().to_string(),
            "atocore-standin".into(),
            "--root".into(),
            root,
            "--listen".into(),
            "127.0.0.1:18123".into(),
        ]
    );
    // `--port 0` (the default) picked a real port.
    let url = a.vars()["service_url"].as_str().unwrap().to_string();
    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    assert!(port > 0);

    // A second build in the same place must be asked for.
    let again = testkit(&["atocore-sandbox", &dir]);
    assert_eq!(again.code, 1, "{again:?}");
    assert!(again.stderr.contains("is not empty"), "{again:?}");
    let forced = testkit(&["atocore-sandbox", &dir, "--seed", "7", "--force"]);
    assert_eq!(forced.code, 0, "{forced:?}");
    assert_eq!(file_digests(&c.dir().join("srv")), da);
}

#[test]
fn the_standin_answers_the_four_endpoints_from_the_database() {
    let d = Deployment::build(&["--documents", "60"]);
    let s = d.standin(&[]);
    let documents = d.count("SELECT count(*) FROM documents");
    let chunks = d.count("SELECT count(*) FROM chunks");
    assert_eq!(documents, 60);

    assert_eq!(
        s.get("/health"),
        (200, json!({"status": "ok", "documents": 60}))
    );
    assert_eq!(
        s.get("/stats"),
        (
            200,
            json!({"documents": 60, "chunks": chunks, "projects": 3, "vectors": chunks})
        )
    );
    let registry: Json = serde_json::from_str(
        &std::fs::read_to_string(d.root().join("config/project-registry.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        s.get("/projects"),
        (200, json!({"projects": registry["projects"]}))
    );

    let (status, context) = s.context("what is p05 about", "p05-interferometer");
    assert_eq!(status, 200, "{context}");
    assert_eq!(context["project"], "p05-interferometer");
    assert_eq!(context["chunks_used"], 8);
    assert_eq!(context["stale_vectors_dropped"], 0);
    let used = context["chunks"].as_array().unwrap();
    assert_eq!(used.len(), 8);
    let sql = d.sql();
    let mut ids = HashSet::new();
    for chunk in used {
        let id = chunk["id"].as_i64().unwrap();
        assert!(ids.insert(id), "chunk {id} used twice");
        let (text, project): (String, String) = sql
            .query_row(
                "SELECT c.text, d.project_id FROM chunks c JOIN documents d ON d.id = c.document_id WHERE c.id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(chunk["text"], text);
        assert_eq!(project, "p05-interferometer");
    }
    // Deterministic: the same question, the same answer.
    assert_eq!(
        s.context("what is p05 about", "p05-interferometer").1,
        context
    );
    assert_eq!(
        s.context("what is p05 about", "p99-unknown"),
        (
            404,
            json!({"error": "unknown project", "project": "p99-unknown"})
        )
    );
    assert_eq!(s.request("POST", "/context/build", "{not json").0, 400);

    // Vectors whose SQL row is gone are dropped (`_existing_chunk_ids`): the next best
    // chunks take their place.
    let gone: Vec<i64> = used[..3]
        .iter()
        .map(|c| c["id"].as_i64().unwrap())
        .collect();
    let rw = Connection::open(d.db()).unwrap();
    for id in &gone {
        rw.execute("DELETE FROM chunks WHERE id = ?1", [id])
            .unwrap();
    }
    drop(rw);
    let (status, after) = s.context("what is p05 about", "p05-interferometer");
    assert_eq!(status, 200, "{after}");
    assert_eq!(after["chunks_used"], 8);
    assert_eq!(after["stale_vectors_dropped"], 3);
    let now: Vec<i64> = after["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_i64().unwrap())
        .collect();
    let before: Vec<i64> = used.iter().map(|c| c["id"].as_i64().unwrap()).collect();
    assert_eq!(now[..5], before[3..], "the survivors keep their order");
    assert!(now.iter().all(|id| !gone.contains(id)));
    assert_eq!(s.get("/stats").1["chunks"], chunks - 3);

    let log = s.log();
    for line in [
        "GET /health -> 200",
        "GET /stats -> 200",
        "GET /projects -> 200",
        "POST /context/build -> 200",
        "POST /context/build -> 404",
    ] {
        assert!(log.contains(line), "no `{line}` in the log:\n{log}");
    }
}

#[test]
fn each_kind_of_damage_shows_on_the_endpoint_that_checks_it() {
    for kind in [
        "truncate-db",
        "corrupt-db",
        "empty-db",
        "bad-registry",
        "drop-chroma",
        "delete-documents",
    ] {
        let d = Deployment::build(&["--documents", "60"]);
        // Started before the damage: it reads the files per request.
        let s = d.standin(&[]);
        assert_eq!(s.get("/health").0, 200, "{kind}: healthy before");
        assert_eq!(
            s.context("what is p05 about", "p05-interferometer").1["chunks_used"],
            8,
            "{kind}: context before"
        );
        let wal = d.root().join("data/db/atocore.db-wal");
        let had_wal = wal.exists();
        let r = d.damage(kind);
        assert_eq!(r.code, 0, "{kind}: {r:?}");
        assert!(r.stdout.starts_with(&format!("{kind}: ")), "{r:?}");
        if kind == "empty-db" {
            // The reads above left a WAL; replacing the database must not keep it.
            assert!(had_wal && !wal.exists(), "{kind}: wal before {had_wal}");
        }
        let (health_status, health) = s.get("/health");
        let (_, stats) = s.get("/stats");
        let (context_status, context) = s.context("what is p05 about", "p05-interferometer");
        match kind {
            "truncate-db" | "corrupt-db" => {
                assert_eq!(health_status, 503, "{kind}: {health}");
                assert_eq!(health["status"], "degraded");
                assert_eq!(
                    health["errors"],
                    json!(["db_integrity_check_failed"]),
                    "{kind}"
                );
            }
            "bad-registry" => {
                assert_eq!(health_status, 503, "{kind}: {health}");
                assert_eq!(health["errors"], json!(["registry_invalid_json"]));
                assert_eq!(s.get("/projects").0, 503);
                assert_eq!(context_status, 503);
            }
            "empty-db" | "delete-documents" => {
                assert_eq!(
                    (health_status, &health),
                    (200, &json!({"status": "ok", "documents": 0})),
                    "{kind}"
                );
                assert_eq!(stats["documents"], 0, "{kind}: {stats}");
                assert_eq!(stats["chunks"], 0, "{kind}: {stats}");
                assert_eq!(context["chunks_used"], 0, "{kind}: {context}");
            }
            "drop-chroma" => {
                assert_eq!(health_status, 200, "{kind}: {health}");
                assert_eq!(stats["vectors"], 0, "{kind}: {stats}");
                assert_eq!(
                    (context_status, context["chunks_used"].clone()),
                    (200, json!(0)),
                    "{kind}: {context}"
                );
            }
            _ => unreachable!(),
        }
    }
}

#[test]
fn damage_keeps_the_size_or_halves_it_and_replaces_the_database_cleanly() {
    let d = Deployment::build(&["--documents", "60"]);
    let size = std::fs::metadata(d.db()).unwrap().len();
    let before = std::fs::read(d.db()).unwrap();
    assert_eq!(d.damage("corrupt-db").code, 0);
    let after = std::fs::read(d.db()).unwrap();
    assert_eq!(after.len(), before.len(), "corrupt-db keeps the size");
    let changed: Vec<usize> = (0..after.len())
        .filter(|&i| after[i] != before[i])
        .collect();
    let (first, last) = (changed[0], *changed.last().unwrap());
    assert!(
        last - first < 4096 && last - first > 3500,
        "{first}..{last}"
    );
    assert!(
        first.abs_diff(after.len() / 2) <= 2048,
        "not the middle: {first}"
    );

    let d = Deployment::build(&["--documents", "60"]);
    assert_eq!(d.damage("truncate-db").code, 0);
    assert_eq!(std::fs::metadata(d.db()).unwrap().len(), size / 2);

    // empty-db: the same owner and mode, the tables, no rows, no stale WAL beside it.
    let d = Deployment::build(&["--documents", "60"]);
    let old = std::fs::metadata(d.db()).unwrap();
    let [wal, shm] = ["-wal", "-shm"].map(|s| PathBuf::from(format!("{}{s}", d.db().display())));
    std::fs::write(&wal, b"stale wal").unwrap();
    std::fs::write(&shm, b"stale shm").unwrap();
    assert_eq!(d.damage("empty-db").code, 0);
    assert!(!wal.exists() && !shm.exists());
    let new = std::fs::metadata(d.db()).unwrap();
    assert_eq!(
        (new.uid(), new.gid(), new.mode()),
        (old.uid(), old.gid(), old.mode())
    );
    for table in ["projects", "documents", "chunks"] {
        assert_eq!(d.count(&format!("SELECT count(*) FROM {table}")), 0);
    }

    // The sandbox's DIR works as ROOT too; an unknown kind names the kinds.
    let dir = d.dir().display().to_string();
    let r = testkit(&["atocore-damage", &dir, "--kind", "drop-chroma"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(!d.root().join("data/chroma").exists());
    let r = testkit(&["atocore-damage", &dir, "--kind", "melt"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert_eq!(
        r.stderr,
        "runbook-testkit atocore-damage: unknown kind `melt`; usage: atocore-damage ROOT --kind KIND (KIND: truncate-db, corrupt-db, empty-db, bad-registry, drop-chroma, delete-documents, stale-wal)\n"
    );
}

#[test]
fn a_stale_wal_is_replayed_into_a_database_copied_over_it_unless_it_is_removed() {
    let d = Deployment::build(&["--documents", "30"]);
    let snapshot = std::fs::read(d.db()).unwrap();
    let s = d.standin(&[]);
    assert_eq!(s.documents(), 30);
    let r = d.damage("stale-wal");
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.starts_with("stale-wal: document 31 committed to "),
        "{r:?}"
    );
    assert_eq!(
        std::fs::read(d.db()).unwrap(),
        snapshot,
        "the database file changed"
    );
    let [wal, shm] = ["-wal", "-shm"].map(|x| PathBuf::from(format!("{}{x}", d.db().display())));
    assert!(std::fs::metadata(&wal).unwrap().len() > 0);
    assert_eq!(s.documents(), 31, "readers see the committed WAL");

    // A restore that only copies the database over keeps the newer document.
    std::fs::write(d.db(), &snapshot).unwrap();
    assert_eq!(s.documents(), 31);
    // Removing the WAL and its index with it restores the snapshot's state.
    std::fs::remove_file(&wal).unwrap();
    std::fs::remove_file(&shm).unwrap();
    std::fs::write(d.db(), &snapshot).unwrap();
    assert_eq!(s.documents(), 30);
    assert_eq!(s.get("/health").0, 200);
}

#[test]
fn ingestion_adds_documents_only_while_it_holds_the_ingestion_lock() {
    let d = Deployment::build(&["--documents", "30"]);
    let s = d.standin(&["--ingest-every", "40ms"]);
    wait_until("a first ingestion", Duration::from_secs(20), || {
        s.documents() > 30
    });

    let lock = File::options()
        .read(true)
        .write(true)
        .open(d.root().join("data/ingestion.lock"))
        .unwrap();
    lock.lock().unwrap(); // waits for an ingestion in progress to finish
    let mut holder = String::new();
    (&lock).read_to_string(&mut holder).unwrap();
    assert_eq!(holder, format!("atocore-ingestion {}\n", s.child.id()));
    let (_, held) = s.get("/stats");
    std::thread::sleep(Duration::from_millis(600)); // 15 periods
    let (_, still) = s.get("/stats");
    assert_eq!(still, held, "the store changed while the lock was held");
    drop(lock);
    wait_until(
        "an ingestion after the release",
        Duration::from_secs(20),
        || s.documents() > held["documents"].as_i64().unwrap(),
    );

    // Each ingestion is whole: a document, its chunks, their vectors.
    let lock = File::open(d.root().join("data/ingestion.lock")).unwrap();
    lock.lock().unwrap();
    let (_, stats) = s.get("/stats");
    assert_eq!(stats["vectors"], stats["chunks"], "{stats}");
    let added = stats["documents"].as_i64().unwrap() - 30;
    assert!(added >= 2, "{stats}");
    assert_eq!(
        d.count("SELECT count(*) FROM chunks WHERE document_id > 30"),
        3 * added
    );
    drop(lock);
    assert!(s.log().contains("ingested document 31 ("), "{}", s.log());
}

#[test]
fn sigterm_or_sigint_stops_it_within_a_second_and_exit_after_by_itself() {
    let d = Deployment::build(&["--documents", "30"]);
    for (signal, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")] {
        let mut s = d.standin(&["--ingest-every", "10ms"]);
        assert_eq!(s.get("/health").0, 200);
        std::thread::sleep(Duration::from_millis(100));
        s.signal(signal);
        let (code, took) = s.wait_exit(Duration::from_secs(1));
        assert_eq!(code, Some(0), "{name}: {}", s.log());
        assert!(took < Duration::from_secs(1), "{name}: {took:?}");
        assert!(
            s.log()
                .ends_with(&format!("atocore-standin: stopping ({name})\n")),
            "{}",
            s.log()
        );
    }
    // Stopped mid-ingestion or not, the database is whole: every ingested document has
    // its three chunks.
    let quick: String = d
        .sql()
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(quick, "ok");
    assert!(d.count("SELECT count(*) FROM documents") > 30);
    assert_eq!(
        d.count(
            "SELECT count(*) FROM documents d WHERE d.id > 30
             AND (SELECT count(*) FROM chunks c WHERE c.document_id = d.id) != 3"
        ),
        0
    );

    let mut s = d.standin(&["--exit-after", "300ms"]);
    let (code, took) = s.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0));
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(
        s.log().ends_with("stopping (--exit-after)\n"),
        "{}",
        s.log()
    );
}

#[test]
fn a_runbook_started_from_the_sandbox_vars_verifies_the_standin_and_fails_on_damage() {
    let d = Deployment::build(&["--documents", "60"]);
    let sb = Sandbox::new();
    sb.write(
        "runbooks/verify.yaml",
        r#"version: 1
params:
  service_url: {type: string, required: true}
  service_addr: {type: string, required: true}
  service_argv: {type: list, required: true}
  service_pidfile: {type: path, required: true}
  service_log: {type: path, required: true}
  known_project: {type: string, required: true}
  known_prompt: {type: string, required: true}
  min_documents: {type: int, required: true}
steps:
  - id: start
    action: daemon-start
    with:
      argv: "{{ service_argv }}"
      pidfile: "{{ service_pidfile }}"
      log: "{{ service_log }}"
      wait_for_port: "{{ service_addr }}"
  - id: health
    action: http
    with:
      url: "{{ service_url }}/health"
      expect: {status: 200, jq: ['.status == "ok"', ".documents >= {{ min_documents }}"]}
  - id: context
    action: http
    with:
      method: POST
      url: "{{ service_url }}/context/build"
      json_text: '{"prompt": {{ known_prompt | tojson }}, "project": {{ known_project | tojson }}}'
      expect: {jq: [".chunks_used > 0"]}
      outputs: {chunks_used: .chunks_used}
"#,
    );
    sb.write(
        "runbooks/stop.yaml",
        "version: 1\nparams:\n  service_pidfile: {type: path, required: true}\nsteps:\n  - id: stop\n    action: daemon-stop\n    with: {pidfile: \"{{ service_pidfile }}\", timeout: 5s}\n",
    );
    let vars = d.dir().join("sandbox.yaml").display().to_string();
    let url = d.vars()["service_url"].as_str().unwrap().to_string();
    let _service = StopOnDrop(d.dir().join("run/atocore.pid"));

    let ok = sb.run(&["run", "verify", "--vars", &vars]);
    let stop = sb.run(&["run", "stop", "--vars", &vars]);
    assert_eq!(ok.code, 0, "{ok:?}");
    assert_eq!(stop.code, 0, "{stop:?}");
    let runs: Json = serde_json::from_str(&sb.run(&["runs", "--format", "json"]).stdout).unwrap();
    let verify_id = runs
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["runbook"].as_str().is_some_and(|n| n.contains("verify")))
        .map(|r| r["id"].as_str().unwrap().to_string())
        .unwrap_or_else(|| panic!("no verify run in {runs}"));
    let show: Json =
        serde_json::from_str(&sb.run(&["show", &verify_id, "--format", "json"]).stdout).unwrap();
    assert_eq!(show["steps"][2]["outputs"]["chunks_used"], 8, "{show}");
    let log = std::fs::read_to_string(d.dir().join("run/atocore.log")).unwrap();
    assert!(log.contains("POST /context/build -> 200"), "{log}");
    assert!(
        log.ends_with("atocore-standin: stopping (SIGTERM)\n"),
        "{log}"
    );

    // Without the vector store the same verification fails, and says why.
    assert_eq!(d.damage("drop-chroma").code, 0);
    let bad = sb.run(&["run", "verify", "--vars", &vars]);
    sb.run(&["run", "stop", "--vars", &vars]);
    assert_eq!(bad.code, 1, "{bad:?}");
    let failed: Vec<&str> = bad
        .stdout
        .lines()
        .filter(|l| l.starts_with("  FAILED"))
        .collect();
    assert_eq!(
        failed,
        [format!(
            "  FAILED   context: POST {url}/context/build with a 61-byte JSON body: `.chunks_used > 0` does not hold: expected true, got false"
        )],
        "{bad:?}"
    );
}
