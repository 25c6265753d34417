//! `sqlite-writer DB INTERVAL_MS [--rows N] [--seconds S] [--log FILE] [--stop-file FILE]`
//!
//! A live application's database: creates (or opens) `DB` in WAL mode with a table
//! `writes(id INTEGER PRIMARY KEY, at_ms INTEGER, latency_us INTEGER, payload BLOB)`
//! and commits one row every INTERVAL_MS, each in its own transaction, so that the
//! ids in the database are always 1..k without gaps.
//!
//! Stops by itself after N rows (`--rows`), after S seconds (`--seconds`, default 30,
//! at most 600), or as soon as `--stop-file` exists. With `--log`, appends one line
//! per commit: `<id> <unix ms at commit> <commit latency in µs>`. On exit it prints
//! `commits <n> max_latency_ms <x> mean_latency_ms <y>`.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::Connection;

struct Options {
    db: PathBuf,
    interval: Duration,
    rows: Option<u64>,
    seconds: u64,
    log: Option<PathBuf>,
    stop_file: Option<PathBuf>,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let usage = "usage: sqlite-writer DB INTERVAL_MS [--rows N] [--seconds S] [--log FILE] [--stop-file FILE]";
    let mut positional = Vec::new();
    let mut opts = Options {
        db: PathBuf::new(),
        interval: Duration::ZERO,
        rows: None,
        seconds: 30,
        log: None,
        stop_file: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value; {usage}"))
        };
        let number = |v: String, name: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("{name} takes a whole number, not `{v}`"))
        };
        match a.as_str() {
            "--rows" => opts.rows = Some(number(value("--rows")?, "--rows")?),
            "--seconds" => opts.seconds = number(value("--seconds")?, "--seconds")?,
            "--log" => opts.log = Some(value("--log")?.into()),
            "--stop-file" => opts.stop_file = Some(value("--stop-file")?.into()),
            other if other.starts_with("--") => {
                return Err(format!("unknown option `{other}`; {usage}"));
            }
            other => positional.push(other.to_string()),
        }
    }
    let [db, interval] = positional.as_slice() else {
        return Err(usage.into());
    };
    opts.db = db.into();
    opts.interval = Duration::from_millis(
        interval
            .parse()
            .map_err(|_| format!("INTERVAL_MS must be a whole number, not `{interval}`"))?,
    );
    opts.seconds = opts.seconds.min(600);
    Ok(opts)
}

pub fn main(args: &[String]) -> Result<(), String> {
    let opts = parse(args)?;
    let conn =
        Connection::open(&opts.db).map_err(|e| format!("open {}: {e}", opts.db.display()))?;
    conn.busy_timeout(Duration::from_secs(10))
        .and_then(|()| conn.pragma_update(None, "journal_mode", "wal"))
        .and_then(|()| {
            conn.execute_batch(
                "CREATE TABLE IF NOT EXISTS writes(id INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL, latency_us INTEGER NOT NULL, payload BLOB)",
            )
        })
        .map_err(|e| format!("set up {}: {e}", opts.db.display()))?;
    let mut log = match &opts.log {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| format!("open {}: {e}", p.display()))?,
        ),
        None => None,
    };
    let end = Instant::now() + Duration::from_secs(opts.seconds);
    let (mut commits, mut worst, mut total) = (0u64, Duration::ZERO, Duration::ZERO);
    let mut last = Duration::ZERO;
    loop {
        if Instant::now() >= end
            || opts.rows.is_some_and(|n| commits >= n)
            || opts.stop_file.as_ref().is_some_and(|p| p.exists())
        {
            break;
        }
        let started = Instant::now();
        let at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        // Autocommit: one transaction per row. The row carries the previous commit's
        // latency (its own is known only once it has committed).
        conn.execute(
            "INSERT INTO writes(at_ms, latency_us, payload) VALUES (?1, ?2, randomblob(200))",
            (at_ms, last.as_micros() as i64),
        )
        .map_err(|e| format!("insert after {commits} commits: {e}"))?;
        last = started.elapsed();
        commits += 1;
        worst = worst.max(last);
        total += last;
        if let Some(f) = log.as_mut() {
            let id = conn.last_insert_rowid();
            writeln!(f, "{id} {at_ms} {}", last.as_micros())
                .map_err(|e| format!("write log: {e}"))?;
        }
        std::thread::sleep(opts.interval);
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "commits {commits} max_latency_ms {:.1} mean_latency_ms {:.2}",
        ms(worst),
        if commits == 0 {
            0.0
        } else {
            ms(total) / commits as f64
        }
    );
    Ok(())
}
