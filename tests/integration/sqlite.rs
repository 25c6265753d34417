//! sqlite-backup, sqlite-check, sqlite-query: real SQLite files, a real writer process
//! (`runbook-testkit sqlite-writer`), the real binary.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};

use crate::support::{Run, Sandbox, tree_digest};

const TESTKIT: &str = env!("CARGO_BIN_EXE_runbook-testkit");

/// A database of `rows` rows of `blob` random bytes, written in one transaction
/// without a journal, then switched to WAL (or left in rollback mode).
fn make_db(path: &Path, rows: u32, blob: u32, wal: bool) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let c = Connection::open(path).unwrap();
    c.execute_batch(&format!(
        "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;
         CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT NOT NULL, qty INTEGER, body BLOB);
         BEGIN;
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {rows})
         INSERT INTO items(name, qty, body) SELECT 'item-' || i, i % 7, randomblob({blob}) FROM n;
         COMMIT;"
    ))
    .unwrap();
    if wal {
        c.pragma_update(None, "journal_mode", "wal").unwrap();
    } else {
        c.pragma_update(None, "journal_mode", "delete").unwrap();
    }
}

/// Opens a database without creating anything beside it.
fn open_immutable(path: &Path) -> Connection {
    Connection::open_with_flags(
        format!("file:{}?immutable=1", path.display()),
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI,
    )
    .unwrap()
}

fn integrity(path: &Path) -> String {
    let c = open_immutable(path);
    let rows: Vec<String> = c
        .prepare("PRAGMA integrity_check")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    rows.join("\n")
}

fn count(path: &Path, sql: &str) -> i64 {
    open_immutable(path)
        .query_row(sql, [], |r| r.get(0))
        .unwrap()
}

/// Files directly in `dir` (names), sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The lines of a plan's `steps:` section.
fn plan_steps(sb: &Sandbox, r: &Run) -> Vec<String> {
    sb.redact(&r.stdout)
        .lines()
        .skip_while(|l| *l != "steps:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .map(str::to_string)
        .collect()
}

fn last_run(sb: &Sandbox) -> serde_json::Value {
    let runs = sb.run(&["runs", "--format", "json"]);
    let runs: serde_json::Value = serde_json::from_str(&runs.stdout).unwrap();
    let id = runs[0]["id"].as_str().unwrap().to_string();
    let show = sb.run(&["show", &id, "--format", "json"]);
    serde_json::from_str(&show.stdout).unwrap()
}

fn step<'a>(record: &'a serde_json::Value, key: &str) -> &'a serde_json::Value {
    record["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["key"] == key)
        .unwrap_or_else(|| panic!("no step {key} in {record:#}"))
}

fn millis(rfc3339: &serde_json::Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339.as_str().unwrap())
        .unwrap()
        .timestamp_millis()
}

const BACKUP: &str = r#"# yaml-language-server: $schema=../schemas/runbook.schema.json
version: 1
params:
  source: {type: path, default: "{root}/live/app.db"}
  backup_dir: {type: path, default: "{root}/backups"}
roots: ["{{ backup_dir }}"]
steps:
  - id: dir
    action: mkdir
    with: {path: "{{ backup_dir }}/db"}
  - id: backup
    action: sqlite-backup
    with: {source: "{{ source }}", dest: "{{ backup_dir }}/db/app.db", check: quick}
"#;

/// A writer process commits every 2 ms while `runbook run` snapshots the database.
/// The snapshot passes integrity_check and holds rows 1..k of the writer's table with
/// no gap; the writer committed during the copy and went on after it.
#[test]
fn sqlite_backup_under_a_live_writer_is_a_checked_committed_prefix() {
    let sb = Sandbox::new();
    sb.write("runbooks/backup.yaml", BACKUP);
    let live = sb.p("live/app.db");
    make_db(&live, 4000, 4000, true); // ~17 MB: the copy takes a while
    let log = sb.p("writer.log");
    let stop = sb.p("writer.stop");
    let writer = Command::new(TESTKIT)
        .args([
            "sqlite-writer",
            live.to_str().unwrap(),
            "2",
            "--seconds",
            "30",
        ])
        .arg("--log")
        .arg(&log)
        .arg("--stop-file")
        .arg(&stop)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let commits = || std::fs::read_to_string(&log).unwrap_or_default();
    sb.wait_for("20 commits", || commits().lines().count() >= 20);

    let r = sb.run(&["run", "backup"]);
    let after_run = commits().lines().count();
    sb.wait_for("20 more commits", || {
        commits().lines().count() >= after_run + 20
    });
    std::fs::write(&stop, "").unwrap();
    let out = writer.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(r.code, 0, "{r:?}");

    let snap = sb.p("backups/db/app.db");
    assert_eq!(integrity(&snap), "ok");
    assert_eq!(count(&snap, "SELECT count(*) FROM items"), 4000);
    let k = count(&snap, "SELECT count(*) FROM writes");
    assert_eq!(
        (
            count(&snap, "SELECT min(id) FROM writes"),
            count(&snap, "SELECT max(id) FROM writes")
        ),
        (1, k),
        "the snapshot's writes are not 1..k"
    );
    // (id, unix ms when the insert began, unix ms when its commit returned)
    let log: Vec<(i64, i64, i64)> = commits()
        .lines()
        .map(|l| {
            let f: Vec<i64> = l.split(' ').map(|x| x.parse().unwrap()).collect();
            (f[0], f[1], f[1] + (f[2] + 999) / 1000)
        })
        .collect();
    assert!(k >= 20, "only {k} writes in the snapshot");
    assert!(
        (k as usize) < log.len(),
        "the writer committed nothing after the snapshot"
    );
    // Every write the snapshot holds was committed, in order (the log holds commits).
    assert_eq!(log[k as usize - 1].0, k);

    let record = last_run(&sb);
    let backup = step(&record, "backup");
    assert_eq!(backup["status"], "succeeded");
    assert_eq!(backup["outputs"]["check"], "ok");
    assert_eq!(backup["outputs"]["journal_mode"], "wal");
    let (from, to) = (
        millis(&backup["started_at"]),
        millis(&backup["finished_at"]),
    );
    // The snapshot was taken during the step: it holds every write committed before
    // the step began (a copy of the main file alone would miss those still in -wal).
    let committed_before = log.iter().filter(|(_, _, done)| *done < from).count();
    assert!(
        k as usize >= committed_before,
        "the snapshot holds {k} writes; {committed_before} were committed before the step"
    );
    let during: Vec<i64> = log
        .iter()
        .map(|(_, at, _)| *at)
        .filter(|at| (from..=to).contains(at))
        .collect();
    assert!(
        during.len() >= 2,
        "the writer committed {} times during the {} ms backup step",
        during.len(),
        to - from
    );
    // And it was never held up for long: no lock kept it waiting for the copy.
    let worst_gap = during.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    assert!(
        worst_gap < 1000,
        "the writer stalled {worst_gap} ms during the backup step"
    );
    let pages = backup["outputs"]["pages"].as_u64().unwrap();
    let bytes = backup["outputs"]["bytes"].as_u64().unwrap();
    assert_eq!(bytes, std::fs::metadata(&snap).unwrap().len());
    assert_eq!(bytes, pages * 4096);
    assert_eq!(listing(&sb.p("backups/db")), ["app.db"]);
}

/// SIGKILL while the copy is being written, then `runbook resume`: the rerun discards
/// the partial file, the snapshot passes integrity_check and the journal says
/// succeeded.
#[test]
fn sqlite_backup_killed_mid_copy_resumes_to_a_sound_snapshot() {
    let sb = Sandbox::new();
    sb.write("runbooks/backup.yaml", BACKUP);
    let live = sb.p("live/app.db");
    make_db(&live, 8000, 4000, true); // ~35 MB
    let partial = sb.p("backups/db/.app.db.runbook-partial");
    let mut child = sb.spawn(&["run", "backup"]);
    let mut first = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut first)
        .unwrap();
    let id = first.split_whitespace().nth(1).unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if std::fs::metadata(&partial).is_ok_and(|m| m.len() > 1 << 20) {
            break;
        }
        assert!(Instant::now() < deadline, "the copy never started");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(partial.exists(), "killed after the copy was complete");
    assert!(!sb.p("backups/db/app.db").exists());
    let show = sb.run(&["show", &id]);
    assert!(
        show.stdout.contains("  started   backup (sqlite-backup)\n"),
        "{show:?}"
    );

    let r = sb.run(&["resume", &id]);
    assert_eq!(r.code, 0, "{r:?}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines[1], "  done     dir (finished in an earlier attempt)");
    assert!(lines[2].starts_with("  ok       backup ("), "{r:?}");
    let snap = sb.p("backups/db/app.db");
    assert_eq!(integrity(&snap), "ok");
    assert_eq!(count(&snap, "SELECT count(*) FROM items"), 8000);
    assert_eq!(
        listing(&sb.p("backups/db")),
        ["app.db"],
        "a temp file was left"
    );
    let record = last_run(&sb);
    assert_eq!(record["status"], "succeeded");
    assert_eq!(step(&record, "backup")["status"], "succeeded");
    // The source was only read: no -wal or -shm appeared beside it.
    assert_eq!(listing(&sb.p("live")), ["app.db"]);
}

/// `timeout` stops the copy between steps; nothing is left behind and `dest` does not
/// appear.
#[test]
fn sqlite_backup_timeout_stops_the_copy_and_leaves_no_temp_file() {
    let sb = Sandbox::new();
    sb.write(
        "runbooks/slow.yaml",
        &BACKUP.replace("check: quick}", "check: quick, timeout: 1ms}"),
    );
    make_db(&sb.p("live/app.db"), 4000, 4000, true);
    let r = sb.run(&["run", "slow"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout.contains("  FAILED   backup: timed out after "),
        "{r:?}"
    );
    assert_eq!(listing(&sb.p("backups/db")), Vec::<String>::new());
}

/// The snapshot keeps the source's file mode; an existing `dest` is replaced (after
/// the check) only below `roots`, never when a -wal file sits beside it, and a
/// rollback-journal source is named as blocking writers.
#[test]
fn sqlite_backup_replaces_dest_only_below_roots_and_keeps_the_mode() {
    let sb = Sandbox::new();
    sb.write("runbooks/backup.yaml", BACKUP);
    let live = sb.p("live/app.db");
    make_db(&live, 10, 10, false);
    std::fs::set_permissions(&live, std::fs::Permissions::from_mode(0o600)).unwrap();
    let r = sb.run(&["run", "backup"]);
    assert_eq!(r.code, 0, "{r:?}");
    let snap = sb.p("backups/db/app.db");
    let mode = std::fs::metadata(&snap).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // A second run replaces the snapshot with a fresh one.
    Connection::open(&live)
        .unwrap()
        .execute("DELETE FROM items WHERE id > 4", [])
        .unwrap();
    let plan = sb.run(&["plan", "backup"]);
    assert_eq!(
        plan_steps(&sb, &plan)[1],
        "  will change backup  sqlite-backup: replace `{root}/backups/db/app.db` with a snapshot of `{root}/live/app.db` (delete mode, 8192 bytes), then quick_check it; `{root}/live/app.db` is not in WAL mode: writers are blocked for the whole copy"
    );
    let r = sb.run(&["run", "backup"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(count(&snap, "SELECT count(*) FROM items"), 4);
    let record = last_run(&sb);
    assert_eq!(step(&record, "backup")["outputs"]["journal_mode"], "delete");

    // Without a root above it, an existing dest stays.
    let no_roots = BACKUP.replace("roots: [\"{{ backup_dir }}\"]\n", "");
    sb.write("runbooks/noroots.yaml", &no_roots);
    let r = sb.run(&["plan", "noroots"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert_eq!(
        plan_steps(&sb, &r)[1],
        "  would fail  backup  sqlite-backup: `{root}/backups/db/app.db` exists and would be replaced, but refusing to act on `{root}/backups/db/app.db`: the runbook declares no `roots`"
    );
    // A -wal beside dest belongs to another database; SQLite would apply it.
    std::fs::write(sb.p("backups/db/app.db-wal"), "").unwrap();
    let r = sb.run(&["run", "backup"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        sb.redact(&r.stderr).starts_with("error: refusing to run `backup`: step `backup` would fail: `{root}/backups/db/app.db-wal` exists: `{root}/backups/db/app.db` looks like a database in use or not closed cleanly"),
        "{r:?}"
    );
    assert_eq!(count(&snap, "SELECT count(*) FROM items"), 4);
}

const PLAN: &str = r#"version: 1
params:
  source: {type: path, default: "{root}/live/app.db"}
vars:
  snap: "{root}/backups/app.db"
roots: ["{root}/backups"]
steps:
  - id: dir
    action: mkdir
    with: {path: "{root}/backups"}
  - id: backup
    action: sqlite-backup
    with: {source: "{{ source }}", dest: "{{ snap }}"}
  - id: check-snap
    action: sqlite-check
    with: {path: "{{ snap }}", mode: full}
  - id: check-live
    action: sqlite-check
    with: {path: "{{ source }}"}
  - id: count-live
    action: sqlite-query
    with: {path: "{{ source }}", sql: "SELECT count(*) AS n FROM items", expect: {rows: 1}}
  - id: count-snap
    action: sqlite-query
    with: {path: "{{ snap }}", sql: "SELECT count(*) AS n FROM items"}
  - id: same
    action: assert
    with: {that: "steps['count-snap'].outputs.rows[0].n == steps['count-live'].outputs.rows[0].n"}
"#;

/// The plan opens the real database read-only (and immutable: it is a WAL database
/// that nobody has open), judges the steps whose input is real, defers the ones whose
/// input an earlier step writes, and leaves every byte and mtime as it was.
#[test]
fn plan_of_backup_check_and_query_is_exact_and_writes_nothing() {
    let sb = Sandbox::new();
    sb.write("runbooks/snap.yaml", PLAN);
    make_db(&sb.p("live/app.db"), 50, 100, true);
    assert_eq!(listing(&sb.p("live")), ["app.db"]);
    let before = tree_digest(sb.path());
    let r = sb.run(&["plan", "snap"]);
    assert_eq!(r.code, 0, "{r:?}");
    let bytes = std::fs::metadata(sb.p("live/app.db")).unwrap().len();
    assert_eq!(
        plan_steps(&sb, &r),
        [
            "  will change dir         mkdir: create `{root}/backups`".to_string(),
            format!("  will change backup      sqlite-backup: snapshot `{{root}}/live/app.db` (wal mode, {bytes} bytes) into `{{root}}/backups/app.db`, then quick_check it"),
            "  no change   check-snap  sqlite-check: will check `{root}/backups/app.db` after `backup` runs".to_string(),
            "  no change   check-live  sqlite-check: quick_check of `{root}/live/app.db`: ok".to_string(),
            "  no change   count-live  sqlite-query: query on `{root}/live/app.db` returns 1 row".to_string(),
            "  no change   count-snap  sqlite-query: will query `{root}/backups/app.db` after `backup` runs".to_string(),
            "  unknown     same        assert: unknown until count-snap runs".to_string(),
        ]
    );
    assert_eq!(tree_digest(sb.path()), before, "plan wrote something");
    assert_eq!(listing(&sb.p("live")), ["app.db"], "plan left -wal/-shm");
    assert!(!sb.p("state").exists());

    // The run does what the plan said.
    let run = sb.run(&["run", "snap"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(listing(&sb.p("backups")), ["app.db"]);
    assert_eq!(listing(&sb.p("live")), ["app.db"], "run left -wal/-shm");
}

/// A missing source, a file that is not a database, and an expectation the live data
/// does not meet: the plan names each failing step and `run` touches nothing.
#[test]
fn plan_names_the_step_whose_source_is_missing_or_not_a_database() {
    let sb = Sandbox::new();
    sb.write("runbooks/snap.yaml", PLAN);
    sb.write("live/notes.txt", "just text, long enough to hold a header..............................................................\n");
    let before = tree_digest(sb.path());
    let r = sb.run(&["plan", "snap"]);
    assert_eq!(r.code, 3, "{r:?}");
    let lines = plan_steps(&sb, &r);
    assert_eq!(
        lines[1],
        "  would fail  backup      sqlite-backup: source `{root}/live/app.db` does not exist"
    );
    assert_eq!(
        lines[3],
        "  would fail  check-live  sqlite-check: `{root}/live/app.db` does not exist"
    );
    let run = sb.run(&["run", "snap"]);
    assert_eq!(run.code, 3);
    assert_eq!(
        sb.redact(&run.stderr),
        "error: refusing to run `snap`: step `backup` would fail: source `{root}/live/app.db` does not exist\nnothing was changed; fix the cause and run again (`runbook plan` shows the whole plan)\n"
    );
    let notes = format!("source={}", sb.p("live/notes.txt").display());
    let r = sb.run(&["plan", "snap", "--set", &notes]);
    assert_eq!(r.code, 3, "{r:?}");
    assert_eq!(
        plan_steps(&sb, &r)[1],
        "  would fail  backup      sqlite-backup: source: `{root}/live/notes.txt` is not a SQLite database (no \"SQLite format 3\" header)"
    );
    assert_eq!(tree_digest(sb.path()), before);
}

const CHECK: &str = r#"version: 1
params:
  db: {type: path, required: true}
steps:
  - id: check
    action: sqlite-check
    with: {path: "{{ db }}", mode: MODE}
"#;

/// The same check on a copy an earlier step makes: the plan defers it, so a bad file
/// fails the run itself (exit 1).
const COPY_THEN_CHECK: &str = r#"version: 1
params:
  db: {type: path, required: true}
steps:
  - id: dir
    action: mkdir
    with: {path: "{root}/snap"}
  - id: copy
    action: copy
    with: {from: "{{ db }}", to: "{root}/snap/copy.db"}
  - id: check
    action: sqlite-check
    with: {path: "{root}/snap/copy.db", mode: MODE}
"#;

/// Writes over one page in the middle of the file.
fn corrupt_middle_page(path: &Path) {
    let len = std::fs::metadata(path).unwrap().len();
    let page = (len / 4096) / 2;
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    use std::io::{Seek, SeekFrom};
    f.seek(SeekFrom::Start(page * 4096 + 8)).unwrap();
    f.write_all(&[0xA5; 2000]).unwrap();
}

fn truncate_half(path: &Path) {
    let len = std::fs::metadata(path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_len(len / 2).unwrap();
}

const FAILED_PREFIX: &str = "  FAILED   check: db_integrity_check_failed: ";

#[test]
fn sqlite_check_passes_a_sound_database_and_fails_a_corrupted_or_truncated_one() {
    let sb = Sandbox::new();
    for mode in ["quick", "full"] {
        sb.write(
            &format!("runbooks/check-{mode}.yaml"),
            &CHECK.replace("MODE", mode),
        );
    }
    sb.write(
        "runbooks/copy-check.yaml",
        &COPY_THEN_CHECK.replace("MODE", "quick"),
    );
    let db = |name: &str| -> PathBuf {
        let p = sb.p(&format!("dbs/{name}.db"));
        make_db(&p, 2000, 0, true); // small rows: every page is a b-tree page
        p
    };
    let set = |p: &Path| format!("db={}", p.display());
    let good = db("good");
    for mode in ["quick", "full"] {
        let r = sb.run(&["run", &format!("check-{mode}"), "--set", &set(&good)]);
        assert_eq!(r.code, 0, "{r:?}");
        assert_eq!(step(&last_run(&sb), "check")["outputs"]["mode"], mode);
    }
    assert_eq!(listing(&sb.p("dbs")), ["good.db"], "the check left files");

    let corrupted = db("corrupted");
    corrupt_middle_page(&corrupted);
    let truncated = db("truncated");
    truncate_half(&truncated);
    // The corrupted page yields many problems, of which the first five are named; the
    // truncated file stops SQLite at once.
    for (bad, problems) in [(&corrupted, 5), (&truncated, 1)] {
        // The plan checks a real file, and `run` refuses before it starts.
        let plan = sb.run(&["plan", "check-quick", "--set", &set(bad)]);
        assert_eq!(plan.code, 3, "{plan:?}");
        assert!(
            plan_steps(&sb, &plan)[0]
                .starts_with("  would fail  check  sqlite-check: db_integrity_check_failed: "),
            "{plan:?}"
        );
        // A copy made during the run fails the run itself.
        let _ = std::fs::remove_dir_all(sb.p("snap"));
        let r = sb.run(&["run", "copy-check", "--set", &set(bad)]);
        assert_eq!(r.code, 1, "{r:?}");
        let failed = r
            .stdout
            .lines()
            .find(|l| l.starts_with("  FAILED   check: "))
            .unwrap_or_else(|| panic!("{r:?}"));
        assert!(failed.starts_with(FAILED_PREFIX), "{r:?}");
        assert!(
            sb.redact(failed)
                .ends_with(" (quick_check of `{root}/snap/copy.db`)"),
            "{failed}"
        );
        let named: Vec<&str> = failed[FAILED_PREFIX.len()..].split("; ").collect();
        assert_eq!(named.len(), problems, "{failed}");
        if problems == 1 {
            assert!(
                named[0].starts_with("database disk image is malformed ("),
                "{failed}"
            );
        }
    }
}

#[test]
fn sqlite_check_full_mode_also_reports_foreign_key_violations() {
    let sb = Sandbox::new();
    for mode in ["quick", "full"] {
        sb.write(
            &format!("runbooks/copy-check-{mode}.yaml"),
            &COPY_THEN_CHECK.replace("MODE", mode),
        );
    }
    let db = sb.p("dbs/fk.db");
    std::fs::create_dir_all(db.parent().unwrap()).unwrap();
    Connection::open(&db)
        .unwrap()
        .execute_batch(
            "PRAGMA foreign_keys = OFF; -- the bundled SQLite enforces them by default
             CREATE TABLE parent(id INTEGER PRIMARY KEY);
             CREATE TABLE child(id INTEGER PRIMARY KEY, parent_id INTEGER REFERENCES parent(id));
             INSERT INTO parent VALUES (1);
             INSERT INTO child VALUES (10, 1), (11, 2);",
        )
        .unwrap();
    let set = format!("db={}", db.display());
    let quick = sb.run(&["run", "copy-check-quick", "--set", &set]);
    assert_eq!(quick.code, 0, "{quick:?}");
    let full = sb.run(&["run", "copy-check-full", "--set", &set]);
    assert_eq!(full.code, 1, "{full:?}");
    assert!(
        sb.redact(&full.stdout).contains("  FAILED   check: db_integrity_check_failed: foreign key violation: row 11 of `child` has no parent in `parent` (integrity_check of `{root}/snap/copy.db`)\n"),
        "{full:?}"
    );
}

const QUERY: &str = r#"version: 1
params:
  db: {type: path, default: "{root}/live/app.db"}
  min_qty: {type: int, default: 5}
steps:
  - id: q
    action: sqlite-query
    with:
      path: "{{ db }}"
      sql: "SELECT name, qty FROM items WHERE qty >= ? AND id <= 14 ORDER BY id"
      params: ["{{ min_qty }}"]
      expect: {min_rows: 1}
  - id: use
    action: assert
    with:
      that: "steps.q.outputs.count == 4 and steps.q.outputs.rows[0].name == 'item-5' and steps.q.outputs.rows[3].qty == 6"
      message: "got {{ steps.q.outputs.rows }}"
  - id: out
    action: write-file
    with: {path: "{root}/first.txt", content: "{{ steps.q.outputs.rows[0].name }}"}
"#;

#[test]
fn sqlite_query_rows_become_outputs_that_later_steps_read() {
    let sb = Sandbox::new();
    sb.write("runbooks/query.yaml", QUERY);
    make_db(&sb.p("live/app.db"), 100, 10, true);
    let plan = sb.run(&["plan", "query"]);
    assert_eq!(plan.code, 0, "{plan:?}");
    assert_eq!(
        plan_steps(&sb, &plan),
        [
            "  no change   q    sqlite-query: query on `{root}/live/app.db` returns 4 rows",
            // The plan runs the read-only query for real: what follows is judged.
            "  no change   use  assert: `steps.q.outputs.count == 4 and steps.q.outputs.rows[0].name == 'item-5' and steps.q.outputs.rows[3].qty == 6` holds",
            "  will change out  write-file: create `{root}/first.txt` (6 bytes)",
        ]
    );
    let r = sb.run(&["run", "query"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(sb.read("first.txt"), "item-5");
    let q = step(&last_run(&sb), "q")["outputs"].clone();
    assert_eq!(
        q,
        serde_json::json!({"count": 4, "rows": [
            {"name": "item-5", "qty": 5}, {"name": "item-6", "qty": 6},
            {"name": "item-12", "qty": 5}, {"name": "item-13", "qty": 6}]})
    );
    // An expectation the data does not meet fails the plan, naming expected and got.
    let r = sb.run(&["plan", "query", "--set", "min_qty=7"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert_eq!(
        plan_steps(&sb, &r)[0],
        "  would fail  q    sqlite-query: query expectation not met: expected at least 1 row, got 0 rows (query on `{root}/live/app.db`)"
    );
    assert_eq!(listing(&sb.p("live")), ["app.db"]);
}

const WRITING: &[&str] = &[
    "INSERT INTO items(name) VALUES ('x')",
    "DELETE FROM items",
    "UPDATE items SET qty = 0",
    "DROP TABLE items",
];

/// A statement that writes is refused by `validate` when it is written out, by the
/// plan when the database is real, and at run time when the plan could not open it;
/// the database is unchanged each time.
#[test]
fn sqlite_query_refuses_statements_that_write_in_validate_plan_and_run() {
    let sb = Sandbox::new();
    make_db(&sb.p("live/app.db"), 20, 10, true);
    sb.write(
        "runbooks/literal.yaml",
        "version: 1\nsteps:\n  - id: q\n    action: sqlite-query\n    with: {path: live/app.db, sql: \"delete from items\"}\n",
    );
    let r = sb.run(&["validate", "literal"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.starts_with("runbooks/literal.yaml:5:36: error: `sql` starts with `DELETE`, which writes to the database; sqlite-query only runs statements that read (step `q`, field `steps[0].with.sql`)\n"),
        "{r:?}"
    );
    sb.write(
        "runbooks/write.yaml",
        r#"version: 1
params:
  stmt: {type: string, required: true}
  db: {type: path, default: "{root}/live/app.db"}
steps:
  - id: dir
    action: mkdir
    with: {path: "{root}/work"}
  - id: copy
    action: copy
    with: {from: "{{ db }}", to: "{root}/work/copy.db"}
  - id: on-copy
    action: sqlite-query
    with: {path: "{root}/work/copy.db", sql: "{{ stmt }}"}
"#,
    );
    sb.write(
        "runbooks/write-live.yaml",
        "version: 1\nparams:\n  stmt: {type: string, required: true}\nsteps:\n  - id: q\n    action: sqlite-query\n    with: {path: \"{root}/live/app.db\", sql: \"{{ stmt }}\"}\n",
    );
    let digest = tree_digest(&sb.p("live"));
    for stmt in WRITING {
        let set = format!("stmt={stmt}");
        let plan = sb.run(&["plan", "write-live", "--set", &set]);
        assert_eq!(plan.code, 3, "{plan:?}");
        assert_eq!(
            plan_steps(&sb, &plan),
            [
                "  would fail  q  sqlite-query: `sql` writes to the database; sqlite-query only runs statements that read"
            ],
            "{stmt}"
        );
        let run = sb.run(&["run", "write", "--set", &set]);
        assert_eq!(run.code, 1, "{run:?}");
        assert!(
            run.stdout.contains("  FAILED   on-copy: `sql` writes to the database; sqlite-query only runs statements that read\n"),
            "{stmt}: {run:?}"
        );
        assert_eq!(
            count(&sb.p("work/copy.db"), "SELECT count(*) FROM items"),
            20
        );
    }
    assert_eq!(tree_digest(&sb.p("live")), digest);
}
