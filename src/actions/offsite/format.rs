//! The repository format "runbook-offsite", version 2 (the README documents it):
//!
//! ```text
//! config                      {"format":"runbook-offsite","version":2,"key":FINGERPRINT}
//!                             written last when the repository is made (temp + rename)
//! keys/<fingerprint>.age      the repository key, age-encrypted to the recipients
//! objects/<2 hex>/<64 hex>    age ciphertext of one file or manifest, to the recipients
//!                             and the key's own recipient; the name is
//!                             HMAC-SHA256(id key, plaintext): it authenticates the bytes
//! index/<name>                ciphertext sha256 and size of the objects one push sent
//!                             (JSON with an HMAC); merged by retention
//! snapshots/<stamp>           {stamp, manifest object, counts, HMAC}: written last,
//!                             never replaced; its presence means sent and verified
//! locks/<name>                who holds the repository: shared (push, check) or
//!                             exclusive (retention)
//! checks/<stamp>              the last offsite-check of a snapshot (with an HMAC)
//! generation                  a random word rewritten before anything is deleted: a
//!                             pushing host's cache of what is there is valid only
//!                             for the generation it was made in
//! tmp/<lock name>/            an upload being received; removed when it is committed,
//!                             or when its lock is gone
//! ```
//!
//! Nothing is ever overwritten: objects, index and snapshot files are linked into
//! place from the upload without replacing (an existing object name means the same
//! plaintext). The plaintext files hold no plaintext of the snapshot: names are keyed
//! hashes, and the manifest (paths, modes, sizes, object names) is itself an object.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::key::RepoKey;

pub const FORMAT: &str = "runbook-offsite";
pub const VERSION: u32 = 2;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub format: String,
    pub version: u32,
    /// The fingerprint of the repository key.
    pub key: String,
}

impl Config {
    pub fn new(key: &RepoKey) -> Config {
        Config {
            format: FORMAT.into(),
            version: VERSION,
            key: key.fingerprint(),
        }
    }
}

pub fn valid_stamp(stamp: &str) -> bool {
    !stamp.is_empty()
        && stamp.len() <= 64
        && !stamp.starts_with('.')
        && stamp
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

pub fn valid_id(id: &str) -> bool {
    id.len() == 64
        && id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

pub fn valid_fingerprint(fp: &str) -> bool {
    fp.len() == 32
        && fp
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

pub fn object_path(id: &str) -> String {
    format!("objects/{}/{}", &id[..2], id)
}

pub fn snapshot_path(stamp: &str) -> String {
    format!("snapshots/{stamp}")
}

pub fn check_path(stamp: &str) -> String {
    format!("checks/{stamp}")
}

pub fn key_path(fingerprint: &str) -> String {
    format!("keys/{fingerprint}.age")
}

/// A file of the repository whose content the key vouches for: serialized with
/// `mac` empty, HMAC'd, then written with it.
pub trait Signed: Serialize + for<'de> Deserialize<'de> + Clone {
    fn mac_field(&mut self) -> &mut String;

    fn sign(mut self, key: &RepoKey) -> Vec<u8> {
        *self.mac_field() = String::new();
        let body = serde_json::to_vec(&self).expect("serializable");
        *self.mac_field() = key.mac(&body);
        let mut out = serde_json::to_vec(&self).expect("serializable");
        out.push(b'\n');
        out
    }

    /// The value, when `text` parses and its HMAC is the key's; why not otherwise.
    fn open(text: &[u8], key: &RepoKey) -> Result<Self, String> {
        let mut v: Self =
            serde_json::from_slice(text).map_err(|_| "it is not of this format".to_string())?;
        let claimed = std::mem::take(v.mac_field());
        let body = serde_json::to_vec(&v).expect("serializable");
        if !constant_time_eq(claimed.as_bytes(), key.mac(&body).as_bytes()) {
            return Err(
                "its HMAC is not the repository key's: it was not written by a host holding the key (forged or damaged)".into(),
            );
        }
        *v.mac_field() = claimed;
        Ok(v)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `snapshots/<stamp>`: one shipped, verified snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    pub format: String,
    pub version: u32,
    /// Bound here, so a snapshot file copied under another name is refused.
    pub stamp: String,
    pub created_at: String,
    /// The object holding the manifest.
    pub manifest: String,
    /// The manifest object's ciphertext size and sha256.
    pub manifest_bytes: u64,
    pub manifest_sha256: String,
    pub files: u64,
    /// Plaintext bytes of the files.
    pub bytes: u64,
    /// Distinct objects of the files (the manifest not counted).
    pub objects: u64,
    pub mac: String,
}

impl Signed for Snapshot {
    fn mac_field(&mut self) -> &mut String {
        &mut self.mac
    }
}

/// One object's ciphertext, as a push saw it arrive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cipher {
    pub sha256: String,
    pub bytes: u64,
}

/// `index/<name>`: the ciphertext digests of objects, what `offsite-check` compares
/// the remote's digests with.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Index {
    pub format: String,
    pub version: u32,
    pub objects: BTreeMap<String, Cipher>,
    pub mac: String,
}

impl Signed for Index {
    fn mac_field(&mut self) -> &mut String {
        &mut self.mac
    }
}

impl Index {
    pub fn new(objects: BTreeMap<String, Cipher>) -> Index {
        Index {
            format: FORMAT.into(),
            version: VERSION,
            objects,
            mac: String::new(),
        }
    }
}

/// `checks/<stamp>`: the last `offsite-check` that covered a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Check {
    pub stamp: String,
    pub checked_at: String,
    /// Of the snapshot's objects, how many had their remote digest compared.
    pub objects_checked: u64,
    pub objects: u64,
    pub problems: Vec<String>,
    pub mac: String,
}

impl Signed for Check {
    fn mac_field(&mut self) -> &mut String {
        &mut self.mac
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    File,
    Dir,
    Symlink,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Relative to the snapshot's root; "" is the root itself.
    pub path: String,
    pub kind: Kind,
    pub mode: u32,
    pub mtime: i64,
    #[serde(default)]
    pub mtime_nsec: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// The object holding a file's bytes: HMAC-SHA256 of them under the id key, which
    /// is also how a restore checks what it decrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// The manifest: every entry of the snapshot. It holds no stamp, so an unchanged
/// snapshot's manifest is the same object as its parent's and is not sent again; the
/// snapshot file binds it to a stamp.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub entries: Vec<Entry>,
}

impl Manifest {
    /// Refuses what a restore must never act on: a path that is absolute, has `..`,
    /// `.` or empty components, is named twice, or lies below anything but a directory
    /// entry of the manifest (below a symlink, it would be written through the link).
    pub fn check(&self) -> Result<(), String> {
        if self.format != "runbook-offsite-manifest" || self.version != VERSION {
            return Err("it is not a version 2 manifest".into());
        }
        let mut kinds: BTreeMap<&str, Kind> = BTreeMap::new();
        for e in &self.entries {
            let p = e.path.as_str();
            let bad_component = p.split('/').any(|c| c.is_empty() || c == "." || c == "..");
            if (!p.is_empty() && bad_component) || p.contains('\0') {
                return Err(format!(
                    "it names `{p}`, which is not a plain relative path"
                ));
            }
            if kinds.insert(p, e.kind).is_some() {
                return Err(format!("it names `{p}` twice"));
            }
            match e.kind {
                Kind::File if e.size.is_none() || !e.object.as_deref().is_some_and(valid_id) => {
                    return Err(format!("its file `{p}` has no size or object"));
                }
                Kind::Symlink if e.target.is_none() => {
                    return Err(format!("its link `{p}` has no target"));
                }
                _ => {}
            }
            if e.mode & !0o7777 != 0 {
                return Err(format!("its entry `{p}` has mode {:o}", e.mode));
            }
        }
        if kinds.get("") != Some(&Kind::Dir) {
            return Err("its root is not a directory".into());
        }
        for e in &self.entries {
            if e.path.is_empty() {
                continue;
            }
            let parent = e.path.rsplit_once('/').map_or("", |(p, _)| p);
            match kinds.get(parent) {
                Some(Kind::Dir) => {}
                Some(_) => {
                    return Err(format!(
                        "it names `{}` below `{parent}`, which is not a directory",
                        e.path
                    ));
                }
                None => {
                    return Err(format!(
                        "it names `{}`, whose directory `{parent}` it does not name",
                        e.path
                    ));
                }
            }
        }
        Ok(())
    }

    /// The distinct objects of the files.
    pub fn objects(&self) -> BTreeSet<&str> {
        self.entries
            .iter()
            .filter_map(|e| e.object.as_deref())
            .collect()
    }
}

/// `locks/<name>`: a holder of the repository.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Lock {
    pub kind: LockKind,
    pub host: String,
    pub pid: u32,
    /// The process's start time (clock ticks since boot, from /proc): a pid reused by
    /// another process is not the holder.
    pub start: u64,
    pub time: String,
    pub command: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockKind {
    Shared,
    Exclusive,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, kind: Kind) -> Entry {
        Entry {
            path: path.into(),
            kind,
            mode: 0o644,
            mtime: 0,
            mtime_nsec: 0,
            size: (kind == Kind::File).then_some(1),
            object: (kind == Kind::File).then(|| "a".repeat(64)),
            target: (kind == Kind::Symlink).then(|| "/etc".into()),
        }
    }

    fn manifest(entries: Vec<Entry>) -> Manifest {
        Manifest {
            format: "runbook-offsite-manifest".into(),
            version: VERSION,
            entries,
        }
    }

    #[test]
    fn a_manifest_names_only_plain_paths_below_its_directories() {
        let ok = manifest(vec![
            entry("", Kind::Dir),
            entry("d", Kind::Dir),
            entry("d/f", Kind::File),
            entry("l", Kind::Symlink),
        ]);
        assert_eq!(ok.check(), Ok(()));
        for (bad, why) in [
            (
                vec![
                    entry("", Kind::Dir),
                    entry("l", Kind::Symlink),
                    entry("l/x", Kind::File),
                ],
                "not a directory",
            ),
            (
                vec![entry("", Kind::Dir), entry("../x", Kind::File)],
                "not a plain relative path",
            ),
            (
                vec![entry("", Kind::Dir), entry("/etc/x", Kind::File)],
                "not a plain relative path",
            ),
            (
                vec![entry("", Kind::Dir), entry("a//b", Kind::File)],
                "not a plain relative path",
            ),
            (
                vec![
                    entry("", Kind::Dir),
                    entry("x", Kind::File),
                    entry("x", Kind::File),
                ],
                "twice",
            ),
            (
                vec![entry("", Kind::Dir), entry("d/x", Kind::File)],
                "does not name",
            ),
            (vec![entry("x", Kind::File)], "root"),
        ] {
            let err = manifest(bad).check().unwrap_err();
            assert!(err.contains(why), "{err}");
        }
    }

    #[test]
    fn a_signed_file_opens_only_with_its_key_and_unchanged() {
        let k = RepoKey::generate().unwrap();
        let s = Snapshot {
            format: FORMAT.into(),
            version: VERSION,
            stamp: "20260101T000000Z".into(),
            created_at: "now".into(),
            manifest: "b".repeat(64),
            manifest_bytes: 1,
            manifest_sha256: "c".repeat(64),
            files: 1,
            bytes: 2,
            objects: 1,
            mac: String::new(),
        };
        let bytes = s.clone().sign(&k);
        assert_eq!(Snapshot::open(&bytes, &k).unwrap().stamp, s.stamp);
        let other = RepoKey::generate().unwrap();
        assert!(Snapshot::open(&bytes, &other).is_err());
        let text = String::from_utf8(bytes).unwrap();
        let forged = text.replace("20260101T000000Z", "20260102T000000Z");
        assert!(Snapshot::open(forged.as_bytes(), &k).is_err());
    }
}
