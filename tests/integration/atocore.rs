//! The AtoCore procedure end to end: the bundled runbooks (`runbooks/atocore/`) run by
//! the built binary against a sandbox made by `runbook-testkit atocore-sandbox` in a
//! temp dir: real SQLite files, the stand-in service as a real process (and, for the
//! Compose test, in a real container), real snapshot directories.
//!
//! No test leaves a process behind: the sandbox kills the services its pidfiles record
//! when it is dropped, and the Compose project is taken down by its guard.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};
use serde_json::{Value as Json, json};
use sha2::{Digest, Sha256};

use crate::support::{ServiceGuard, docker_ok, free_port, image, tree_digest};

const RUNBOOK: &str = env!("CARGO_BIN_EXE_runbook");
const TESTKIT: &str = env!("CARGO_BIN_EXE_runbook-testkit");
const RUNBOOKS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/runbooks");

// ------------------------------------------------------------------ the fixture

/// What one command printed and how it ended.
struct Outcome {
    code: i32,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

impl From<std::process::Output> for Outcome {
    fn from(o: std::process::Output) -> Self {
        Outcome {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Outcome {
    /// `run --format json`: one event per line.
    fn events(&self) -> Vec<Json> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}\n{self:?}")))
            .collect()
    }

    /// `plan` / `show --format json`: one document.
    fn json(&self) -> Json {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("{e}\n{self:?}"))
    }

    fn run_id(&self) -> String {
        self.events()[0]["run_id"].as_str().unwrap().to_string()
    }

    /// The `run-finished` event.
    fn finished(&self) -> Json {
        let events = self.events();
        let last = events
            .last()
            .unwrap_or_else(|| panic!("no events: {self:?}"));
        assert_eq!(last["event"], "run-finished", "{self:?}");
        last.clone()
    }

    fn outputs(&self) -> Json {
        self.finished()["outputs"].clone()
    }

    /// The `{"error": ...}` a refused `--format json` command prints.
    fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error: {self:?}"))
            .to_string()
    }
}

/// An AtoCore sandbox (`atocore-sandbox DIR --port 0`), its vars file, and the runbook
/// state dir `DIR/state`.
struct Ato {
    /// Dropped before `dir`.
    guards: RefCell<Vec<ServiceGuard>>,
    dir: tempfile::TempDir,
}

impl Ato {
    fn new() -> Ato {
        Ato::with(&["--documents", "60"])
    }

    fn with(args: &[&str]) -> Ato {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().display().to_string();
        let mut all = vec!["atocore-sandbox", path.as_str(), "--port", "0"];
        all.extend_from_slice(args);
        let r = testkit(&all);
        assert_eq!(r.code, 0, "{r:?}");
        let ato = Ato {
            guards: RefCell::new(Vec::new()),
            dir,
        };
        ato.guard(&ato.pidfile());
        ato
    }

    fn guard(&self, pidfile: &Path) {
        self.guards
            .borrow_mut()
            .push(ServiceGuard(pidfile.to_path_buf()));
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.dir().join(rel)
    }

    fn root(&self) -> PathBuf {
        self.p("srv/storage/atocore")
    }

    fn data(&self) -> PathBuf {
        self.root().join("data")
    }

    fn db(&self) -> PathBuf {
        self.data().join("db/atocore.db")
    }

    fn registry(&self) -> PathBuf {
        self.root().join("config/project-registry.json")
    }

    fn chroma(&self) -> PathBuf {
        self.data().join("chroma")
    }

    fn snapshots(&self) -> PathBuf {
        self.root().join("backups/snapshots")
    }

    fn snapshot(&self, stamp: &str) -> PathBuf {
        self.snapshots().join(stamp)
    }

    fn pidfile(&self) -> PathBuf {
        self.p("run/atocore.pid")
    }

    fn vars(&self) -> String {
        self.p("sandbox.yaml").display().to_string()
    }

    /// A value of `sandbox.yaml`.
    fn var(&self, key: &str) -> String {
        let text = std::fs::read_to_string(self.p("sandbox.yaml")).unwrap();
        let vars: serde_yaml::Mapping = serde_yaml::from_str(&text).unwrap();
        vars[key].as_str().unwrap().to_string()
    }

    /// `runbook --path <repo>/runbooks ARGS`, in the sandbox dir.
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(RUNBOOK);
        c.arg("--path")
            .arg(RUNBOOKS)
            .args(args)
            .current_dir(self.dir())
            .env("RUNBOOK_STATE_DIR", self.p("state"))
            .env_remove("RUNBOOK_PATH")
            .stdin(Stdio::null());
        for var in ["http_proxy", "https_proxy", "all_proxy"] {
            c.env_remove(var).env_remove(var.to_ascii_uppercase());
        }
        c
    }

    fn runbook(&self, args: &[&str]) -> Outcome {
        self.cmd(args).output().expect("run runbook").into()
    }

    /// `run NAME --vars sandbox.yaml --format json EXTRA...`
    fn run(&self, name: &str, extra: &[&str]) -> Outcome {
        let vars = self.vars();
        let mut args = vec!["run", name, "--vars", vars.as_str(), "--format", "json"];
        args.extend_from_slice(extra);
        self.runbook(&args)
    }

    /// `plan NAME --vars sandbox.yaml --format json EXTRA...`
    fn plan(&self, name: &str, extra: &[&str]) -> Outcome {
        let vars = self.vars();
        let mut args = vec!["plan", name, "--vars", vars.as_str(), "--format", "json"];
        args.extend_from_slice(extra);
        self.runbook(&args)
    }

    fn start_service(&self) {
        let r = self.run("atocore/service", &["--set", "state=started"]);
        assert_eq!(r.code, 0, "{r:?}");
        assert!(self.service_pid().is_some(), "no service after start");
    }

    fn stop_service(&self) {
        let r = self.run("atocore/service", &["--set", "state=stopped"]);
        assert_eq!(r.code, 0, "{r:?}");
    }

    fn service_pid(&self) -> Option<i32> {
        runbook::actions::daemon::running(&self.pidfile())
    }

    /// `atocore/backup`; the new snapshot's stamp.
    fn backup(&self, include_chroma: bool) -> String {
        let set = format!("include_chroma={include_chroma}");
        let r = self.run("atocore/backup", &["--set", &set]);
        assert_eq!(r.code, 0, "{r:?}");
        let stamp = r.outputs()["stamp"].as_str().unwrap().to_string();
        assert!(self.snapshot(&stamp).join("db/atocore.db").is_file());
        stamp
    }

    fn damage(&self, kind: &str) {
        let root = self.root().display().to_string();
        let r = testkit(&["atocore-damage", &root, "--kind", kind]);
        assert_eq!(r.code, 0, "{r:?}");
    }

    /// Makes the live data differ from any snapshot in all three parts: no documents,
    /// a registry without its last project, a vector segment without its vectors.
    fn damage_live(&self) {
        self.damage("delete-documents");
        let mut registry: Json =
            serde_json::from_slice(&std::fs::read(self.registry()).unwrap()).unwrap();
        registry["projects"].as_array_mut().unwrap().pop();
        std::fs::write(
            self.registry(),
            serde_json::to_string_pretty(&registry).unwrap(),
        )
        .unwrap();
        let segment = std::fs::read_dir(self.chroma())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.is_dir())
            .unwrap();
        std::fs::remove_file(segment.join("data_level0.bin")).unwrap();
    }

    /// `GET path` of the running service.
    fn get(&self, path: &str) -> (u16, Json) {
        http_get(&self.var("service_addr"), path)
    }

    /// The run's journal (`runbook show RUN_ID --format json`).
    fn show(&self, run_id: &str) -> Json {
        let r = self.runbook(&["show", run_id, "--format", "json"]);
        assert_eq!(r.code, 0, "{r:?}");
        r.json()
    }

    fn run_status(&self, run_id: &str) -> String {
        self.show(run_id)["status"].as_str().unwrap().to_string()
    }
}

fn testkit(args: &[&str]) -> Outcome {
    Command::new(TESTKIT)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run runbook-testkit")
        .into()
}

fn http_get(addr: &str, path: &str) -> (u16, Json) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap())
}

/// Creates the writer's stop file when dropped, so a failing test stops it too.
struct StopFile(PathBuf);

impl Drop for StopFile {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.0, "");
    }
}

// ------------------------------------------------------------- what data holds

/// Row counts per table and a digest of every row of every table, read through SQLite
/// (so a database and its WAL are read as one). A database without a `-wal` is opened
/// `immutable` so that reading it leaves nothing beside it.
#[derive(Debug, PartialEq, Eq)]
struct DbContent {
    counts: BTreeMap<String, i64>,
    digest: String,
}

fn open_db(path: &Path) -> Connection {
    let wal = PathBuf::from(format!("{}-wal", path.display()));
    let uri = if wal.exists() {
        format!("file:{}?mode=ro", path.display())
    } else {
        format!("file:{}?immutable=1", path.display())
    };
    Connection::open_with_flags(
        uri,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI,
    )
    .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn db_content(path: &Path) -> DbContent {
    let conn = open_db(path);
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut counts = BTreeMap::new();
    let mut h = Sha256::new();
    for table in tables {
        let mut stmt = conn
            .prepare(&format!("SELECT * FROM \"{table}\" ORDER BY rowid"))
            .unwrap();
        let columns = stmt.column_count();
        let mut rows = stmt.query([]).unwrap();
        let mut n = 0;
        while let Some(row) = rows.next().unwrap() {
            h.update(format!("{table}:"));
            for i in 0..columns {
                h.update(format!("{:?}|", row.get_ref(i).unwrap()));
            }
            n += 1;
        }
        counts.insert(table, n);
    }
    DbContent {
        counts,
        digest: runbook::actions::files::hex(&h.finalize()),
    }
}

fn integrity_check(path: &Path) -> Vec<String> {
    open_db(path)
        .prepare("PRAGMA integrity_check")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Every entry below `root` by relative path: directories, and files with mode, owner
/// and the sha256 of their bytes. SQLite's `-shm` index files are left out: they hold
/// no data and every reader of a WAL database rewrites them.
fn files_digest(root: &Path) -> BTreeMap<String, String> {
    walkdir::WalkDir::new(root)
        .sort_by_file_name()
        .into_iter()
        .map(Result::unwrap)
        .filter(|e| !e.file_name().to_string_lossy().ends_with("-shm"))
        .map(|e| {
            let rel = e.path().strip_prefix(root).unwrap().display().to_string();
            let m = e.path().symlink_metadata().unwrap();
            let what = if m.is_dir() {
                format!("dir {:o}", m.mode())
            } else {
                let bytes = std::fs::read(e.path()).unwrap();
                format!(
                    "{:o} {}:{} {}",
                    m.mode(),
                    m.uid(),
                    m.gid(),
                    runbook::actions::files::hex(&Sha256::digest(&bytes))
                )
            };
            (rel, what)
        })
        .collect()
}

fn copy_tree(from: &Path, to: &Path) {
    for entry in walkdir::WalkDir::new(from) {
        let entry = entry.unwrap();
        let dest = to.join(entry.path().strip_prefix(from).unwrap());
        if entry.file_type().is_dir() {
            std::fs::create_dir_all(&dest).unwrap();
        } else {
            std::fs::copy(entry.path(), &dest).unwrap();
        }
    }
}

/// Overwrites one whole page in the middle of a database with garbage (same size).
fn corrupt_page(db: &Path) {
    let len = std::fs::metadata(db).unwrap().len();
    let page = 4096;
    let at = (len / page / 2) * page;
    let mut f = std::fs::OpenOptions::new().write(true).open(db).unwrap();
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(at)).unwrap();
    f.write_all(&vec![0xA5; page as usize]).unwrap();
}

fn millis(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .unwrap_or_else(|e| panic!("{rfc3339}: {e}"))
        .timestamp_millis()
}

/// A step of `show --format json` by key (main section).
fn journal_step<'a>(record: &'a Json, key: &str) -> &'a Json {
    record["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["key"] == key && s["section"] == "main")
        .unwrap_or_else(|| panic!("no step {key}: {record:#}"))
}

/// `(id, verdict, detail)` of a plan's steps (`plan --format json`).
fn verdicts(steps: &Json) -> Vec<(String, String, String)> {
    steps
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_string(),
                s["verdict"].as_str().unwrap().to_string(),
                s["detail"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// [`tree_digest`], except the content of SQLite `-shm` files (their existence, and
/// their directory's mtime, still count). A plan that checks the live database opens it
/// the ordinary read-only way when its `-wal` exists (the service has it open), and
/// every such reader takes a read mark in the shared-memory index: not data.
fn digest_but_shm(root: &Path) -> BTreeMap<PathBuf, String> {
    tree_digest(root)
        .into_iter()
        .map(|(path, digest)| {
            if path.to_string_lossy().ends_with("-shm") {
                (path, "a -shm index".to_string())
            } else {
                (path, digest)
            }
        })
        .collect()
}

/// Waits until the UTC time is past the second `stamp` names.
fn next_second(stamp: &str) {
    let now = || chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
    wait_until("the next second", Duration::from_secs(2), || {
        now().as_str() > stamp
    });
}

fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ------------------------------------------------------------------------ tests

/// A live writer commits one row every few ms (`sqlite-writer`, ids 1..k without gaps)
/// while `atocore/backup` runs: the snapshot passes `integrity_check` and holds exactly
/// the rows committed before its copy began, a prefix, never a row begun after it.
#[test]
fn backup_under_a_committing_writer_holds_a_consistent_prefix() {
    let ato = Ato::with(&[]); // 300 documents: a few MB to copy
    let log = ato.p("writer.log");
    let stop = ato.p("writer.stop");
    let db = ato.db().display().to_string();
    let _stop_writer = StopFile(stop.clone());
    let writer = Command::new(TESTKIT)
        .args(["sqlite-writer", &db, "2", "--seconds", "60", "--log"])
        .arg(&log)
        .arg("--stop-file")
        .arg(&stop)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Complete lines only: the writer may be half-way through one.
    let lines = |log: &Path| -> Vec<(i64, i64, i64)> {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        text[..text.rfind('\n').map_or(0, |i| i + 1)]
            .lines()
            .map(|l| {
                let v: Vec<i64> = l.split(' ').map(|w| w.parse().unwrap()).collect();
                (v[0], v[1], v[2])
            })
            .collect()
    };
    wait_until("20 commits", Duration::from_secs(20), || {
        lines(&log).len() >= 20
    });

    let r = ato.run("atocore/backup", &["--set", "include_chroma=true"]);
    let seen_after = lines(&log).len();
    wait_until("10 more commits", Duration::from_secs(20), || {
        lines(&log).len() >= seen_after + 10
    });
    std::fs::write(&stop, "").unwrap();
    let out = writer.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(r.code, 0, "{r:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    let commits: i64 = said.split_whitespace().nth(1).unwrap().parse().unwrap();
    let log = lines(&log);
    assert_eq!(log.len() as i64, commits, "{said}");

    let stamp = r.outputs()["stamp"].as_str().unwrap().to_string();
    let snap = ato.snapshot(&stamp).join("db/atocore.db");
    assert_eq!(integrity_check(&snap), ["ok"]);
    let conn = open_db(&snap);
    let ids: Vec<i64> = conn
        .prepare("SELECT id FROM writes ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let k = ids.len() as i64;
    assert_eq!(ids, (1..=k).collect::<Vec<_>>(), "the snapshot has gaps");
    assert!(k >= 20 && k < commits, "k = {k} of {commits}");
    // Its rows are the live database's first k rows, byte for byte.
    let rows = |conn: &Connection| -> Vec<(i64, i64, i64, Vec<u8>)> {
        conn.prepare("SELECT id, at_ms, latency_us, payload FROM writes WHERE id <= ?1 ORDER BY id")
            .unwrap()
            .query_map([k], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    assert_eq!(rows(&conn), rows(&open_db(&ato.db())));
    // The AtoCore tables came along unchanged.
    let snap_counts = db_content(&snap).counts;
    assert_eq!(snap_counts["documents"], 300);
    assert_eq!(snap_counts["writes"], k);

    // Against the journal's times of the copy step: a row committed before it began is
    // in the snapshot; a row begun after it ended is not (1 ms for rounding).
    let record = ato.show(&r.run_id());
    let step = journal_step(&record, "db");
    let (began, ended) = (
        millis(step["started_at"].as_str().unwrap()),
        millis(step["finished_at"].as_str().unwrap()),
    );
    let committed_before = log
        .iter()
        .filter(|(_, at, lat)| at + lat / 1000 + 2 < began)
        .count();
    let begun_after = log.iter().filter(|(_, at, _)| *at > ended + 1).count();
    assert!(committed_before >= 20 && begun_after >= 10, "{log:?}");
    for (id, at, lat) in &log {
        if at + lat / 1000 + 2 < began {
            assert!(*id <= k, "row {id} committed before the copy is missing");
        }
        if *at > ended + 1 {
            assert!(*id > k, "row {id} begun after the copy is in it");
        }
    }
    // The metadata's checksum is the snapshot's.
    let meta: Json = serde_json::from_slice(
        &std::fs::read(ato.snapshot(&stamp).join("backup-metadata.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        meta["db"]["sha256"].as_str().unwrap(),
        runbook::actions::files::hex(&Sha256::digest(std::fs::read(&snap).unwrap()))
    );
    assert_eq!(meta["include_chroma"], true);
}

/// Each kind of damage is refused by `atocore/validate` with the procedure's error
/// string, in the run's refusal and in the plan's step verdicts; a good snapshot is
/// valid with no errors; validating writes nothing.
#[test]
fn validate_refuses_each_kind_of_damaged_snapshot_with_its_error_string() {
    let ato = Ato::new();
    let good = ato.backup(true);
    let ok = ato.run("atocore/validate", &["--set", &format!("stamp={good}")]);
    assert_eq!(ok.code, 0, "{ok:?}");
    assert_eq!(ok.outputs()["valid"], true);
    assert_eq!(ok.outputs()["errors"], json!([]));

    let copy = |stamp: &str| {
        let dir = ato.snapshot(stamp);
        copy_tree(&ato.snapshot(&good), &dir);
        dir
    };
    // A daily snapshot (no vector store) whose database is corrupt: its chroma check
    // is skipped, and the plan still knows the verdict.
    let daily = copy("20260405T020000Z");
    std::fs::remove_dir_all(daily.join("chroma")).unwrap();
    let meta_path = daily.join("backup-metadata.json");
    let mut meta: Json = serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
    meta["include_chroma"] = json!(false);
    meta["chroma"] = Json::Null;
    std::fs::write(&meta_path, meta.to_string()).unwrap();
    corrupt_page(&daily.join("db/atocore.db"));

    let truncated = copy("20260401T020000Z").join("db/atocore.db");
    let len = std::fs::metadata(&truncated).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&truncated)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    corrupt_page(&copy("20260402T020000Z").join("db/atocore.db"));
    std::fs::write(
        copy("20260403T020000Z").join("config/project-registry.json"),
        "{\"projects\": [{\"id\": \"p05-interferometer\", \"name\": \"P05",
    )
    .unwrap();
    std::fs::remove_dir_all(copy("20260404T020000Z").join("chroma")).unwrap();

    // (stamp, error string, the check that fails, how its verdict begins)
    let cases = [
        (
            "20260401T020000Z",
            "db_integrity_check_failed",
            "db",
            "db_integrity_check_failed: ",
        ),
        (
            "20260402T020000Z",
            "db_integrity_check_failed",
            "db",
            "db_integrity_check_failed: ",
        ),
        (
            "20260403T020000Z",
            "registry_invalid_json",
            "registry",
            "registry_invalid_json: ",
        ),
        ("20260404T020000Z", "chroma_snapshot_missing", "chroma", "`"),
        (
            "20260405T020000Z",
            "db_integrity_check_failed",
            "db",
            "db_integrity_check_failed: ",
        ),
    ];
    let before = tree_digest(ato.dir());
    for (stamp, error, check, detail) in cases {
        let set = format!("stamp={stamp}");
        let refusal = format!(
            "refusing to run `atocore/validate`: step `verdict` would fail: snapshot {stamp} is not valid ({error}): refusing to rely on it\n"
        );
        let run = ato.run("atocore/validate", &["--set", &set]);
        assert_eq!(run.code, 3, "{stamp}: {run:?}");
        assert!(run.error().starts_with(&refusal), "{stamp}: {run:?}");

        let plan = ato.plan("atocore/validate", &["--set", &set]);
        assert_eq!(plan.code, 3, "{stamp}: {plan:?}");
        let steps = verdicts(&plan.json()["steps"]);
        for (id, verdict, text) in &steps {
            let want = match id.as_str() {
                "verdict" => "would-fail",
                "chroma" if stamp == "20260405T020000Z" => "skipped",
                id if id == check => "would-fail",
                _ => "no-change",
            };
            assert_eq!(verdict, want, "{stamp}: step {id}: {text}");
        }
        let (_, _, failing) = steps.iter().find(|(id, _, _)| id == check).unwrap();
        assert!(failing.starts_with(detail), "{stamp}: {failing}");
        if check == "chroma" {
            assert!(failing.ends_with("/chroma`: does not exist"), "{failing}");
        }
        assert_eq!(
            steps.last().unwrap().2,
            format!("snapshot {stamp} is not valid ({error}): refusing to rely on it")
        );
    }
    assert_eq!(tree_digest(ato.dir()), before, "validating wrote something");
}

/// A valid snapshot restored over damaged live data: the restore and a separate
/// `atocore/verify` pass, and the live data is the snapshot's (rows, registry bytes,
/// vector store); the safety copy holds what was there before.
#[test]
fn restore_of_a_valid_snapshot_then_verify_passes_and_live_data_is_the_snapshot() {
    let ato = Ato::new();
    ato.start_service();
    let stamp = ato.backup(true);
    let snap = ato.snapshot(&stamp);
    ato.damage_live();
    let damaged_db = db_content(&ato.db());
    assert_eq!(damaged_db.counts["documents"], 0);
    let damaged_registry = std::fs::read(ato.registry()).unwrap();
    let damaged_chroma = files_digest(&ato.chroma());
    let pid = ato.service_pid().unwrap();

    let r = ato.run("atocore/restore", &["--set", "stamp=latest", "--yes"]);
    assert_eq!(r.code, 0, "{r:?}");
    let out = r.outputs();
    assert_eq!(out["restored"], stamp.as_str());
    assert_eq!(out["documents"], 60);
    let verify = ato.run("atocore/verify", &[]);
    assert_eq!(verify.code, 0, "{verify:?}");
    assert_eq!(verify.outputs()["documents"], 60);
    assert_eq!(verify.outputs()["projects"], 3);

    assert_eq!(
        db_content(&ato.db()),
        db_content(&snap.join("db/atocore.db"))
    );
    assert_eq!(
        std::fs::read(ato.db()).unwrap(),
        std::fs::read(snap.join("db/atocore.db")).unwrap()
    );
    assert_eq!(
        std::fs::read(ato.registry()).unwrap(),
        std::fs::read(snap.join("config/project-registry.json")).unwrap()
    );
    assert_eq!(
        files_digest(&ato.chroma()),
        files_digest(&snap.join("chroma"))
    );
    let db_mode = std::fs::metadata(ato.db()).unwrap().permissions().mode() & 0o777;
    assert_eq!(db_mode, 0o600);

    // The safety copy is the state before the restore.
    let preserve = out["preserve_stamp"].as_str().unwrap();
    let safety = ato.root().join(format!("backups/pre-restore-{preserve}"));
    assert_eq!(db_content(&safety.join("atocore.db")), damaged_db);
    assert_eq!(
        std::fs::read(safety.join("project-registry.json")).unwrap(),
        damaged_registry
    );
    let aside = ato.data().join(format!("chroma.pre-restore-{preserve}"));
    assert_eq!(files_digest(&aside), damaged_chroma);
    // The service was restarted on the restored data.
    let now = ato.service_pid().unwrap();
    assert_ne!(now, pid, "the service was not restarted");
    assert_eq!(ato.get("/stats").1["documents"], 60);
    ato.stop_service();
}

/// An invalid snapshot is refused before anything is touched: the plan and the run
/// exit 3 naming the validator's error, the whole sandbox (live data, registry,
/// journal) is unchanged and the service was never stopped.
#[test]
fn restore_of_an_invalid_snapshot_is_refused_and_touches_nothing() {
    let ato = Ato::new();
    ato.start_service();
    let good = ato.backup(true);
    let bad = "20260407T060000Z";
    copy_tree(&ato.snapshot(&good), &ato.snapshot(bad));
    corrupt_page(&ato.snapshot(bad).join("db/atocore.db"));
    let pid = ato.service_pid().unwrap();
    assert_eq!(ato.get("/health").0, 200); // the service has read the database
    let before = tree_digest(ato.dir());
    let set = format!("stamp={bad}");
    let why =
        format!("snapshot {bad} is not valid (db_integrity_check_failed): refusing to rely on it");

    let plan = ato.plan("atocore/restore", &["--set", &set, "--yes"]);
    assert_eq!(plan.code, 3, "{plan:?}");
    let doc = plan.json();
    assert_eq!(doc["ok"], false);
    let steps = verdicts(&doc["steps"]);
    assert_eq!(
        steps[0],
        (
            "validate".to_string(),
            "would-fail".to_string(),
            format!("step `verdict` of `atocore/validate` would fail: {why}")
        )
    );
    let inner = verdicts(&doc["steps"][0]["steps"]);
    let db = inner.iter().find(|(id, _, _)| id == "db").unwrap();
    assert_eq!(db.1, "would-fail");
    assert!(db.2.starts_with("db_integrity_check_failed: "), "{db:?}");
    assert_eq!(tree_digest(ato.dir()), before, "the plan wrote something");

    let run = ato.run("atocore/restore", &["--set", &set, "--yes"]);
    assert_eq!(run.code, 3, "{run:?}");
    assert_eq!(
        run.error(),
        format!(
            "refusing to run `atocore/restore`: step `validate/verdict` would fail: {why}\nnothing was changed; fix the cause and run again (`runbook plan` shows the whole plan)"
        )
    );
    let vars = ato.vars();
    let text = ato.runbook(&[
        "run",
        "atocore/restore",
        "--vars",
        &vars,
        "--set",
        &set,
        "--yes",
    ]);
    assert_eq!(text.code, 3, "{text:?}");
    assert!(
        text.stdout.contains(&format!(
            "  would fail  validate         runbook: step `verdict` of `atocore/validate` would fail: {why}\n"
        )),
        "{text:?}"
    );
    assert!(
        text.stderr.starts_with(&format!(
            "error: refusing to run `atocore/restore`: step `validate/verdict` would fail: {why}\n"
        )),
        "{text:?}"
    );
    assert_eq!(
        tree_digest(ato.dir()),
        before,
        "a refused restore wrote something"
    );
    assert_eq!(ato.service_pid(), Some(pid), "the service was stopped");
    assert_eq!(ato.get("/health").0, 200);
    ato.stop_service();
}

/// A restore whose verification fails (`min_documents: 1000000` from a second vars
/// file, which the called `atocore/verify` reads) rolls back: exit 1, status
/// `rolled-back`, the live data as it was before byte for byte, the service running.
#[test]
fn restore_whose_verify_fails_rolls_back_to_the_data_before_it() {
    let ato = Ato::new();
    ato.start_service();
    let stamp = ato.backup(true);
    ato.damage_live();
    // The running service has read it, as it would have: its WAL and index exist.
    assert_eq!(ato.get("/stats").1["documents"], 0);
    assert!(ato.p("srv/storage/atocore/data/db/atocore.db-wal").exists());
    let data = files_digest(&ato.data());
    let registry = std::fs::read(ato.registry()).unwrap();
    let rows = db_content(&ato.db());
    let pid = ato.service_pid().unwrap();
    std::fs::write(ato.p("strict.yaml"), "min_documents: 1000000\n").unwrap();

    let strict = ato.p("strict.yaml").display().to_string();
    let r = ato.run(
        "atocore/restore",
        &["--vars", &strict, "--set", "stamp=latest", "--yes"],
    );
    assert_eq!(r.code, 1, "{r:?}");
    let fin = r.finished();
    assert_eq!(fin["status"], "rolled-back");
    assert!(
        fin["error"]
            .as_str()
            .unwrap()
            .ends_with("`.documents >= 1000000` does not hold: expected true, got false"),
        "{fin}"
    );
    // The restore did happen before it was undone.
    let events = r.events();
    let done = |key: &str| {
        events
            .iter()
            .any(|e| e["event"] == "step-succeeded" && e["key"] == key)
    };
    assert!(
        done("db") && done("chroma") && done("verify/health"),
        "{r:?}"
    );
    assert!(done("undo/db") && done("undo/chroma-back") && done("undo/start/process-start"));
    assert_eq!(ato.run_status(&r.run_id()), "rolled-back");
    let validated = events
        .iter()
        .find(|e| e["event"] == "step-succeeded" && e["key"] == "validate")
        .unwrap();
    assert_eq!(validated["outputs"]["stamp"], stamp.as_str());

    assert_eq!(files_digest(&ato.data()), data, "the data dir differs");
    assert_eq!(std::fs::read(ato.registry()).unwrap(), registry);
    assert_eq!(db_content(&ato.db()), rows);
    let now = ato.service_pid().expect("the service is not running");
    assert_ne!(now, pid);
    assert_eq!(ato.get("/health").0, 200);
    assert_eq!(ato.get("/stats").1["documents"], 0);
    ato.stop_service();
}

/// One restore killed (SIGKILL) right after step `point` succeeded, then resumed with
/// `runbook resume RUN_ID --yes`: where it was killed (the first main step not done),
/// or `end` when it had finished.
fn restore_killed_after(point: &str) -> String {
    let ato = Ato::new();
    ato.start_service();
    let stamp = ato.backup(true);
    ato.damage_live();
    let vars = ato.vars();
    let mut child: Child = ato
        .cmd(&[
            "run",
            "atocore/restore",
            "--vars",
            &vars,
            "--set",
            "stamp=latest",
            "--yes",
            "--format",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut id = None;
    let mut killed = false;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let event: Json = serde_json::from_str(&line.unwrap()).unwrap();
        id.get_or_insert_with(|| event["run_id"].as_str().unwrap().to_string());
        if event["event"] == "step-succeeded" && event["key"] == point {
            child.kill().unwrap();
            killed = true;
            break;
        }
    }
    child.wait().unwrap();
    assert!(killed, "{point}: the run never reported it");
    let id = id.unwrap();
    let record = ato.show(&id);
    let status = record["status"].as_str().unwrap();
    let stopped_at = record["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["section"] == "main" && !s["key"].as_str().unwrap().contains('/'))
        .find(|s| s["status"] != "succeeded" && s["status"] != "skipped")
        .map_or("end".to_string(), |s| {
            s["key"].as_str().unwrap().to_string()
        });
    assert_eq!(
        status,
        if stopped_at == "end" {
            "succeeded"
        } else {
            "interrupted"
        },
        "{point}: {record:#}"
    );

    let r = ato.runbook(&["resume", &id, "--yes"]);
    assert_eq!(r.code, 0, "{point}: {r:?}");
    assert_eq!(ato.run_status(&id), "succeeded", "{point}");
    let snap = ato.snapshot(&stamp);
    assert_eq!(
        db_content(&ato.db()),
        db_content(&snap.join("db/atocore.db")),
        "{point}"
    );
    assert_eq!(
        std::fs::read(ato.registry()).unwrap(),
        std::fs::read(snap.join("config/project-registry.json")).unwrap(),
        "{point}"
    );
    assert_eq!(
        files_digest(&ato.chroma()),
        files_digest(&snap.join("chroma")),
        "{point}"
    );
    let verify = ato.run("atocore/verify", &[]);
    assert_eq!(verify.code, 0, "{point}: {verify:?}");
    assert_eq!(verify.outputs()["documents"], 60, "{point}");
    ato.stop_service();
    assert_eq!(ato.service_pid(), None);
    stopped_at
}

/// SIGKILL of the engine after each step of `atocore/restore` in turn, then `resume`:
/// every time the same end state as an uninterrupted restore.
#[test]
fn restore_killed_after_any_step_resumes_to_the_same_state() {
    let points = [
        "validate",
        "go",
        "stop/process-stop",
        "stop",
        "safety-dir",
        "safety-db",
        "safety-wal",
        "drop-shm",
        "safety-registry",
        "db",
        "registry",
        "chroma",
        "start/process-start",
        "start",
        "verify/health",
    ];
    let started = Instant::now();
    let mut stopped_at = BTreeMap::new();
    for point in points {
        stopped_at.insert(point, restore_killed_after(point));
    }
    let places: BTreeSet<&String> = stopped_at.values().collect();
    let mid_run = stopped_at.values().filter(|s| *s != "end").count();
    assert!(
        places.len() >= 8 && mid_run >= 10,
        "the kills landed in too few places: {stopped_at:?}"
    );
    eprintln!(
        "killed at {stopped_at:?} in {:.1}s",
        started.elapsed().as_secs_f64()
    );
}

/// The retention policy on a simulated calendar: one snapshot a day at 02:00Z from
/// 2026-01-01 to 2026-11-26. The plan names the 315 that would go and deletes nothing;
/// the run keeps exactly the 15 the policy names.
#[test]
fn retention_keeps_7_daily_4_weekly_6_monthly_on_a_simulated_calendar() {
    let ato = Ato::new();
    let mut day = chrono::NaiveDate::from_ymd_opt(2026, 1, 1).unwrap();
    let last = chrono::NaiveDate::from_ymd_opt(2026, 11, 26).unwrap();
    let mut all = Vec::new();
    while day <= last {
        let stamp = day.format("%Y%m%dT020000Z").to_string();
        std::fs::create_dir(ato.snapshot(&stamp)).unwrap();
        all.push(stamp);
        day = day.succ_opt().unwrap();
    }
    assert_eq!(all.len(), 330);
    // Not snapshots: never touched.
    std::fs::create_dir(ato.snapshots().join(".partial-20260101T020000Z")).unwrap();
    std::fs::create_dir(ato.snapshots().join("manual-copy")).unwrap();
    for sunday in ["2026-11-22", "2026-11-15", "2026-11-08", "2026-11-01"] {
        let d: chrono::NaiveDate = sunday.parse().unwrap();
        assert_eq!(chrono::Datelike::weekday(&d), chrono::Weekday::Sun);
    }
    let expected: BTreeSet<String> = [
        // the last 7 days
        "20261120", "20261121", "20261122", "20261123", "20261124", "20261125", "20261126",
        // the last 4 Sundays (11-22 is also a daily one)
        "20261115", "20261108", "20261101", // the 1st of the last 6 months
        "20261001", "20260901", "20260801", "20260701", "20260601",
    ]
    .iter()
    .map(|d| format!("{d}T020000Z"))
    .collect();
    assert_eq!(expected.len(), 15);

    let before = tree_digest(ato.dir());
    let plan = ato.plan("atocore/retention", &[]);
    assert_eq!(plan.code, 0, "{plan:?}");
    let steps = verdicts(&plan.json()["steps"]);
    assert_eq!(steps.len(), 1);
    assert_eq!(steps[0].1, "will-change");
    let detail = &steps[0].2;
    let (deleted, kept) = detail
        .strip_prefix("delete 315 of 330 snapshots: ")
        .and_then(|d| d.split_once("; keep 15: "))
        .unwrap_or_else(|| panic!("{detail}"));
    let would_go: BTreeSet<String> = deleted.split(' ').map(str::to_string).collect();
    let going: BTreeSet<String> = all
        .iter()
        .filter(|s| !expected.contains(*s))
        .cloned()
        .collect();
    assert_eq!(would_go, going);
    assert!(
        kept.starts_with("20261126T020000Z [daily (2026-11-26), newest]; "),
        "{kept}"
    );
    assert!(
        kept.contains("20261101T020000Z [weekly (week of Sunday 2026-11-01), monthly (2026-11)]"),
        "{kept}"
    );
    assert_eq!(tree_digest(ato.dir()), before, "the plan deleted something");

    let r = ato.run("atocore/retention", &[]);
    assert_eq!(r.code, 0, "{r:?}");
    let left: BTreeSet<String> = std::fs::read_dir(ato.snapshots())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let mut want = expected.clone();
    want.insert(".partial-20260101T020000Z".into());
    want.insert("manual-copy".into());
    assert_eq!(left, want);
    let outputs = r.outputs();
    let kept: BTreeSet<String> = outputs["kept"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["stamp"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kept, expected, "{outputs}");
    assert_eq!(
        outputs["kept"][9],
        json!({"stamp": "20261101T020000Z", "why": ["weekly (week of Sunday 2026-11-01)", "monthly (2026-11)"]})
    );
    let deleted: BTreeSet<String> = serde_json::from_value(outputs["deleted"].clone()).unwrap();
    assert_eq!(deleted, going);

    // Again: nothing more to do.
    let again = ato.plan("atocore/retention", &[]);
    assert_eq!(again.code, 0, "{again:?}");
    assert_eq!(verdicts(&again.json()["steps"])[0].1, "no-change");
}

/// The stand-in in a container of a Compose project (the image `FROM scratch` the
/// service tests build), the sandbox's AtoCore root bind-mounted at /atocore: the
/// restore stops it with `docker compose stop`, starts it again, and verifies it.
#[test]
fn restore_stops_and_starts_the_service_under_compose() {
    let image = image(); // fails, never skips, without Docker
    let ato = Ato::new();
    let port = free_port();
    let project = ComposeProject::new(&ato, image, port);
    let compose_vars = ato.p("compose.yaml");
    std::fs::write(
        &compose_vars,
        format!(
            "service_manager: compose\ncompose_dir: \"{}\"\ncompose_service: atocore\nservice_url: \"http://127.0.0.1:{port}\"\n",
            project.dir.display()
        ),
    )
    .unwrap();
    let compose_vars = compose_vars.display().to_string();
    let with = |extra: &[&str]| -> Vec<String> {
        let mut v = vec!["--vars".to_string(), compose_vars.clone()];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let run = |name: &str, extra: &[&str]| {
        let args = with(extra);
        ato.run(name, &args.iter().map(String::as_str).collect::<Vec<_>>())
    };

    let up = run("atocore/service", &["--set", "state=started"]);
    assert_eq!(up.code, 0, "{up:?}");
    let container = project.container();
    let first_start = project.started_at(&container);
    wait_until("the stand-in answers", Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            && http_get(&format!("127.0.0.1:{port}"), "/health").0 == 200
    });
    let stamp = ato.backup(true);
    ato.damage_live();
    assert_eq!(
        http_get(&format!("127.0.0.1:{port}"), "/stats").1["documents"],
        0
    );

    let r = run("atocore/restore", &["--set", "stamp=latest", "--yes"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.outputs()["documents"], 60);
    let events = r.events();
    let outputs_of = |key: &str| {
        events
            .iter()
            .find(|e| e["event"] == "step-succeeded" && e["key"] == key)
            .unwrap_or_else(|| panic!("{key} did not succeed: {r:?}"))["outputs"]
            .clone()
    };
    assert_eq!(
        outputs_of("stop/compose-stop")["states"]["atocore"],
        "stopped"
    );
    assert_eq!(
        outputs_of("start/compose-start")["states"]["atocore"],
        "running"
    );
    let record = ato.show(&r.run_id());
    let (began, ended) = (
        millis(record["started_at"].as_str().unwrap()),
        millis(record["finished_at"].as_str().unwrap()),
    );
    // The same container, stopped during the restore and started again.
    assert_eq!(project.container(), container);
    let finished = project.finished_at(&container);
    let second_start = project.started_at(&container);
    assert!(first_start < began, "{first_start} {began}");
    assert!(
        began <= finished && finished <= second_start && second_start <= ended,
        "run {began}..{ended}, container stopped at {finished}, started at {second_start}"
    );
    assert_eq!(
        db_content(&ato.db()),
        db_content(&ato.snapshot(&stamp).join("db/atocore.db"))
    );
    assert_eq!(
        http_get(&format!("127.0.0.1:{port}"), "/stats").1["documents"],
        60
    );
    let down = run("atocore/service", &["--set", "state=stopped"]);
    assert_eq!(down.code, 0, "{down:?}");
}

/// A Compose project in the sandbox dir running the stand-in on the sandbox's data;
/// `down` when dropped.
struct ComposeProject {
    /// The compose file's directory; its name (unique) is the project's name.
    dir: PathBuf,
}

impl ComposeProject {
    fn new(ato: &Ato, image: &str, port: u16) -> ComposeProject {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = ato.p(&format!("rbtatocore{}n{n}", std::process::id()));
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(
            dir.join("docker-compose.yml"),
            format!(
                r#"version: "2.4"
services:
  atocore:
    image: {image}
    entrypoint: ["/runbook-testkit", "atocore-standin"]
    command: ["--root", "/atocore", "--listen", "0.0.0.0:8100"]
    ports: ["127.0.0.1:{port}:8100"]
    volumes: ["{root}:/atocore"]
"#,
                root = ato.root().display()
            ),
        )
        .unwrap();
        ComposeProject { dir }
    }

    fn compose(&self, args: &[&str]) -> std::process::Output {
        let tool = runbook::actions::services::compose_command().expect("a compose tool");
        Command::new(&tool[0])
            .args(&tool[1..])
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .output()
            .expect("run compose")
    }

    fn container(&self) -> String {
        let out = self.compose(&["ps", "-a", "-q", "atocore"]);
        assert!(out.status.success(), "{out:?}");
        let ids = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert_eq!(ids.lines().count(), 1, "containers: {ids:?}");
        ids
    }

    fn inspect_time(&self, container: &str, field: &str) -> i64 {
        let text = docker_ok(&[
            "inspect",
            "-f",
            &format!("{{{{.State.{field}}}}}"),
            container,
        ]);
        millis(&text)
    }

    fn started_at(&self, container: &str) -> i64 {
        self.inspect_time(container, "StartedAt")
    }

    fn finished_at(&self, container: &str) -> i64 {
        self.inspect_time(container, "FinishedAt")
    }
}

impl Drop for ComposeProject {
    fn drop(&mut self) {
        let out = self.compose(&["down", "-t", "0", "-v"]);
        if !out.status.success() {
            eprintln!(
                "compose down in {} failed: {}",
                self.dir.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// `runbook plan` of every bundled AtoCore runbook against a working sandbox passes
/// and writes nothing; a rollback plan without its safety copy, and a backup plan
/// without the live database, name the step that would fail.
#[test]
fn every_atocore_runbook_plans_clean_against_the_sandbox_and_writes_nothing() {
    let ato = Ato::new();
    ato.start_service();
    let stamp = ato.backup(true);
    let restore = ato.run("atocore/restore", &["--set", "stamp=latest", "--yes"]);
    assert_eq!(restore.code, 0, "{restore:?}");
    let preserve = restore.outputs()["preserve_stamp"]
        .as_str()
        .unwrap()
        .to_string();
    let drill_port = free_port();
    let drill_argv = json!([
        TESTKIT,
        "atocore-standin",
        "--root",
        ato.p("drill/atocore"),
        "--listen",
        format!("127.0.0.1:{drill_port}")
    ])
    .to_string();
    let drill_dir = ato.p("drill").display().to_string();
    // The off-site runbooks plan against a real off-site host holding the snapshot.
    let host = crate::support::OffsiteHost::start();
    let off = offsite::Offsite::new(&host, ato.dir());
    let offsite_vars = off.vars();
    let shipped = ato.run("atocore/offsite", &["--vars", &offsite_vars]);
    assert_eq!(shipped.code, 0, "{shipped:?}");
    // Pinned from here on, as the operator records it after the first push (the new
    // host below needs it).
    off.pin(shipped.outputs()["key"].as_str().unwrap());
    let plans: Vec<(&str, Vec<String>)> = vec![
        ("atocore/offsite", vec![]),
        ("atocore/offsite", vec![format!("stamp={stamp}")]),
        ("atocore/offsite-list", vec![]),
        ("atocore/offsite-check", vec![]),
        ("atocore/offsite-check", vec!["subset=all".into()]),
        ("atocore/offsite-retention", vec![]),
        ("atocore/service", vec!["state=started".into()]),
        ("atocore/service", vec!["state=stopped".into()]),
        ("atocore/backup", vec![]),
        ("atocore/backup", vec!["include_chroma=true".into()]),
        ("atocore/list", vec![]),
        ("atocore/validate", vec![]),
        ("atocore/validate", vec![format!("stamp={stamp}")]),
        ("atocore/verify", vec![]),
        ("atocore/retention", vec![]),
        ("atocore/restore", vec![format!("stamp={stamp}")]),
        (
            "atocore/rollback",
            vec![format!("preserve_stamp={preserve}")],
        ),
        (
            "atocore/drill",
            vec![
                format!("drill_dir={drill_dir}"),
                format!("drill_service_argv={drill_argv}"),
                format!("drill_addr=127.0.0.1:{drill_port}"),
            ],
        ),
        (
            "atocore/drill-cycle",
            vec![
                format!("testkit={TESTKIT}"),
                format!("drill_dir={drill_dir}"),
                format!("scratch_addr=127.0.0.1:{drill_port}"),
            ],
        ),
        (
            "atocore/restore-must-roll-back",
            vec![format!("stamp={stamp}")],
        ),
    ];
    let listed: BTreeSet<String> = std::fs::read_dir(Path::new(RUNBOOKS).join("atocore"))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".yaml").map(|n| format!("atocore/{n}"))
        })
        .collect();
    let mut planned: BTreeSet<String> = plans.iter().map(|(n, _)| n.to_string()).collect();
    // Recover plans on a new host (below): here, a live database refuses it.
    planned.insert("atocore/recover".into());
    assert_eq!(planned, listed, "a bundled runbook is not planned here");

    // A backup (restore) planned in the second of the last one would name the same
    // snapshot (safety copy), and be refused: it exists.
    next_second(&preserve);
    let before = digest_but_shm(ato.dir());
    let remote_before = tree_digest(&host.repo_dir);
    for (name, sets) in &plans {
        let mut args = vec!["--yes".to_string(), "--vars".into(), offsite_vars.clone()];
        for s in sets {
            args.push("--set".into());
            args.push(s.clone());
        }
        let r = ato.plan(name, &args.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(r.code, 0, "{name} {sets:?}: {r:?}");
        assert_eq!(r.json()["ok"], true, "{name}");
    }
    // The rollback of a restore that never ran: its safety copy is missing.
    let r = ato.plan(
        "atocore/rollback",
        &["--set", "preserve_stamp=20200101T000000Z"],
    );
    assert_eq!(r.code, 3, "{r:?}");
    let steps = verdicts(&r.json()["steps"]);
    let safety = ato
        .root()
        .join("backups/pre-restore-20200101T000000Z/atocore.db");
    assert_eq!(
        steps[0],
        (
            "have-safety-copy".to_string(),
            "would-fail".to_string(),
            format!("`{}`: does not exist", safety.display())
        )
    );
    assert_eq!(digest_but_shm(ato.dir()), before, "a plan wrote something");
    assert_eq!(
        tree_digest(&host.repo_dir),
        remote_before,
        "a plan wrote off-site"
    );
    // atocore/recover on a brand-new host plans clean and writes nothing there either,
    // and so do the list and the check there (with the identity: it has no key).
    let new_host = Ato::with(&["--empty"]);
    let new_before = tree_digest(new_host.dir());
    let r = new_host.plan("atocore/recover", &["--vars", &offsite_vars]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["ok"], true);
    let identity = off.identity_set();
    for name in ["atocore/offsite-list", "atocore/offsite-check"] {
        let r = new_host.plan(name, &["--vars", &offsite_vars, "--set", &identity]);
        assert_eq!(r.code, 0, "{name}: {r:?}");
        assert_eq!(r.json()["ok"], true, "{name}");
    }
    assert_eq!(
        tree_digest(new_host.dir()),
        new_before,
        "the recover plan wrote"
    );
    assert_eq!(
        tree_digest(&host.repo_dir),
        remote_before,
        "a plan wrote off-site"
    );

    // Without the live database the backup's plan refuses at its `db` step.
    ato.stop_service();
    for f in ["atocore.db", "atocore.db-wal", "atocore.db-shm"] {
        let _ = std::fs::remove_file(ato.data().join("db").join(f));
    }
    let before = tree_digest(ato.dir());
    let r = ato.plan("atocore/backup", &[]);
    assert_eq!(r.code, 3, "{r:?}");
    let steps = verdicts(&r.json()["steps"]);
    let db = steps.iter().find(|(id, _, _)| id == "db").unwrap();
    assert_eq!(
        (db.1.as_str(), db.2.as_str()),
        (
            "would-fail",
            format!("source `{}` does not exist", ato.db().display()).as_str()
        )
    );
    let run = ato.run("atocore/backup", &[]);
    assert_eq!(run.code, 3, "{run:?}");
    assert!(
        run.error().starts_with(&format!(
            "refusing to run `atocore/backup`: step `db` would fail: source `{}` does not exist\n",
            ato.db().display()
        )),
        "{run:?}"
    );
    assert_eq!(
        tree_digest(ato.dir()),
        before,
        "a refused backup wrote something"
    );
}

/// The drill restores the newest snapshot into a scratch directory with its own
/// service, verifies it, stops it and removes the scratch copy; the live service and
/// data are not touched.
#[test]
fn the_drill_verifies_a_scratch_restore_and_leaves_nothing_behind() {
    let ato = Ato::new();
    ato.start_service();
    let stamp = ato.backup(true);
    let pid = ato.service_pid().unwrap();
    ato.guard(&ato.p("drill/service.pid"));
    std::fs::create_dir(ato.p("drill")).unwrap();
    let live = files_digest(&ato.root().join("data"));
    let port = free_port();
    let argv = json!([
        TESTKIT,
        "atocore-standin",
        "--root",
        ato.p("drill/atocore"),
        "--listen",
        format!("127.0.0.1:{port}")
    ])
    .to_string();
    let r = ato.run(
        "atocore/drill",
        &[
            "--set",
            &format!("drill_dir={}", ato.p("drill").display()),
            "--set",
            &format!("drill_service_argv={argv}"),
            "--set",
            &format!("drill_addr=127.0.0.1:{port}"),
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    let out = r.outputs();
    assert_eq!(out["stamp"], stamp.as_str());
    assert_eq!(out["documents"], 60);
    let rto = out["rto_seconds"].as_f64().unwrap();
    assert!(rto > 0.0 && rto < 60.0, "{out}");
    assert!(!ato.p("drill/atocore").exists());
    assert_eq!(
        runbook::actions::daemon::running(&ato.p("drill/service.pid")),
        None
    );
    let log = std::fs::read_to_string(ato.p("drill/service.log")).unwrap();
    assert!(log.contains("POST /context/build -> 200"), "{log}");
    assert_eq!(files_digest(&ato.root().join("data")), live);
    assert_eq!(ato.service_pid(), Some(pid));
    ato.stop_service();
}

// A child module, so it uses the fixture above (`Ato`, `verdicts`) as it is.
#[path = "incremental.rs"]
mod incremental;
#[path = "atocore_offsite.rs"]
mod offsite;
