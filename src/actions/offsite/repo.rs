//! The repository on the remote, as the engine reaches it: one listing per operation
//! (which also takes the lock), a streamed upload committed on the remote, a streamed
//! download, and deletions. Every remote command is a fixed `sh` script of ours (see
//! `ssh.rs`); the layout is in `format.rs`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::Deserialize;

use super::format::{self, Config, Lock, LockKind};
use super::key::RepoKey;
use super::ssh::{Remote, SshError};

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
    /// The fingerprint of the repository key (32 hex digits; `offsite-push` and
    /// `offsite-list` print it as `key`). A host that does not keep the key itself
    /// (a new host recovering) trusts the repository only through it; a pushing host
    /// checks that the repository is still the one it made.
    #[serde(default)]
    pub key: Option<String>,
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
        if let Some(k) = self.pinned()
            && !format::valid_fingerprint(k)
        {
            return Err(format!(
                "`repo.key` `{k}` is not a key fingerprint (32 hex digits, as offsite-push prints it)"
            ));
        }
        Ok(())
    }

    /// The pinned fingerprint; an empty value is none (a vars file's placeholder).
    pub fn pinned(&self) -> Option<&str> {
        self.key.as_deref().map(str::trim).filter(|k| !k.is_empty())
    }

    /// This repository's local directory under the state dir: its key and caches.
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

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(transparent)]
    Ssh(#[from] SshError),
    #[error("the off-site repository {target}/{dir} {why}")]
    Format {
        target: String,
        dir: String,
        why: String,
    },
}

/// What one listing says of the repository.
#[derive(Debug, Default)]
pub struct Listing {
    /// The repository directory exists.
    pub exists: bool,
    /// Its config, when it has one of this format (a repository without one was never
    /// made, or its making failed: it holds nothing to keep).
    pub config: Option<Config>,
    /// It is a repository of version 1.
    pub v1: bool,
    pub generation: Option<String>,
    /// The small text files read (snapshots, locks, checks, index when asked).
    pub texts: BTreeMap<String, Vec<u8>>,
    /// Object paths with their sizes: all of them when asked, else those asked about.
    pub objects: BTreeMap<String, u64>,
    /// Names of the files under keys/.
    pub keys: Vec<String>,
    /// Bytes free there, as `df` says.
    pub room: Option<u64>,
}

/// What a listing reads besides config, generation, snapshots and locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// Only whether the object names on stdin exist (a push).
    Asked,
    /// Every object with its size, the index and check files.
    Full,
}

/// Takes the lock (when `$2` names one: written first, then every lock is read back,
/// so of two racing holders at least one sees the other), removes uploads whose lock is
/// gone (`tmp/<lock>` and its batches `tmp/<lock>.<n>`), then prints the small files as `C <bytes> <name>` + bytes, the objects as
/// `F <bytes> <path>` (all, or those named on stdin).
const OPEN: &str = r#"LC_ALL=C; export LC_ALL
# A command that takes a lock makes the directory, so that even the first push holds
# one (a listing elsewhere must not take its uploads for abandoned ones).
[ -n "$2" ] && [ ! -e "$1" ] && mkdir -p -- "$1"
cd -- "$1" 2>/dev/null || { echo ABSENT; exit 0; }
echo PRESENT
# A version 1 repository is refused before anything is written to it.
if [ -n "$2" ] && { [ -f config ] || [ ! -f runbook-offsite.json ]; }; then
  mkdir -p locks && printf '%s\n' "$3" > "locks/.$2.tmp" && mv -f -- "locks/.$2.tmp" "locks/$2" || exit 3
fi
for d in tmp/*; do
  l=${d#tmp/}; l=${l%%.*}
  [ -d "$d" ] && [ ! -e "locks/$l" ] && rm -rf -- "$d"
done
more=
[ "$4" = full ] && more='index/* checks/*'
for f in config runbook-offsite.json generation snapshots/* locks/* $more; do
  [ -f "$f" ] || continue
  c=$(cat -- "$f") || continue
  printf 'C %s %s\n%s' "${#c}" "$f" "$c"
done
for f in keys/*; do [ -f "$f" ] && printf 'K %s\n' "$f"; done
df -Pk . 2>/dev/null | awk 'NR==2 { print "R " $4 * 1024 }'
if [ "$4" = full ]; then
  [ -d objects ] && find objects -type f -name '????????????????????????????????????????????????????????????????' -printf 'F %s %p\n'
else
  xargs -d '\n' -r stat -c 'F %s %n' -- 2>/dev/null
fi
exit 0"#;

/// A lock to take while listing.
pub struct Take<'a> {
    pub name: &'a str,
    pub lock: &'a Lock,
}

impl Listing {
    pub fn read(
        remote: &Remote,
        depth: Depth,
        take: Option<Take>,
        asked: &[String],
    ) -> Result<Listing, RepoError> {
        let dir = remote.repo.dir.display().to_string();
        let (name, json) = match &take {
            Some(t) => (
                t.name.to_string(),
                serde_json::to_string(t.lock).expect("serializable"),
            ),
            None => (String::new(), String::new()),
        };
        let input: Vec<u8> = asked
            .iter()
            .flat_map(|n| format!("{n}\n").into_bytes())
            .collect();
        let which = if depth == Depth::Full {
            "full"
        } else {
            "asked"
        };
        let out = remote.run(
            "listing the repository",
            OPEN,
            &[&dir, &name, &json, which],
            &input,
            &[],
        )?;
        let listing = Listing::parse(&out);
        if listing.exists && listing.config.is_none() && listing.v1 {
            return Err(RepoError::Format {
                target: remote.target(),
                dir,
                why: "is of format version 1, whose snapshots are not authenticated: this engine reads and writes version 2 only and has no migration yet. Recover from it with the runbook release that wrote it, and push to a new `dir` with this one (README, \"Off-site repository format\")".into(),
            });
        }
        if let Some(text) = listing.texts.get("config")
            && listing.config.is_none()
            && !text.is_empty()
        {
            return Err(RepoError::Format {
                target: remote.target(),
                dir,
                why: "has a config that is not of format runbook-offsite version 2".into(),
            });
        }
        Ok(listing)
    }

    fn parse(out: &[u8]) -> Listing {
        let mut l = Listing::default();
        let mut rest = out;
        let line = |rest: &mut &[u8]| -> Option<String> {
            let end = rest.iter().position(|b| *b == b'\n')?;
            let s = String::from_utf8_lossy(&rest[..end]).into_owned();
            *rest = &rest[end + 1..];
            Some(s)
        };
        match line(&mut rest).as_deref() {
            Some("PRESENT") => l.exists = true,
            _ => return l,
        }
        while let Some(s) = line(&mut rest) {
            if let Some(c) = s.strip_prefix("C ") {
                let Some((len, name)) = c.split_once(' ') else {
                    break;
                };
                let Ok(len) = len.parse::<usize>() else {
                    break;
                };
                let take = len.min(rest.len());
                l.texts.insert(name.to_string(), rest[..take].to_vec());
                rest = &rest[take..];
            } else if let Some(f) = s.strip_prefix("F ") {
                if let Some((size, name)) = f.split_once(' ')
                    && let Ok(size) = size.parse()
                {
                    l.objects.insert(name.to_string(), size);
                }
            } else if let Some(k) = s.strip_prefix("K ") {
                l.keys.push(k.to_string());
            } else if let Some(r) = s.strip_prefix("R ") {
                l.room = r.trim().parse().ok();
            }
        }
        l.v1 = l.texts.contains_key("runbook-offsite.json");
        l.config = l
            .texts
            .get("config")
            .and_then(|t| serde_json::from_slice::<Config>(t).ok())
            .filter(|c| c.format == format::FORMAT && c.version == format::VERSION);
        l.generation = l
            .texts
            .get("generation")
            .map(|g| String::from_utf8_lossy(g).trim().to_string());
        l
    }

    /// The stamps of the snapshot files, oldest first.
    pub fn stamps(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .texts
            .keys()
            .filter_map(|f| f.strip_prefix("snapshots/"))
            .filter(|s| format::valid_stamp(s))
            .map(str::to_string)
            .collect();
        v.sort();
        v
    }

    pub fn locks(&self) -> Vec<(String, Option<Lock>)> {
        self.texts
            .iter()
            .filter_map(|(f, t)| {
                let name = f.strip_prefix("locks/")?;
                Some((name.to_string(), serde_json::from_slice(t).ok()))
            })
            .collect()
    }

    pub fn index_files(&self) -> Vec<(&str, &[u8])> {
        self.texts
            .iter()
            .filter(|(f, _)| f.starts_with("index/"))
            .map(|(f, t)| (f.as_str(), t.as_slice()))
            .collect()
    }
}

/// The lock a command of this process holds, and whether another holder is in the way.
pub struct Holder {
    pub name: String,
    pub lock: Lock,
}

/// This process's start time in clock ticks since boot (field 22 of /proc/PID/stat).
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields count from the last ')'.
    let after = &stat[stat.rfind(')')? + 2..];
    after.split(' ').nth(19)?.parse().ok()
}

pub fn this_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

impl Holder {
    pub fn new(kind: LockKind, command: String) -> Result<Holder, String> {
        let pid = std::process::id();
        let rand = super::crypto::random_key().map_err(|e| e.to_string())?;
        let host = this_host();
        let name = format!(
            "{}-{}-{pid}-{}",
            match kind {
                LockKind::Shared => "shared",
                LockKind::Exclusive => "exclusive",
            },
            host.chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect::<String>(),
            &super::crypto::hex(&rand)[..8]
        );
        Ok(Holder {
            name,
            lock: Lock {
                kind,
                host,
                pid,
                start: start_ticks(pid).unwrap_or(0),
                time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                command,
            },
        })
    }

    /// Of the locks listed (ours among them): those left by a process of this host
    /// that is gone (removable), and a live one that conflicts with ours (the first).
    pub fn judge(&self, listing: &Listing) -> (Vec<String>, Option<(String, Option<Lock>)>) {
        let mut dead = Vec::new();
        let mut conflict = None;
        for (name, lock) in listing.locks() {
            if name == self.name {
                continue;
            }
            if let Some(l) = &lock
                && l.host == self.lock.host
                && start_ticks(l.pid) != Some(l.start)
            {
                dead.push(name);
                continue;
            }
            let theirs = lock.as_ref().map(|l| l.kind);
            let clash = self.lock.kind == LockKind::Exclusive || theirs != Some(LockKind::Shared);
            if clash && conflict.is_none() {
                conflict = Some((name, lock));
            }
        }
        (dead, conflict)
    }
}

/// The words for a lock in the way, with how to clear it when its holder is gone.
pub fn locked_message(remote: &Remote, name: &str, lock: &Option<Lock>) -> String {
    let who = match lock {
        Some(l) => format!(
            "{} ({:?} lock) on host {}, pid {}, since {}",
            l.command, l.kind, l.host, l.pid, l.time
        )
        .replace("Shared", "shared")
        .replace("Exclusive", "exclusive"),
        None => "an unreadable lock".into(),
    };
    format!(
        "the off-site repository {}/{} is in use by {who}. If that process is gone (a lock of this host's dead processes is removed by itself), remove the lock: ssh -i {} -p {} {}@{} rm -- {}/locks/{name}",
        remote.target(),
        remote.repo.dir.display(),
        remote.repo.ssh_key.display(),
        remote.repo.port,
        remote.repo.user,
        remote.repo.host,
        remote.repo.dir.display()
    )
}

/// Removes lock files (ours when done, or dead ones of this host).
pub fn unlock(remote: &Remote, names: &[String]) -> Result<(), SshError> {
    if names.is_empty() {
        return Ok(());
    }
    let lines: Vec<String> = names.iter().map(|n| format!("L {n}")).collect();
    remove(remote, &lines, None)
}

/// Receives an upload as a tar stream into `tmp/<name>`, checks it against its
/// `SHA256SUMS`, links objects, keys and index files into place without replacing
/// (an existing name is kept: it holds the same plaintext), checks that every object
/// named in `REFS` (all the snapshot needs, by the first 16 hex digits of each id: 17
/// bytes an object on the link, where the check is only a guard) is there now, whatever a cache or a
/// retention elsewhere said, makes the config when there is none, syncs, links the
/// snapshot file (the commit: never replacing), then
/// removes the upload and the lock. Prints `X <sha256> <path>` for each object that
/// was already there (its digest, for the index), and `EXISTS` when a snapshot file
/// of that stamp was already there.
const COMMIT: &str = r#"LC_ALL=C; export LC_ALL
mkdir -p -- "$1" && cd -- "$1" || exit 3
t="tmp/$2"
rm -rf -- "$t" && mkdir -p -- "$t" || exit 3
fail() { rm -rf -- "$t"; exit "$1"; }
tar -x -f - -C "$t" >&2 || fail 4
( cd -- "$t" && sha256sum --quiet --strict -c SHA256SUMS ) >&2 || fail 5
for src in "$t/keys" "$t/index" "$t"/objects/*; do
  [ -d "$src" ] || continue
  d=${src#"$t"/}
  mkdir -p -- "$d" || fail 3
  ln -- "$src"/* "$d"/ 2>/dev/null
done
( cd -- "$t" && find objects -type f -links 1 2>/dev/null ) | while IFS= read -r p; do
  [ -f "$p" ] && sha256sum -- "$p" | sed 's/^/X /'
done
# In a function: its `set --` leaves the script's own arguments alone. No process per
# object: an unchanged push of thousands of files checks them all.
refs() {
  miss=
  while IFS= read -r id; do
    set -- "objects/${id%"${id#??}"}/$id"*
    [ -f "$1" ] || { echo "objects/${id%"${id#??}"}/$id... is not there after the upload (removed meanwhile, or no room to link it)" >&2; miss=1; }
  done < "$t/REFS"
  [ -z "$miss" ]
}
if [ -f "$t/REFS" ]; then
  refs || fail 6
fi
if [ -f "$t/config" ] && [ ! -f config ]; then
  [ -f generation ] || cp -- "$t/generation" generation || fail 3
  sync -f . 2>/dev/null
  ln -- "$t/config" config 2>/dev/null || [ -f config ] || fail 3
fi
if [ -n "$3" ]; then
  sync -f . 2>/dev/null
  mkdir -p snapshots && { ln -- "$t/snapshots/$3" "snapshots/$3" 2>/dev/null || echo EXISTS; }
  sync -f . 2>/dev/null
fi
rm -rf -- "$t"
rm -f -- "locks/$2"
echo DONE"#;

/// What the remote said of a commit.
#[derive(Debug, Default)]
pub struct Committed {
    /// Objects that were there already, with their ciphertext's digest there.
    pub existing: BTreeMap<String, String>,
    /// A snapshot file of that stamp was there already.
    pub snapshot_existed: bool,
}

pub fn commit(
    remote: &Remote,
    upload: &str,
    stamp: &str,
    feed: &mut dyn FnMut(&mut dyn std::io::Write) -> std::io::Result<()>,
) -> Result<Committed, SshError> {
    let dir = remote.repo.dir.display().to_string();
    let out = remote.run_feeding("receiving the upload", COMMIT, &[&dir, upload, stamp], feed)?;
    let text = String::from_utf8_lossy(&out);
    let mut c = Committed::default();
    let mut done = false;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("X ")
            && let Some((sha, path)) = rest.split_once("  ")
        {
            c.existing.insert(path.to_string(), sha.to_string());
        } else if line == "EXISTS" {
            c.snapshot_existed = true;
        } else if line == "DONE" {
            done = true;
        }
    }
    if !done {
        return Err(SshError::Remote {
            target: remote.target(),
            what: "committing the upload".into(),
            code: 0,
            detail: "it did not finish".into(),
        });
    }
    Ok(c)
}

/// Writes the named files as a tar stream to stdout, in the order asked.
const SEND: &str = r#"cd -- "$1" && exec tar -c -f - --no-recursion -T -"#;

/// Streams the files `names` from the repository, in that order, to `consume`.
pub fn fetch<T>(
    remote: &Remote,
    names: &[String],
    consume: &mut dyn FnMut(&mut dyn std::io::Read) -> Result<T, String>,
) -> Result<T, String> {
    let dir = remote.repo.dir.display().to_string();
    let input: Vec<u8> = names
        .iter()
        .flat_map(|n| format!("{n}\n").into_bytes())
        .collect();
    remote.run_reading("sending objects", SEND, &[&dir], &input, consume)
}

/// Reads small files whole (a key file, manifests): name -> bytes.
pub fn get_files(remote: &Remote, names: &[String]) -> Result<BTreeMap<String, Vec<u8>>, String> {
    if names.is_empty() {
        return Ok(BTreeMap::new());
    }
    fetch(remote, names, &mut |r| {
        let mut out = BTreeMap::new();
        let mut archive = tar::Archive::new(r);
        for entry in archive.entries().map_err(|e| e.to_string())? {
            let mut entry = entry.map_err(|e| e.to_string())?;
            let name = entry
                .path()
                .map_err(|e| e.to_string())?
                .to_string_lossy()
                .into_owned();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut data).map_err(|e| e.to_string())?;
            out.insert(name, data);
        }
        Ok(out)
    })
}

/// Removes what stdin names: `S <stamp>` snapshot files, `O <object path>`, `I <index
/// file>`, `C <check file>`, `L <lock>`; with `$2`, first writes a new generation (so
/// that no pushing host's cache of what is there outlives a deletion).
const REMOVE: &str = r#"cd -- "$1" || exit 3
if [ -n "$2" ]; then
  printf '%s\n' "$2" > .generation.tmp && sync -f .generation.tmp 2>/dev/null; mv -f .generation.tmp generation || exit 3
fi
while IFS=' ' read -r kind name; do
  case "$kind" in
    S) rm -f -- "snapshots/$name" "checks/$name" ;;
    O) rm -f -- "$name" ;;
    I) rm -f -- "index/$name" ;;
    L) rm -f -- "locks/$name" ;;
  esac
done
sync -f . 2>/dev/null
exit 0"#;

pub fn remove(remote: &Remote, lines: &[String], generation: Option<&str>) -> Result<(), SshError> {
    let dir = remote.repo.dir.display().to_string();
    let input: Vec<u8> = lines
        .iter()
        .flat_map(|n| format!("{n}\n").into_bytes())
        .collect();
    remote.run(
        "removing from the repository",
        REMOVE,
        &[&dir, generation.unwrap_or("")],
        &input,
        &[],
    )?;
    Ok(())
}

/// Writes one small file (a check record): temp name, then rename (it may replace).
const PUT: &str = r#"cd -- "$1" || exit 3
mkdir -p -- "$(dirname -- "$2")" && cat > "$2.tmp" && mv -f -- "$2.tmp" "$2""#;

pub fn put(remote: &Remote, name: &str, data: &[u8]) -> Result<(), SshError> {
    let dir = remote.repo.dir.display().to_string();
    remote.run(&format!("writing {name}"), PUT, &[&dir, name], data, &[])?;
    Ok(())
}

/// `sha256sum` of the names on stdin; a missing file has no line.
const DIGESTS: &str = r#"cd -- "$1" || exit 3
xargs -d '\n' -r sha256sum -- 2>/dev/null
exit 0"#;

/// The remote's sha256 of each of `names` that is there. Only digests cross the link.
pub fn remote_digests(
    remote: &Remote,
    names: &[String],
) -> Result<BTreeMap<String, String>, SshError> {
    let mut map = BTreeMap::new();
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
        if let Some((sha, name)) = line.split_once("  ") {
            map.insert(name.to_string(), sha.to_string());
        }
    }
    Ok(map)
}

/// The key to authenticate the repository with, and where it came from. A pushing
/// host uses its own; a host with an identity takes the repository's key file only
/// when it has the pinned fingerprint.
pub fn key_for(
    remote: &Remote,
    listing: &Listing,
    local: Option<RepoKey>,
    ids: Option<super::crypto::IdentityFile>,
) -> Result<RepoKey, String> {
    let target = format!("{}/{}", remote.target(), remote.repo.dir.display());
    let pinned = remote.repo.pinned();
    let there = listing.config.as_ref().map(|c| c.key.clone());
    if let Some(k) = local {
        let fp = k.fingerprint();
        if let Some(p) = pinned
            && p != fp
        {
            return Err(format!(
                "this host's key for {target} has fingerprint {fp}, but `repo.key` pins {p}: one of them is not this repository's"
            ));
        }
        if let Some(t) = there
            && t != fp
        {
            return Err(format!(
                "the repository {target} says its key is {t}, but this host made it with key {fp}: it was replaced (or this is another repository); nothing there is trusted"
            ));
        }
        return Ok(k);
    }
    let Some((ids, ids_path)) = ids else {
        return Err(format!(
            "this host holds no key for {target}, so nothing there can be authenticated: push and prune on the host that made the repository (its state dir keeps the key); to list, check or fetch from another host, give the age identity and the key's fingerprint (`repo.key`)"
        ));
    };
    let Some(p) = pinned else {
        return Err(format!(
            "give the repository key's fingerprint as `repo.key` (offsite-push printed it as `key`; `offsite-list` on the pushing host shows it): without it, a repository someone replaced using only the age public key could not be told from yours{}",
            there
                .map(|t| format!(
                    " ({target} says its key is {t}: trust it only if that is what you recorded)"
                ))
                .unwrap_or_default()
        ));
    };
    let name = format::key_path(p);
    if !listing.keys.contains(&name) {
        return Err(format!(
            "{target} holds no key {p} (`repo.key`): it is not the repository with that key, or the key file was removed{}",
            there
                .map(|t| format!(" ({target} says its key is {t})"))
                .unwrap_or_default()
        ));
    }
    let files = get_files(remote, std::slice::from_ref(&name))
        .map_err(|e| format!("reading {name} on {target}: {e}"))?;
    let sealed = files.get(&name).ok_or_else(|| {
        format!("{target} holds no key {p} (`repo.key`): it is not the repository with that key, or the key file was removed")
    })?;
    let k = RepoKey::unwrap(ids, sealed).ok_or_else(|| {
        format!(
            "the identity `{}` cannot decrypt the repository key {name} on {target} (argument `identity`): it holds none of the keys the repository was made for",
            ids_path.display()
        )
    })?;
    if k.fingerprint() != p {
        return Err(format!(
            "the key file {name} on {target} holds a key whose fingerprint is {}, not {p}: it was forged; nothing there is trusted",
            k.fingerprint()
        ));
    }
    Ok(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_is_read() {
        let out = b"PRESENT\nC 3 snapshots/a\nabcC 2 locks/x\n{}F 9 objects/ab/abc\nK keys/k.age\n";
        let l = Listing::parse(out);
        assert!(l.exists);
        assert_eq!(l.texts["snapshots/a"], b"abc");
        assert_eq!(l.stamps(), ["a"]);
        assert_eq!(l.objects["objects/ab/abc"], 9);
        assert_eq!(l.keys, ["keys/k.age"]);
        assert!(!Listing::parse(b"ABSENT\n").exists);
    }

    #[test]
    fn this_process_has_a_start_time() {
        assert!(start_ticks(std::process::id()).is_some());
        assert!(start_ticks(u32::MAX).is_none());
    }
}
