//! What the AtoCore programs (`atocore-sandbox`, `atocore-standin`, `atocore-damage`)
//! agree on: where the files are below the AtoCore root, the SQL schema, the generated
//! prose, the toy embedding, and the Chroma-shaped vector segment format.
//!
//! The vector store is `data/chroma/`: `chroma.sqlite3` holds one row per embedding
//! (`embeddings(id, chunk_id, segment)`) and each segment directory (a UUID) holds the
//! hnswlib-shaped files `header.bin`, `data_level0.bin`, `length.bin`,
//! `link_lists.bin`. A vector exists when its row is in `chroma.sqlite3` AND its record
//! is within the `header.bin` count in the segment's `data_level0.bin`, so a copy of
//! the directory taken while ingestion runs can really be inconsistent.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rusqlite::Connection;

/// The deployment's root, as source paths in the database spell it.
pub const DEPLOYED_ROOT: &str = "/srv/storage/atocore";

/// Paths below an AtoCore root (`/srv/storage/atocore` on Dalidou).
#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn new(root: &Path) -> Layout {
        Layout {
            root: root.to_path_buf(),
        }
    }
    pub fn data(&self) -> PathBuf {
        self.root.join("data")
    }
    pub fn db(&self) -> PathBuf {
        self.root.join("data/db/atocore.db")
    }
    pub fn registry(&self) -> PathBuf {
        self.root.join("config/project-registry.json")
    }
    pub fn chroma(&self) -> PathBuf {
        self.root.join("data/chroma")
    }
    pub fn chroma_db(&self) -> PathBuf {
        self.root.join("data/chroma/chroma.sqlite3")
    }
    pub fn ingestion_lock(&self) -> PathBuf {
        self.root.join("data/ingestion.lock")
    }
    pub fn backups(&self) -> PathBuf {
        self.root.join("backups")
    }
    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }
}

/// `PATH-wal` and `PATH-shm` beside a SQLite file.
pub fn wal_files(db: &Path) -> [PathBuf; 2] {
    ["-wal", "-shm"].map(|suffix| {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    })
}

/// The AtoCore tables (the sandbox's database and `atocore-damage --kind empty-db`).
pub const SCHEMA: &str = "
CREATE TABLE projects(id TEXT PRIMARY KEY, name TEXT, description TEXT);
CREATE TABLE documents(id INTEGER PRIMARY KEY, project_id TEXT REFERENCES projects(id),
    source_path TEXT, title TEXT, ingested_at TEXT);
CREATE TABLE chunks(id INTEGER PRIMARY KEY, document_id INTEGER REFERENCES documents(id),
    ordinal INTEGER, text TEXT);
CREATE INDEX documents_project ON documents(project_id);
CREATE INDEX chunks_document ON chunks(document_id);
";

/// The vector store's table.
pub const CHROMA_SCHEMA: &str = "
CREATE TABLE embeddings(id INTEGER PRIMARY KEY, chunk_id INTEGER, segment TEXT);
CREATE INDEX embeddings_chunk ON embeddings(chunk_id);
";

/// Writes an empty AtoCore database (tables, no rows) in WAL mode at `path`, which must
/// not exist; leaves no `-wal` beside it.
pub fn create_db(
    path: &Path,
    fill: impl FnOnce(&Connection) -> rusqlite::Result<()>,
) -> Result<(), String> {
    let err = |e: rusqlite::Error| format!("{}: {e}", path.display());
    let conn = Connection::open(path).map_err(err)?;
    conn.execute_batch("PRAGMA page_size = 4096; PRAGMA journal_mode = MEMORY;")
        .map_err(err)?;
    conn.execute_batch("BEGIN").map_err(err)?;
    conn.execute_batch(SCHEMA).map_err(err)?;
    fill(&conn).map_err(err)?;
    conn.execute_batch("COMMIT").map_err(err)?;
    // The deployment's database is in WAL mode; switching writes it into the header.
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(err)?;
    if mode != "wal" {
        return Err(format!(
            "{}: journal_mode is {mode}, not wal",
            path.display()
        ));
    }
    conn.close().map_err(|(_, e)| err(e))?;
    // The last connection checkpoints and removes the WAL; check it did.
    for leftover in wal_files(path) {
        if leftover.exists() {
            return Err(format!("{} was left behind", leftover.display()));
        }
    }
    Ok(())
}

/// SplitMix64: small, fast and the same everywhere, which is all the sandbox needs.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[(self.next_u64() % items.len() as u64) as usize]
    }

    /// A UUID-shaped name (version 4 layout) for a segment directory.
    pub fn uuid(&mut self) -> String {
        let a = self.next_u64();
        let b = self.next_u64();
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            0x8000 | ((b >> 48) & 0x3fff),
            b & 0xffff_ffff_ffff
        )
    }
}

/// A project of the sandbox, with the words its prose is made of.
pub struct ProjectSpec {
    pub id: &'static str,
    pub name: &'static str,
    pub code: &'static str,
    pub description: &'static str,
    pub words: &'static [&'static str],
}

/// The sandbox's projects, in the order documents are dealt to them (so even a
/// one-document sandbox has a `p05-interferometer` document).
pub const PROJECTS: [ProjectSpec; 3] = [
    ProjectSpec {
        id: "p05-interferometer",
        name: "P05 Interferometer",
        code: "P05",
        description: "Fizeau interferometer for measuring optical flats and lens wavefronts",
        words: &[
            "fringe pattern",
            "wavefront",
            "phase unwrapping",
            "reference flat",
            "Fizeau cavity",
            "Zernike fit",
            "piezo phase shifter",
            "vibration isolation",
            "HeNe laser",
            "surface figure",
            "interferogram",
            "retrace error",
        ],
    },
    ProjectSpec {
        id: "p04-gigabit",
        name: "P04 GigaBIT",
        code: "P04",
        description: "Gigabit optical link testbed: transceivers, fibre plant and bit error rate runs",
        words: &[
            "transceiver",
            "laser driver",
            "eye diagram",
            "bit error rate",
            "fibre spool",
            "SerDes",
            "jitter budget",
            "link margin",
            "clock recovery",
            "optical power meter",
        ],
    },
    ProjectSpec {
        id: "p06-polisher",
        name: "P06 Polisher",
        code: "P06",
        description: "CNC polishing cell for precision optics",
        words: &[
            "pitch lap",
            "dwell time",
            "removal rate",
            "cerium oxide slurry",
            "spindle",
            "tool path",
            "surface roughness",
            "edge roll-off",
            "workpiece chuck",
            "metrology loop",
        ],
    },
];

const GENERAL: &[&str] = &[
    "calibration",
    "schedule",
    "budget",
    "fixture",
    "alignment",
    "lab temperature",
    "humidity log",
    "kinematic mount",
    "controller",
    "firmware",
    "data pipeline",
    "test report",
    "design review",
    "tolerance stack",
    "procurement",
    "safety check",
];

const KINDS: &[&str] = &[
    "notes",
    "design memo",
    "test log",
    "meeting minutes",
    "review",
    "procedure",
    "status report",
];

/// One sentence of project prose.
fn sentence(rng: &mut Rng, p: &ProjectSpec) -> String {
    let w = rng.pick(p.words);
    let mut w2 = rng.pick(p.words);
    while w2 == w {
        w2 = rng.pick(p.words);
    }
    let g = rng.pick(GENERAL);
    let n = rng.range(2, 97);
    let n2 = rng.range(3, 400);
    let code = p.code;
    let lower = code.to_ascii_lowercase();
    match rng.next_u64() % 10 {
        0 => format!(
            "The {w} on {code} was checked against the {g} and the {w2} stayed within {n} percent."
        ),
        1 => format!("{code} notes: the {w} needs a new {g} before the next run."),
        2 => format!(
            "We measured the {w} at {n} points; the {g} drifted by {n2} nm over the session."
        ),
        3 => format!(
            "For {code}, the {w} depends on the {w2}, so the {g} is logged with every batch."
        ),
        4 => format!("An open question on {lower} is whether the {w} limits the {g}."),
        5 => format!("The {g} procedure for the {w} is written up in the {code} lab notebook."),
        6 => format!("After the {g} change, {code} saw the {w} improve by {n} percent."),
        7 => format!("{code} is about the {w}: how the {w2} and the {g} interact in practice."),
        8 => format!("Action item for {lower}: repeat the {w} run with the {w2} at {n2} um."),
        _ => format!("The {w} and the {w2} were reviewed; the {g} is on track for week {n}."),
    }
}

/// One chunk of prose: four to seven sentences.
pub fn chunk_text(rng: &mut Rng, p: &ProjectSpec) -> String {
    let n = rng.range(4, 7);
    (0..n)
        .map(|_| sentence(rng, p))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A document's title and its source path (under the deployment's vault).
pub fn document_title_and_path(rng: &mut Rng, p: &ProjectSpec, id: i64) -> (String, String) {
    let w = rng.pick(p.words);
    let kind = rng.pick(KINDS);
    let title = format!("{} {w} {kind} #{id}", p.code);
    let slug: String = format!("{w} {kind}")
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let dir = kind.replace(' ', "-");
    let path = format!(
        "{DEPLOYED_ROOT}/sources/vault/{}/{dir}/{id:04}-{slug}.md",
        p.id
    );
    (title, path)
}

pub fn project(id: &str) -> Option<&'static ProjectSpec> {
    PROJECTS.iter().find(|p| p.id == id)
}

/// The project registry file for these projects.
pub fn registry_json(projects: &[&ProjectSpec]) -> String {
    let list: Vec<serde_json::Value> = projects
        .iter()
        .map(|p| {
            serde_json::json!({
                "id": p.id,
                "name": p.name,
                "description": p.description,
                "source_dirs": [
                    format!("{DEPLOYED_ROOT}/sources/vault/{}", p.id),
                    format!("{DEPLOYED_ROOT}/sources/drive/{}", p.id),
                ],
            })
        })
        .collect();
    let mut text = serde_json::to_string_pretty(&serde_json::json!({ "projects": list }))
        .expect("a JSON value serializes");
    text.push('\n');
    text
}

// ---------------------------------------------------------------------------------
// The toy embedding and the segment files.

/// Floats per vector.
pub const DIM: usize = 32;
/// Neighbour slots per element in level 0 (hnswlib's maxM0).
const MAX_M0: usize = 8;
/// Bytes of one element in `data_level0.bin`: link count, links, vector, label.
pub const RECORD: usize = 4 + 4 * MAX_M0 + 4 * DIM + 8;
const HEADER_LEN: usize = 8 * 6 + 4 + 4 + 8 * 3 + 8 + 8;

const STOP_WORDS: &[&str] = &[
    "a", "about", "an", "and", "are", "as", "at", "be", "by", "for", "how", "in", "is", "it", "of",
    "on", "or", "so", "the", "to", "was", "we", "what", "with",
];

fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A hashed bag of words, normalized: texts sharing words point the same way.
pub fn embed(text: &str) -> [f32; DIM] {
    let mut v = [0f32; DIM];
    let lower = text.to_ascii_lowercase();
    for word in lower
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty() && !STOP_WORDS.contains(w))
    {
        let h = fnv1a(word);
        v[(h % DIM as u64) as usize] += if h >> 63 == 1 { 1.0 } else { -1.0 };
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

pub fn dot(a: &[f32; DIM], b: &[f32; DIM]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// One element of `data_level0.bin` (no links: every element sits in level 0 alone).
pub fn record(label: u64, vector: &[f32; DIM]) -> Vec<u8> {
    let mut out = Vec::with_capacity(RECORD);
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&[0u8; 4 * MAX_M0]);
    for x in vector {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.extend_from_slice(&label.to_le_bytes());
    out
}

/// `header.bin` for a segment of `count` elements, laid out as hnswlib's index header.
pub fn header(count: u64) -> Vec<u8> {
    let max_elements = count.div_ceil(1000).max(1) * 1000;
    let mut out = Vec::with_capacity(HEADER_LEN);
    for v in [
        0u64,
        max_elements,
        count,
        RECORD as u64,
        (RECORD - 8) as u64,
        36,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&0i32.to_le_bytes()); // max level
    out.extend_from_slice(&0u32.to_le_bytes()); // entry point
    for v in [MAX_M0 as u64 / 2, MAX_M0 as u64, MAX_M0 as u64 / 2] {
        out.extend_from_slice(&v.to_le_bytes()); // maxM, maxM0, M
    }
    out.extend_from_slice(&(1.0f64 / (MAX_M0 as f64 / 2.0).ln()).to_le_bytes());
    out.extend_from_slice(&100u64.to_le_bytes()); // ef_construction
    out
}

fn header_count(bytes: &[u8]) -> Option<u64> {
    (bytes.len() == HEADER_LEN).then(|| u64::from_le_bytes(bytes[16..24].try_into().unwrap()))
}

/// Writes a segment directory holding these (label, vector) elements.
pub fn write_segment(dir: &Path, elements: &[(u64, [f32; DIM])]) -> Result<(), String> {
    let err = |what: &str, e: std::io::Error| format!("{}/{what}: {e}", dir.display());
    fs::create_dir_all(dir).map_err(|e| err("", e))?;
    let mut data = Vec::with_capacity(elements.len() * RECORD);
    for (label, v) in elements {
        data.extend(record(*label, v));
    }
    let lengths = vec![0u8; 4 * elements.len()];
    fs::write(dir.join("data_level0.bin"), data).map_err(|e| err("data_level0.bin", e))?;
    fs::write(dir.join("header.bin"), header(elements.len() as u64))
        .map_err(|e| err("header.bin", e))?;
    fs::write(dir.join("length.bin"), lengths).map_err(|e| err("length.bin", e))?;
    fs::write(dir.join("link_lists.bin"), b"").map_err(|e| err("link_lists.bin", e))?;
    Ok(())
}

/// Adds elements to a segment: data and lengths first, then the header's count (what a
/// reader trusts), as hnswlib's save does.
pub fn append_segment(dir: &Path, elements: &[(u64, [f32; DIM])]) -> Result<(), String> {
    let err = |what: &str, e: std::io::Error| format!("{}/{what}: {e}", dir.display());
    let old = fs::read(dir.join("header.bin")).map_err(|e| err("header.bin", e))?;
    let count =
        header_count(&old).ok_or_else(|| format!("{}/header.bin is damaged", dir.display()))?;
    let append = |name: &str, bytes: &[u8]| {
        fs::OpenOptions::new()
            .append(true)
            .open(dir.join(name))
            .and_then(|mut f| f.write_all(bytes))
            .map_err(|e| err(name, e))
    };
    let mut data = Vec::new();
    for (label, v) in elements {
        data.extend(record(*label, v));
    }
    append("data_level0.bin", &data)?;
    append("length.bin", &vec![0u8; 4 * elements.len()])?;
    fs::write(
        dir.join("header.bin"),
        header(count + elements.len() as u64),
    )
    .map_err(|e| err("header.bin", e))
}

/// The elements of a segment directory: as many records of `data_level0.bin` as
/// `header.bin` counts (fewer when the data file is short).
pub fn read_segment(dir: &Path) -> Result<Vec<(u64, [f32; DIM])>, String> {
    let header = fs::read(dir.join("header.bin"))
        .map_err(|e| format!("{}/header.bin: {e}", dir.display()))?;
    let count =
        header_count(&header).ok_or_else(|| format!("{}/header.bin is damaged", dir.display()))?;
    let data = fs::read(dir.join("data_level0.bin"))
        .map_err(|e| format!("{}/data_level0.bin: {e}", dir.display()))?;
    let n = (count as usize).min(data.len() / RECORD);
    Ok(data
        .chunks_exact(RECORD)
        .take(n)
        .map(|r| {
            let mut v = [0f32; DIM];
            let floats = &r[4 + 4 * MAX_M0..RECORD - 8];
            for (x, b) in v.iter_mut().zip(floats.chunks_exact(4)) {
                *x = f32::from_le_bytes(b.try_into().unwrap());
            }
            (u64::from_le_bytes(r[RECORD - 8..].try_into().unwrap()), v)
        })
        .collect())
}

/// The segment a chunk's embedding goes to: one of the (sorted) segments by chunk id.
pub fn segment_for(segments: &[String], chunk_id: i64) -> &str {
    &segments[(chunk_id.unsigned_abs() % segments.len() as u64) as usize]
}
