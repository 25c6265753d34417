//! The repository format "runbook-offsite", version 1 (the README documents it):
//!
//! ```text
//! runbook-offsite.json          {"format":"runbook-offsite","version":1}
//! keys/<key-id>.age             the object-id key, age-encrypted to the recipients
//! objects/<2 hex>/<64 hex id>   age ciphertext of one file; id = HMAC-SHA256(id key, bytes)
//! snapshots/<stamp>/manifest.age  age ciphertext of the Manifest (JSON)
//! snapshots/<stamp>/objects     "<id> <sha256 of ciphertext> <bytes>" lines, then
//!                               "manifest <sha256 of manifest.age> <bytes>"
//! snapshots/<stamp>/verified    written only once the remote digests matched
//! ```
//!
//! The plaintext parts hold no plaintext of the snapshot: ids are keyed hashes, and the
//! lists let a host without the identity check the copy.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::ssh::{Remote, SshError};

pub const FORMAT: &str = "runbook-offsite";
pub const VERSION: u32 = 1;

/// The off-site repository: where it is and how to reach it.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RepoArgs {
    pub host: String,
    #[serde(default = "ssh_port")]
    pub port: u16,
    pub user: String,
    /// The repository directory on the remote (relative to the user's home, or absolute).
    pub dir: PathBuf,
    /// The private key for ssh (given to `ssh -i`; never read by runbook).
    pub ssh_key: PathBuf,
    /// A known_hosts file holding the remote's host key: it is verified, never accepted.
    pub known_hosts: PathBuf,
}

fn ssh_port() -> u16 {
    22
}

impl RepoArgs {
    /// Problems with the arguments themselves, naming the field.
    pub fn check(&self) -> Result<(), String> {
        let bad = |s: &str| s.is_empty() || s.starts_with('-') || s.contains(['@', ' ', '\n']);
        if bad(&self.host) {
            return Err(format!("`repo.host` `{}` is not a host name", self.host));
        }
        if bad(&self.user) {
            return Err(format!("`repo.user` `{}` is not a user name", self.user));
        }
        if self.dir.as_os_str().is_empty() || self.dir.to_string_lossy().contains('\n') {
            return Err("`repo.dir` is empty".into());
        }
        for (field, path) in [
            ("repo.ssh_key", &self.ssh_key),
            ("repo.known_hosts", &self.known_hosts),
        ] {
            if !path.is_file() {
                return Err(format!("`{field}`: `{}` is not a file", path.display()));
            }
        }
        Ok(())
    }

    /// This repository's local directory under the state dir: its id key and staging.
    pub fn local_dir(&self, state_dir: &Path) -> PathBuf {
        let name = format!(
            "{}@{}:{}/{}",
            self.user,
            self.host,
            self.port,
            self.dir.display()
        );
        let digest = super::crypto::sha256_hex(name.as_bytes());
        state_dir.join("offsite").join(&digest[..16])
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

pub fn object_path(id: &str) -> String {
    format!("objects/{}/{}", &id[..2], id)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    File,
    Dir,
    Symlink,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub stamp: String,
    pub key_id: String,
    pub created_at: String,
    pub entries: Vec<Entry>,
}

/// One line of `snapshots/<stamp>/objects`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub sha256: String,
    pub bytes: u64,
}

/// `snapshots/<stamp>/objects`: each object's ciphertext digest, and the manifest's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObjectList {
    pub objects: BTreeMap<String, Listed>,
    pub manifest: Option<Listed>,
}

impl ObjectList {
    pub fn render(&self) -> String {
        let mut s = String::new();
        for (id, l) in &self.objects {
            s.push_str(&format!("{id} {} {}\n", l.sha256, l.bytes));
        }
        if let Some(m) = &self.manifest {
            s.push_str(&format!("manifest {} {}\n", m.sha256, m.bytes));
        }
        s
    }

    /// None when a line is not of the format (a damaged list verifies nothing).
    pub fn parse(text: &str) -> Option<ObjectList> {
        let mut list = ObjectList::default();
        for line in text.lines() {
            let mut words = line.split(' ');
            let (name, sha, bytes) = (words.next()?, words.next()?, words.next()?);
            if words.next().is_some() || !valid_id(sha) {
                return None;
            }
            let listed = Listed {
                sha256: sha.to_string(),
                bytes: bytes.parse().ok()?,
            };
            if name == "manifest" {
                list.manifest = Some(listed);
            } else if valid_id(name) {
                list.objects.insert(name.to_string(), listed);
            } else {
                return None;
            }
        }
        list.manifest.is_some().then_some(list)
    }

    /// Every listed remote path with its digest and size, the manifest last.
    pub fn paths(&self, stamp: &str) -> Vec<(String, Listed)> {
        let mut v: Vec<(String, Listed)> = self
            .objects
            .iter()
            .map(|(id, l)| (object_path(id), l.clone()))
            .collect();
        if let Some(m) = &self.manifest {
            v.push((manifest_path(stamp), m.clone()));
        }
        v
    }
}

pub fn manifest_path(stamp: &str) -> String {
    format!("snapshots/{stamp}/manifest.age")
}
pub fn list_path(stamp: &str) -> String {
    format!("snapshots/{stamp}/objects")
}
pub fn marker_path(stamp: &str) -> String {
    format!("snapshots/{stamp}/verified")
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Verified {
    pub verified_at: String,
    pub objects: usize,
    pub bytes: u64,
    /// sha256 of the `objects` list the check was made against.
    pub objects_sha256: String,
}

/// What the remote holds, from one read-only listing.
#[derive(Debug, Default)]
pub struct Inventory {
    /// The repository directory exists.
    pub exists: bool,
    /// Every regular file, relative to the repository, with its size.
    pub files: BTreeMap<String, u64>,
    /// The contents of the small plaintext files (format, lists, markers).
    pub texts: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(transparent)]
    Ssh(#[from] SshError),
    #[error("the off-site repository {target}/{dir} is not a runbook-offsite repository: {why}")]
    Format {
        target: String,
        dir: String,
        why: String,
    },
}

/// Lists the files with sizes, then prints each small plaintext file as
/// `C <bytes> <name>` followed by its bytes: the format file and the markers, and the
/// object lists when `$2` is `lists` (they grow with the snapshots: a push reads
/// them only when it has no record of its own). Writes nothing.
const INVENTORY: &str = r#"cd -- "$1" 2>/dev/null || { echo ABSENT; exit 0; }
echo PRESENT
find . -type f -printf 'F %s %P\n'
lists=
[ "$2" = lists ] && lists='snapshots/*/objects'
for f in runbook-offsite.json snapshots/*/verified $lists; do
  [ -f "$f" ] || continue
  printf 'C %s %s\n' "$(wc -c < "$f")" "$f"
  cat -- "$f"
done"#;

/// Which plaintext files an inventory brings along.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Texts {
    Markers,
    Lists,
}

impl Inventory {
    pub fn read(remote: &Remote, texts: Texts) -> Result<Inventory, RepoError> {
        let dir = remote.repo.dir.display().to_string();
        let which = match texts {
            Texts::Markers => "markers",
            Texts::Lists => "lists",
        };
        let out = remote.run(
            "listing the repository",
            INVENTORY,
            &[&dir, which],
            b"",
            &[],
        )?;
        let inv = Inventory::parse(&out);
        if inv.exists && !inv.files.is_empty() {
            let why = match inv.texts.get("runbook-offsite.json") {
                None => Some("it has no runbook-offsite.json".to_string()),
                Some(t) => match serde_json::from_str::<serde_json::Value>(t) {
                    Ok(v) if v["format"] == FORMAT && v["version"] == VERSION => None,
                    Ok(v) if v["format"] == FORMAT => Some(format!(
                        "it is version {} of the format; this runbook reads version {VERSION}",
                        v["version"]
                    )),
                    _ => Some("its runbook-offsite.json is not of this format".to_string()),
                },
            };
            if let Some(why) = why {
                return Err(RepoError::Format {
                    target: remote.target(),
                    dir,
                    why,
                });
            }
        }
        Ok(inv)
    }

    fn parse(out: &[u8]) -> Inventory {
        let mut inv = Inventory::default();
        let mut rest = out;
        let line = |rest: &mut &[u8]| -> Option<String> {
            let end = rest.iter().position(|b| *b == b'\n')?;
            let l = String::from_utf8_lossy(&rest[..end]).into_owned();
            *rest = &rest[end + 1..];
            Some(l)
        };
        match line(&mut rest).as_deref() {
            Some("PRESENT") => inv.exists = true,
            _ => return inv,
        }
        while let Some(l) = line(&mut rest) {
            if let Some(f) = l.strip_prefix("F ") {
                if let Some((size, name)) = f.split_once(' ')
                    && let Ok(size) = size.parse()
                {
                    inv.files.insert(name.to_string(), size);
                }
            } else if let Some(c) = l.strip_prefix("C ") {
                let Some((len, name)) = c.split_once(' ') else {
                    break;
                };
                let Ok(len) = len.trim().parse::<usize>() else {
                    break;
                };
                let take = len.min(rest.len());
                inv.texts.insert(
                    name.to_string(),
                    String::from_utf8_lossy(&rest[..take]).into_owned(),
                );
                rest = &rest[take..];
            }
        }
        inv
    }

    /// The snapshot stamps there (a directory with any file in it).
    pub fn stamps(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .files
            .keys()
            .filter_map(|f| f.strip_prefix("snapshots/")?.split_once('/'))
            .map(|(s, _)| s.to_string())
            .filter(|s| valid_stamp(s))
            .collect();
        v.dedup();
        v
    }

    pub fn list(&self, stamp: &str) -> Option<ObjectList> {
        ObjectList::parse(self.texts.get(&list_path(stamp))?)
    }

    pub fn marker(&self, stamp: &str) -> Option<Verified> {
        serde_json::from_str(self.texts.get(&marker_path(stamp))?).ok()
    }

    /// Ciphertext digests the remote's lists (read with [`Texts::Lists`]) vouch for,
    /// of objects that are there with the listed size. What no list names (an
    /// interrupted push's upload) is unknown.
    pub fn known_objects(&self) -> BTreeMap<String, Listed> {
        let mut known = BTreeMap::new();
        for stamp in self.stamps() {
            if let Some(list) = self.list(&stamp) {
                known.extend(self.present(list.objects));
            }
        }
        known
    }

    /// Of `objects`, those there with the listed size.
    pub fn present(&self, objects: BTreeMap<String, Listed>) -> BTreeMap<String, Listed> {
        objects
            .into_iter()
            .filter(|(id, l)| self.files.get(&object_path(id)) == Some(&l.bytes))
            .collect()
    }

    /// Tombstones an interrupted retention left (`snapshots/.<stamp>.deleting`).
    pub fn tombstones(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .files
            .keys()
            .filter_map(|f| f.strip_prefix("snapshots/")?.split_once('/'))
            .map(|(s, _)| s.to_string())
            .filter(|s| s.starts_with('.') && s.ends_with(".deleting"))
            .collect();
        v.dedup();
        v
    }
}

/// Sizes (`S <bytes> <name>`) then digests (`sha256sum` lines) of the names on stdin;
/// a missing file has neither.
const DIGESTS: &str = r#"cd -- "$1" || exit 3
names=$(cat)
printf '%s\n' "$names" | xargs -d '\n' -r stat -c 'S %s %n' -- 2>/dev/null
printf '%s\n' "$names" | xargs -d '\n' -r sha256sum -- 2>/dev/null
exit 0"#;

/// What the remote says of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote256 {
    pub bytes: u64,
    pub sha256: Option<String>,
}

/// The remote's size and sha256 of each of `names` that is there. Only digests
/// cross the link.
pub fn remote_digests(
    remote: &Remote,
    names: &[String],
) -> Result<BTreeMap<String, Remote256>, SshError> {
    let mut map: BTreeMap<String, Remote256> = BTreeMap::new();
    if names.is_empty() {
        return Ok(map);
    }
    let dir = remote.repo.dir.display().to_string();
    let input: Vec<u8> = names
        .iter()
        .flat_map(|n| format!("{n}\n").into_bytes())
        .collect();
    let out = remote.run("computing digests", DIGESTS, &[&dir], &input, &[])?;
    for line in String::from_utf8_lossy(&out).lines() {
        if let Some(rest) = line.strip_prefix("S ") {
            if let Some((size, name)) = rest.split_once(' ')
                && let Ok(bytes) = size.parse()
            {
                map.insert(
                    name.to_string(),
                    Remote256 {
                        bytes,
                        sha256: None,
                    },
                );
            }
        } else if let Some((sha, name)) = line.split_once("  ")
            && let Some(r) = map.get_mut(name)
        {
            r.sha256 = Some(sha.to_string());
        }
    }
    Ok(map)
}

/// Checks every file of a snapshot's list against the remote's digests; the problems
/// found, each naming the remote file.
pub fn check_snapshot(
    list: &ObjectList,
    stamp: &str,
    digests: &BTreeMap<String, Remote256>,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (path, l) in list.paths(stamp) {
        match digests.get(&path) {
            None => problems.push(format!("{path} is missing")),
            Some(r) if r.bytes != l.bytes => problems.push(format!(
                "{path} has {} bytes, {} were sent",
                r.bytes, l.bytes
            )),
            Some(r) if r.sha256.as_deref() == Some(l.sha256.as_str()) => {}
            Some(_) => problems.push(format!("{path} does not match its digest")),
        }
    }
    problems
}

/// Writes one small file on the remote atomically (a temp name, then rename), making
/// the repository first when there is none.
const PUT: &str = r#"mkdir -p -- "$1" && cd -- "$1" || exit 3
[ -f runbook-offsite.json ] || printf '%s\n' "$3" > runbook-offsite.json || exit 3
mkdir -p -- "$(dirname -- "$2")" && cat > "$2.tmp" && mv -f -- "$2.tmp" "$2""#;

pub fn put(remote: &Remote, name: &str, data: &[u8]) -> Result<(), SshError> {
    let dir = remote.repo.dir.display().to_string();
    let format = serde_json::json!({"format": FORMAT, "version": VERSION}).to_string();
    remote.run(
        &format!("writing {name}"),
        PUT,
        &[&dir, name, &format],
        data,
        &[],
    )?;
    Ok(())
}

const CAT: &str = r#"cd -- "$1" && cat -- "$2""#;

pub fn get(remote: &Remote, name: &str) -> Result<Vec<u8>, SshError> {
    let dir = remote.repo.dir.display().to_string();
    remote.run(&format!("reading {name}"), CAT, &[&dir, name], b"", &[])
}

/// Removes snapshots (renamed to a tombstone first, so a half-removed one is never
/// listed), tombstones and objects, named on stdin as `S <stamp>`, `T <tombstone>`,
/// `O <object path>`.
const REMOVE: &str = r#"cd -- "$1" || exit 3
while IFS=' ' read -r kind name; do
  case "$kind" in
    S) [ -d "snapshots/$name" ] && mv -- "snapshots/$name" "snapshots/.$name.deleting"
       rm -rf -- "snapshots/.$name.deleting" ;;
    T) rm -rf -- "snapshots/$name" ;;
    O) rm -f -- "$name" ;;
  esac
done"#;

pub fn remove(remote: &Remote, lines: &[String]) -> Result<(), SshError> {
    let dir = remote.repo.dir.display().to_string();
    let input: Vec<u8> = lines
        .iter()
        .flat_map(|n| format!("{n}\n").into_bytes())
        .collect();
    remote.run("removing snapshots", REMOVE, &[&dir], &input, &[])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_inventory_is_read_from_the_listing() {
        let out = b"PRESENT\nF 40 runbook-offsite.json\nF 7 snapshots/20260101T000000Z/objects\nC 3 x/y\nabcC 2 snapshots/a/verified\n{}";
        let inv = Inventory::parse(out);
        assert!(inv.exists);
        assert_eq!(inv.files.len(), 2);
        assert_eq!(inv.texts["x/y"], "abc");
        assert_eq!(inv.texts["snapshots/a/verified"], "{}");
        assert_eq!(inv.stamps(), ["20260101T000000Z"]);
        assert!(!Inventory::parse(b"ABSENT\n").exists);
    }

    #[test]
    fn an_object_list_round_trips_and_a_damaged_one_is_refused() {
        let d = "a".repeat(64);
        let mut list = ObjectList::default();
        list.objects.insert(
            "b".repeat(64),
            Listed {
                sha256: d.clone(),
                bytes: 9,
            },
        );
        list.manifest = Some(Listed {
            sha256: d,
            bytes: 3,
        });
        let text = list.render();
        assert_eq!(ObjectList::parse(&text), Some(list));
        assert_eq!(ObjectList::parse(&text.replace(" 9", " x")), None);
        assert_eq!(ObjectList::parse(""), None);
    }
}
