//! `atocore-damage`: breaks an AtoCore deployment in one known way, for the drill and
//! its tests (what a bad restore or a failing disk leaves behind).
//!
//! ```text
//! runbook-testkit atocore-damage ROOT --kind KIND
//! ```
//!
//! ROOT is the AtoCore root (`.../srv/storage/atocore`) or a sandbox's DIR. KIND:
//! - `truncate-db`: cut `atocore.db` to half its size.
//! - `corrupt-db`: overwrite 4 KiB in the middle of `atocore.db` with garbage (same
//!   size).
//! - `empty-db`: replace `atocore.db` with a valid database that has the tables but no
//!   rows (same owner and mode).
//! - `bad-registry`: write invalid JSON (a half-written edit) to the project registry.
//! - `drop-chroma`: remove the vector store directory.
//! - `delete-documents`: delete every row of `documents` and `chunks` (still a valid
//!   database).
//! - `stale-wal`: commit one more document (title `written after the backup`) into
//!   `atocore.db-wal` and leave it there un-checkpointed, as a writer killed with
//!   SIGKILL does; `atocore.db` itself is not changed. SQLite replays that WAL into
//!   whatever database is copied over `atocore.db` unless the restore removes it.
//!
//! `-wal`/`-shm` files beside the database are removed when it is replaced. One line on
//! stdout says what was done.

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::atocore::{self, Layout, Rng};

pub const KINDS: &[&str] = &[
    "truncate-db",
    "corrupt-db",
    "empty-db",
    "bad-registry",
    "drop-chroma",
    "delete-documents",
    "stale-wal",
];

fn usage() -> String {
    format!(
        "usage: atocore-damage ROOT --kind KIND (KIND: {})",
        KINDS.join(", ")
    )
}

/// The AtoCore root given ROOT: itself, or a sandbox's `srv/storage/atocore`.
fn resolve(root: &Path) -> Result<Layout, String> {
    if root.join("data").is_dir() || root.join("config").is_dir() {
        return Ok(Layout::new(root));
    }
    let inner = root.join("srv/storage/atocore");
    if inner.is_dir() {
        return Ok(Layout::new(&inner));
    }
    Err(format!(
        "{} is not an AtoCore root (no data/ or config/) nor a sandbox (no srv/storage/atocore/)",
        root.display()
    ))
}

pub fn main(args: &[String]) -> Result<(), String> {
    let mut root: Option<PathBuf> = None;
    let mut kind: Option<String> = None;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--kind" => kind = Some(rest.next().ok_or_else(usage)?.clone()),
            flag if flag.starts_with('-') => {
                return Err(format!("unknown argument `{flag}`; {}", usage()));
            }
            path if root.is_none() => root = Some(PathBuf::from(path)),
            extra => return Err(format!("unexpected argument `{extra}`; {}", usage())),
        }
    }
    let (Some(root), Some(kind)) = (root, kind) else {
        return Err(usage());
    };
    let layout = resolve(&root)?;
    let done = match kind.as_str() {
        "truncate-db" => truncate(&layout.db())?,
        "corrupt-db" => corrupt(&layout.db())?,
        "empty-db" => empty(&layout.db())?,
        "bad-registry" => bad_registry(&layout.registry())?,
        "drop-chroma" => drop_chroma(&layout.chroma())?,
        "delete-documents" => delete_documents(&layout.db())?,
        "stale-wal" => stale_wal(&layout.db())?,
        other => return Err(format!("unknown kind `{other}`; {}", usage())),
    };
    println!("{kind}: {done}");
    Ok(())
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{}: {e}", path.display())
}

fn truncate(db: &Path) -> Result<String, String> {
    let len = fs::metadata(db).map_err(io(db))?.len();
    let file = fs::OpenOptions::new()
        .write(true)
        .open(db)
        .map_err(io(db))?;
    file.set_len(len / 2).map_err(io(db))?;
    file.sync_all().map_err(io(db))?;
    Ok(format!(
        "{} cut from {len} to {} bytes",
        db.display(),
        len / 2
    ))
}

fn corrupt(db: &Path) -> Result<String, String> {
    const SPAN: u64 = 4096;
    let len = fs::metadata(db).map_err(io(db))?.len();
    if len < 2 * SPAN {
        return Err(format!(
            "{} is too small ({len} bytes) to corrupt",
            db.display()
        ));
    }
    let at = len / 2 - SPAN / 2;
    let mut rng = Rng::new(0xBAD_D15C);
    let garbage: Vec<u8> = (0..SPAN / 8)
        .flat_map(|_| rng.next_u64().to_le_bytes())
        .collect();
    let mut file = fs::OpenOptions::new()
        .write(true)
        .open(db)
        .map_err(io(db))?;
    file.seek(SeekFrom::Start(at)).map_err(io(db))?;
    file.write_all(&garbage).map_err(io(db))?;
    file.sync_all().map_err(io(db))?;
    Ok(format!(
        "{} overwritten with {SPAN} bytes of garbage at offset {at} (size {len} kept)",
        db.display()
    ))
}

fn remove_wal(db: &Path) -> Result<(), String> {
    for file in atocore::wal_files(db) {
        match fs::remove_file(&file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", file.display())),
        }
    }
    Ok(())
}

fn empty(db: &Path) -> Result<String, String> {
    let meta = fs::metadata(db).ok();
    if meta.is_some() {
        fs::remove_file(db).map_err(io(db))?;
    }
    remove_wal(db)?;
    atocore::create_db(db, |_| Ok(()))?;
    if let Some(m) = meta {
        std::os::unix::fs::chown(db, Some(m.uid()), Some(m.gid())).map_err(io(db))?;
        fs::set_permissions(db, fs::Permissions::from_mode(m.mode() & 0o7777)).map_err(io(db))?;
    }
    Ok(format!(
        "{} replaced by a database with the tables and no rows",
        db.display()
    ))
}

fn bad_registry(registry: &Path) -> Result<String, String> {
    // An edit caught half-way: what `registry_invalid_json` is about.
    fs::write(
        registry,
        "{\"projects\": [{\"id\": \"p05-interferometer\", \"name\": \"P05 Interfer",
    )
    .map_err(io(registry))?;
    Ok(format!("{} is now invalid JSON", registry.display()))
}

fn drop_chroma(chroma: &Path) -> Result<String, String> {
    fs::remove_dir_all(chroma).map_err(io(chroma))?;
    Ok(format!("{} removed", chroma.display()))
}

fn delete_documents(db: &Path) -> Result<String, String> {
    let sql = |e: rusqlite::Error| format!("{}: {e}", db.display());
    if !db.is_file() {
        return Err(format!("{}: no such file", db.display()));
    }
    let conn = rusqlite::Connection::open(db).map_err(sql)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(sql)?;
    let (chunks, documents) = {
        let tx = conn.unchecked_transaction().map_err(sql)?;
        let chunks = tx.execute("DELETE FROM chunks", []).map_err(sql)?;
        let documents = tx.execute("DELETE FROM documents", []).map_err(sql)?;
        tx.commit().map_err(sql)?;
        (chunks, documents)
    };
    conn.close().map_err(|(_, e)| sql(e))?;
    Ok(format!(
        "{documents} documents and {chunks} chunks deleted from {}",
        db.display()
    ))
}

fn stale_wal(db: &Path) -> Result<String, String> {
    let sql = |e: rusqlite::Error| format!("{}: {e}", db.display());
    if !db.is_file() {
        return Err(format!("{}: no such file", db.display()));
    }
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE)
            .map_err(sql)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(sql)?;
    conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))
        .map_err(sql)?;
    conn.execute_batch("PRAGMA wal_autocheckpoint = 0")
        .map_err(sql)?;
    let id: i64 = conn
        .query_row(
            "INSERT INTO documents(id, project_id, source_path, title, ingested_at)
             SELECT coalesce(max(id), 0) + 1, 'p05-interferometer',
                    '/srv/storage/atocore/sources/vault/p05-interferometer/notes/after-backup.md',
                    'written after the backup', '2026-04-08T06:30:00Z'
             FROM documents RETURNING id",
            [],
            |r| r.get(0),
        )
        .map_err(sql)?;
    // Not closed: closing the last connection would checkpoint the WAL into the
    // database and remove it, which a killed writer never gets to do.
    std::mem::forget(conn);
    let wal = &atocore::wal_files(db)[0];
    let len = fs::metadata(wal).map_err(io(wal))?.len();
    Ok(format!(
        "document {id} committed to {} ({len} bytes) and left un-checkpointed",
        wal.display()
    ))
}
