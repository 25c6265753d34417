//! `atocore-sandbox`: an AtoCore-shaped deployment in a directory, for the restore
//! drill and its tests. The same seed gives byte-identical data files.
//!
//! ```text
//! runbook-testkit atocore-sandbox DIR [--seed N] [--port PORT] [--documents N] [--force] [--empty]
//! ```
//!
//! `--empty` makes a brand-new host instead: the same `sandbox.yaml` (paths, service,
//! owner) and empty `data/`, `config/` and `backups/` directories, with no database,
//! registry, vector store or snapshot: what `atocore/recover` rebuilds from off-site.
//!
//! Below DIR it writes:
//! - `srv/storage/atocore/data/db/atocore.db`: SQLite (WAL mode, fully checkpointed)
//!   with `projects`, `documents` (source paths under
//!   `/srv/storage/atocore/sources/vault/`) and `chunks` of generated prose: three
//!   projects (one is `p05-interferometer`), `--documents` (default 300) documents of
//!   15 to 25 chunks each.
//! - `srv/storage/atocore/config/project-registry.json`: the same projects, with
//!   `source_dirs`.
//! - `srv/storage/atocore/data/chroma/`: `chroma.sqlite3` (one `embeddings` row per
//!   chunk) and two segment directories (UUID names) of hnswlib-shaped files, with one
//!   vector per chunk in `data_level0.bin`.
//! - `srv/storage/atocore/data/ingestion.lock` (empty), `backups/snapshots/`, `logs/`,
//!   `data/cache/`, `data/tmp/`, and `run/` (pidfile and log of the service).
//! - `sandbox.yaml`: the vars file for the AtoCore runbooks (`--vars DIR/sandbox.yaml`),
//!   whose `service_argv` runs `atocore-standin` on `--port` (0, the default, picks a
//!   free port now); `service_url` is `http://127.0.0.1:PORT`, `service_addr` the bare
//!   `127.0.0.1:PORT`.
//!
//! Everything below the AtoCore root is owned by 1000:1000 when run as root (as on
//! Dalidou), else by the current user; the database is mode 600, other files 644,
//! directories 755. DIR must be empty or absent; `--force` first removes what an
//! earlier build left there (`srv/`, `run/`, `sandbox.yaml`) and nothing else.
//! The summary is printed on stdout.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use chrono::{DateTime, TimeDelta};

use crate::atocore::{self, Layout, PROJECTS, Rng};

struct Options {
    dir: PathBuf,
    seed: u64,
    port: u16,
    documents: u64,
    force: bool,
    empty: bool,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut dir = None;
    let mut opts = Options {
        dir: PathBuf::new(),
        seed: 1,
        port: 0,
        documents: 300,
        force: false,
        empty: false,
    };
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let mut value = |flag: &str| {
            rest.next()
                .ok_or_else(|| format!("{flag} needs a value"))
                .cloned()
        };
        match arg.as_str() {
            "--seed" => {
                opts.seed = value("--seed")?
                    .parse()
                    .map_err(|e| format!("--seed: {e}"))?;
            }
            "--port" => {
                opts.port = value("--port")?
                    .parse()
                    .map_err(|e| format!("--port: {e}"))?;
            }
            "--documents" => {
                opts.documents = value("--documents")?
                    .parse()
                    .map_err(|e| format!("--documents: {e}"))?;
            }
            "--force" => opts.force = true,
            "--empty" => opts.empty = true,
            flag if flag.starts_with('-') => return Err(format!("unknown argument `{flag}`")),
            path if dir.is_none() => dir = Some(PathBuf::from(path)),
            extra => return Err(format!("unexpected argument `{extra}`")),
        }
    }
    opts.dir = dir.ok_or(
        "usage: atocore-sandbox DIR [--seed N] [--port PORT] [--documents N] [--force] [--empty]",
    )?;
    Ok(opts)
}

/// Counts of what was generated.
struct Built {
    documents: u64,
    chunks: u64,
    segments: Vec<String>,
}

pub fn main(args: &[String]) -> Result<(), String> {
    let opts = parse(args)?;
    prepare_dir(&opts.dir, opts.force)?;
    let dir = opts
        .dir
        .canonicalize()
        .map_err(|e| format!("{}: {e}", opts.dir.display()))?;
    let layout = Layout::new(&dir.join("srv/storage/atocore"));
    if opts.empty {
        return new_host(&dir, &layout, opts.port);
    }
    for d in [
        layout.data().join("db"),
        layout.data().join("cache"),
        layout.data().join("tmp"),
        layout.root.join("config"),
        layout.chroma(),
        layout.backups().join("snapshots"),
        layout.logs(),
        dir.join("run"),
    ] {
        fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let built = build(&layout, opts.seed, opts.documents)?;
    fs::write(layout.ingestion_lock(), b"")
        .map_err(|e| format!("{}: {e}", layout.ingestion_lock().display()))?;

    let (uid, gid) = owner_for(&dir)?;
    own(&layout, uid, gid)?;

    let port = match opts.port {
        0 => free_port()?,
        p => p,
    };
    let vars = vars_yaml(&dir, &layout, port, uid, gid)?;
    fs::write(dir.join("sandbox.yaml"), vars).map_err(|e| format!("sandbox.yaml: {e}"))?;
    println!(
        "atocore sandbox in {}: {} projects, {} documents, {} chunks, {} vector segments; service on 127.0.0.1:{port}; vars {}",
        dir.display(),
        PROJECTS.len(),
        built.documents,
        built.chunks,
        built.segments.len(),
        dir.join("sandbox.yaml").display()
    );
    Ok(())
}

/// A new host: where the data will go and how its service runs, and no data.
fn new_host(dir: &Path, layout: &Layout, port: u16) -> Result<(), String> {
    for d in [
        layout.data(),
        layout.root.join("config"),
        layout.backups(),
        dir.join("run"),
    ] {
        fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let (uid, gid) = owner_for(dir)?;
    own(layout, uid, gid)?;
    let port = match port {
        0 => free_port()?,
        p => p,
    };
    let vars = vars_yaml(dir, layout, port, uid, gid)?;
    fs::write(dir.join("sandbox.yaml"), vars).map_err(|e| format!("sandbox.yaml: {e}"))?;
    println!(
        "atocore new host in {}: no data yet; service on 127.0.0.1:{port}; vars {}",
        dir.display(),
        dir.join("sandbox.yaml").display()
    );
    Ok(())
}

/// 1000:1000 (the container user on Dalidou) when run as root, else the current user.
fn owner_for(dir: &Path) -> Result<(u32, u32), String> {
    let mine = fs::metadata(dir).map_err(|e| e.to_string())?;
    Ok(if mine.uid() == 0 {
        (1000, 1000)
    } else {
        (mine.uid(), mine.gid())
    })
}

fn prepare_dir(dir: &Path, force: bool) -> Result<(), String> {
    let err = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
    if !dir.exists() {
        return fs::create_dir_all(dir).map_err(|e| err(dir, e));
    }
    let mut entries = fs::read_dir(dir).map_err(|e| err(dir, e))?.peekable();
    if entries.peek().is_none() {
        return Ok(());
    }
    if !force {
        return Err(format!(
            "{} is not empty; give an empty directory, or --force to rebuild a sandbox there",
            dir.display()
        ));
    }
    for name in ["srv", "run"] {
        let p = dir.join(name);
        if p.exists() {
            fs::remove_dir_all(&p).map_err(|e| err(&p, e))?;
        }
    }
    let p = dir.join("sandbox.yaml");
    if p.exists() {
        fs::remove_file(&p).map_err(|e| err(&p, e))?;
    }
    Ok(())
}

/// The database, the registry and the vector store.
fn build(layout: &Layout, seed: u64, documents: u64) -> Result<Built, String> {
    let mut rng = Rng::new(seed);
    let mut vectors: Vec<(i64, [f32; atocore::DIM])> = Vec::new();
    let mut built = Built {
        documents,
        chunks: 0,
        segments: Vec::new(),
    };
    let base = DateTime::parse_from_rfc3339("2026-01-05T08:00:00Z").expect("a valid time");
    atocore::create_db(&layout.db(), |conn| {
        let mut project = conn.prepare("INSERT INTO projects VALUES (?1, ?2, ?3)")?;
        let mut sorted: Vec<_> = PROJECTS.iter().collect();
        sorted.sort_by_key(|p| p.id);
        for p in sorted {
            project.execute((p.id, p.name, p.description))?;
        }
        let mut doc = conn.prepare("INSERT INTO documents VALUES (?1, ?2, ?3, ?4, ?5)")?;
        let mut chunk = conn.prepare("INSERT INTO chunks VALUES (?1, ?2, ?3, ?4)")?;
        let mut at = base;
        let mut chunk_id = 0i64;
        for i in 0..documents {
            let id = i as i64 + 1;
            let p = &PROJECTS[(i % PROJECTS.len() as u64) as usize];
            let (title, path) = atocore::document_title_and_path(&mut rng, p, id);
            at += TimeDelta::minutes(rng.range(20, 600) as i64);
            let stamp = at.format("%Y-%m-%dT%H:%M:%SZ").to_string();
            doc.execute((id, p.id, &path, &title, &stamp))?;
            for ordinal in 0..rng.range(15, 25) {
                chunk_id += 1;
                let text = atocore::chunk_text(&mut rng, p);
                chunk.execute((chunk_id, id, ordinal as i64, &text))?;
                vectors.push((chunk_id, atocore::embed(&text)));
            }
        }
        built.chunks = chunk_id as u64;
        Ok(())
    })?;

    fs::write(
        layout.registry(),
        atocore::registry_json(&PROJECTS.iter().collect::<Vec<_>>()),
    )
    .map_err(|e| format!("{}: {e}", layout.registry().display()))?;

    let mut segments = vec![rng.uuid(), rng.uuid()];
    segments.sort();
    let chroma = rusqlite::Connection::open(layout.chroma_db())
        .map_err(|e| format!("{}: {e}", layout.chroma_db().display()))?;
    let sql = |e: rusqlite::Error| format!("{}: {e}", layout.chroma_db().display());
    chroma.execute_batch("BEGIN").map_err(sql)?;
    chroma.execute_batch(atocore::CHROMA_SCHEMA).map_err(sql)?;
    {
        let mut row = chroma
            .prepare("INSERT INTO embeddings(chunk_id, segment) VALUES (?1, ?2)")
            .map_err(sql)?;
        for (chunk_id, _) in &vectors {
            row.execute((chunk_id, atocore::segment_for(&segments, *chunk_id)))
                .map_err(sql)?;
        }
    }
    chroma.execute_batch("COMMIT").map_err(sql)?;
    chroma.close().map_err(|(_, e)| sql(e))?;
    for segment in &segments {
        let elements: Vec<_> = vectors
            .iter()
            .filter(|(id, _)| atocore::segment_for(&segments, *id) == segment)
            .map(|(id, v)| (*id as u64, *v))
            .collect();
        atocore::write_segment(&layout.chroma().join(segment), &elements)?;
    }
    built.segments = segments;
    Ok(built)
}

/// Owner and modes as on the deployment, for everything below the AtoCore root.
fn own(layout: &Layout, uid: u32, gid: u32) -> Result<(), String> {
    let db = layout.db();
    for entry in walkdir::WalkDir::new(&layout.root) {
        let entry = entry.map_err(|e| e.to_string())?;
        let path = entry.path();
        let err = |e: std::io::Error| format!("{}: {e}", path.display());
        std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(err)?;
        let mode = if entry.file_type().is_dir() {
            0o755
        } else if path == db {
            0o600
        } else {
            0o644
        };
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(err)?;
    }
    Ok(())
}

fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| format!("finding a free port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}

/// A YAML string: JSON's double-quoted form is valid YAML and never read as a number.
fn q(text: &str) -> String {
    serde_json::to_string(text).expect("a string serializes")
}

fn vars_yaml(dir: &Path, layout: &Layout, port: u16, uid: u32, gid: u32) -> Result<String, String> {
    let exe = std::env::current_exe()
        .and_then(|p| p.canonicalize())
        .map_err(|e| format!("finding this program's path: {e}"))?;
    let root = layout.root.display().to_string();
    let path = |p: PathBuf| q(&p.display().to_string());
    let argv = [
        exe.display().to_string(),
        "atocore-standin".into(),
        "--root".into(),
        root.clone(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
    ];
    let lines = [
        "# Vars for the AtoCore runbooks against this sandbox (runbook-testkit atocore-sandbox)."
            .to_string(),
        format!("atocore_root: {}", q(&root)),
        format!("data_dir: {}", path(layout.data())),
        format!("db_path: {}", path(layout.db())),
        format!("registry_path: {}", path(layout.registry())),
        format!("chroma_dir: {}", path(layout.chroma())),
        format!("backup_dir: {}", path(layout.backups())),
        format!("ingestion_lock: {}", path(layout.ingestion_lock())),
        format!("service_url: {}", q(&format!("http://127.0.0.1:{port}"))),
        // For `daemon-start`'s `wait_for_port` (host:port, no scheme).
        format!("service_addr: {}", q(&format!("127.0.0.1:{port}"))),
        "service_manager: \"process\"".to_string(),
        format!(
            "service_argv: [{}]",
            argv.iter().map(|a| q(a)).collect::<Vec<_>>().join(", ")
        ),
        format!("service_pidfile: {}", path(dir.join("run/atocore.pid"))),
        format!("service_log: {}", path(dir.join("run/atocore.log"))),
        format!("owner: {}", q(&format!("{uid}:{gid}"))),
        "known_project: \"p05-interferometer\"".to_string(),
        "known_prompt: \"what is p05 about\"".to_string(),
        "min_documents: 1".to_string(),
        "min_projects: 1".to_string(),
    ];
    Ok(lines.join("\n") + "\n")
}
