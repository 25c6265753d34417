//! `offsite-fetch`: trust first, then one pass. The repository key is this host's own
//! or the one whose fingerprint is pinned; the snapshot file must carry that key's
//! HMAC and name the stamp asked for; the manifest object must decrypt to bytes whose
//! HMAC is its name and pass [`Manifest::check`]. Only then are the objects streamed
//! (one connection, one listing before it), each decrypted and its HMAC computed as it
//! is written, beneath a new staging directory through directory handles
//! (`openat`/`mkdirat`/`symlinkat` with `O_NOFOLLOW|O_EXCL`): no path is resolved by
//! text, so no entry can be written through a link. A file whose bytes are not the
//! manifest's refuses the snapshot and the staging tree is removed; only a whole,
//! checked tree is renamed to `dest`. A `dest` that already holds exactly the
//! snapshot is the step done.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde_json::json;

use super::crypto::{self, CryptoError, Identities, IdentityFile};
use super::format::{self, Cipher, Entry, Index, Kind, Manifest, Signed, Snapshot, object_path};
use super::key::{self, RepoKey};
use super::repo::{self, Depth, Listing};
use super::ssh::Remote;
use super::{FetchArgs, human, resume_hint};
use crate::actions::{ActionCtx, Outputs, guard};

pub enum Planned {
    /// `dest` already holds the snapshot.
    Done(String),
    Fails(String),
}

fn link_error(remote: &Remote, e: super::ssh::SshError) -> String {
    if e.is_link() {
        format!("{e}; {}", resume_hint(remote))
    } else {
        e.to_string()
    }
}

/// The repository as one full listing shows it, and the key it is trusted with.
pub struct Opened {
    pub listing: Listing,
    pub key: RepoKey,
    /// Ciphertext digests the authenticated index files record, by object name.
    pub ciphers: BTreeMap<String, Vec<Cipher>>,
    /// Index files that did not authenticate.
    pub bad_index: Vec<String>,
}

pub fn open(
    remote: &Remote,
    state_dir: &Path,
    ids: Option<IdentityFile>,
) -> Result<Opened, String> {
    open_with(remote, state_dir, ids, None)
}

/// [`open`], taking `holder`'s lock in the same listing (given back on any failure).
pub fn open_with(
    remote: &Remote,
    state_dir: &Path,
    ids: Option<IdentityFile>,
    holder: Option<&repo::Holder>,
) -> Result<Opened, String> {
    let take = holder.map(|h| repo::Take {
        name: &h.name,
        lock: &h.lock,
    });
    let listing = Listing::read(remote, Depth::Full, take, &[]).map_err(|e| match e {
        repo::RepoError::Ssh(e) => link_error(remote, e),
        other => other.to_string(),
    })?;
    let opened = opened(remote, state_dir, ids, listing, holder);
    if opened.is_err()
        && let Some(h) = holder
    {
        let _ = repo::unlock(remote, std::slice::from_ref(&h.name));
    }
    opened
}

fn opened(
    remote: &Remote,
    state_dir: &Path,
    ids: Option<IdentityFile>,
    listing: Listing,
    holder: Option<&repo::Holder>,
) -> Result<Opened, String> {
    if let Some(h) = holder {
        let (dead, conflict) = h.judge(&listing);
        if let Some((name, lock)) = conflict {
            return Err(repo::locked_message(remote, &name, &lock));
        }
        repo::unlock(remote, &dead).map_err(|e| link_error(remote, e))?;
    }
    if listing.config.is_none() {
        return Err(format!(
            "there is no off-site repository on {} in `{}` (no config: nothing was ever pushed there, or the first push did not finish)",
            remote.target(),
            remote.repo.dir.display()
        ));
    }
    let local = RepoKey::load(&key::local_key_path(&remote.repo.local_dir(state_dir)))?;
    let key = repo::key_for(remote, &listing, local, ids)?;
    let mut ciphers: BTreeMap<String, Vec<Cipher>> = BTreeMap::new();
    let mut bad_index = Vec::new();
    for (name, text) in listing.index_files() {
        match Index::open(text, &key) {
            Ok(index) => {
                for (id, c) in index.objects {
                    ciphers.entry(id).or_default().push(c);
                }
            }
            Err(_) => bad_index.push(name.to_string()),
        }
    }
    Ok(Opened {
        listing,
        key,
        ciphers,
        bad_index,
    })
}

/// One snapshot as the repository holds it.
pub struct Assessed {
    pub snapshot: Snapshot,
    pub manifest: Manifest,
    /// Objects of its files (and its manifest) missing there or of another size than
    /// was sent.
    pub missing: Vec<String>,
}

impl Assessed {
    pub fn complete(&self) -> bool {
        self.missing.is_empty()
    }
}

/// Authenticates the snapshots `stamps` and reads their manifests (one transfer for
/// all of them) with `readers` (the operator's identity when one was given, so that
/// what is tested is what a new host would have); a snapshot that fails says why.
pub fn assess(
    remote: &Remote,
    o: &Opened,
    stamps: &[String],
    readers: &Identities,
) -> Result<BTreeMap<String, Result<Assessed, String>>, String> {
    let mut out: BTreeMap<String, Result<Assessed, String>> = BTreeMap::new();
    let mut snaps: BTreeMap<String, Snapshot> = BTreeMap::new();
    for stamp in stamps {
        let path = format::snapshot_path(stamp);
        let r = match o.listing.texts.get(&path) {
            None => Err(format!("{path} is not there")),
            Some(text) => match Snapshot::open(text, &o.key) {
                Err(why) => Err(format!("{path}: {why}")),
                Ok(s) if s.stamp != *stamp => Err(format!(
                    "{path} is snapshot {} copied under another stamp (replayed)",
                    s.stamp
                )),
                Ok(s) if s.version != format::VERSION => {
                    Err(format!("{path} is of version {}", s.version))
                }
                Ok(s) => Ok(s),
            },
        };
        match r {
            Ok(s) => {
                snaps.insert(stamp.clone(), s);
            }
            Err(e) => {
                out.insert(stamp.clone(), Err(e));
            }
        }
    }
    let mut wanted: Vec<String> = snaps
        .values()
        .map(|s| object_path(&s.manifest))
        .filter(|p| o.listing.objects.contains_key(p))
        .collect();
    wanted.sort();
    wanted.dedup();
    let files = repo::get_files(remote, &wanted)
        .map_err(|e| format!("reading manifests from {}: {e}", remote.target()))?;
    for (stamp, s) in snaps {
        let mpath = object_path(&s.manifest);
        let r = (|| {
            let sealed = files
                .get(&mpath)
                .ok_or_else(|| format!("its manifest {mpath} is missing"))?;
            let plain = crypto::decrypt_bytes(readers, sealed, "").map_err(|e| match e {
                CryptoError::NotARecipient { .. } => format!(
                    "cannot decrypt the manifest of snapshot {stamp} (argument `identity`): the identity is none of the recipients of {mpath}"
                ),
                _ => format!("its manifest {mpath} does not decrypt (damaged)"),
            })?;
            if crypto::hex(&key::hmac(&o.key.id_key(), &plain)) != s.manifest {
                return Err(format!(
                    "its manifest {mpath} holds other bytes than its name says (swapped or forged)"
                ));
            }
            let manifest: Manifest = serde_json::from_slice(&plain)
                .map_err(|e| format!("its manifest {mpath} does not parse: {e}"))?;
            manifest
                .check()
                .map_err(|why| format!("its manifest {mpath} is refused: {why}"))?;
            // Each object named with the file it holds, which is what an operator
            // knows the snapshot by.
            let mut holds: BTreeMap<&str, &str> = BTreeMap::new();
            for e in &manifest.entries {
                if let Some(id) = &e.object {
                    holds.entry(id.as_str()).or_insert(e.path.as_str());
                }
            }
            let mut missing = Vec::new();
            for (id, path) in &holds {
                let p = object_path(id);
                match o.listing.objects.get(&p) {
                    None => missing.push(format!("{p} (`{path}`) is missing")),
                    Some(n) => {
                        if let Some(known) = o.ciphers.get(*id)
                            && !known.iter().any(|c| c.bytes == *n)
                        {
                            missing.push(format!(
                                "{p} (`{path}`) has {n} bytes, other than were sent"
                            ));
                        }
                    }
                }
            }
            Ok(Assessed {
                snapshot: s,
                manifest,
                missing,
            })
        })();
        out.insert(stamp, r);
    }
    Ok(out)
}

/// The record of the last `offsite-check` of `stamp`, when it authenticates and is
/// that snapshot's (not another's copied under its name).
pub fn last_check(o: &Opened, stamp: &str) -> Option<format::Check> {
    o.listing
        .texts
        .get(&format::check_path(stamp))
        .and_then(|t| format::Check::open(t, &o.key).ok())
        .filter(|c| c.stamp == stamp)
}

/// The snapshot to fetch: the stamp asked for, or `latest`, the newest that is
/// authenticated and complete and that the last `offsite-check` (if any) found whole.
fn choose(
    args: &FetchArgs,
    remote: &Remote,
    o: &Opened,
    ids: &Identities,
) -> Result<(String, Assessed), String> {
    let stamps = o.listing.stamps();
    let refuse = |stamp: &str, why: &str| format!("refusing snapshot {stamp}: {why}");
    if args.stamp == "latest" {
        let mut newest_first = stamps.clone();
        newest_first.reverse();
        let mut assessed = assess(remote, o, &newest_first, ids)?;
        let mut skipped = Vec::new();
        for stamp in &newest_first {
            // What the last `offsite-check` found damaged there stays suspect until a
            // later check finds it whole: `offsite-list` shows the same.
            let check_found = last_check(o, stamp).map(|c| c.problems).unwrap_or_default();
            match assessed.remove(stamp) {
                Some(Ok(_)) if !check_found.is_empty() => skipped.push(format!(
                    "{stamp}: the last offsite-check found {}",
                    check_found.join(", ")
                )),
                Some(Ok(a)) if a.complete() => return Ok((stamp.clone(), a)),
                Some(Ok(a)) => skipped.push(format!("{stamp}: {}", a.missing.join(", "))),
                Some(Err(e)) => skipped.push(format!("{stamp}: {e}")),
                None => {}
            }
        }
        return Err(format!(
            "no authenticated, complete snapshot on {} in `{}` (argument `stamp`: latest){}",
            remote.target(),
            args.repo.dir.display(),
            if skipped.is_empty() {
                String::new()
            } else {
                format!("; passed over: {}", skipped.join("; "))
            }
        ));
    }
    if !format::valid_stamp(&args.stamp) {
        return Err(format!(
            "`stamp`: `{}` is not a snapshot name (letters, digits, `-`, `_`, `.`)",
            args.stamp
        ));
    }
    if !stamps.contains(&args.stamp) {
        return Err(format!(
            "no snapshot {} on {} (argument `stamp`); there: {}",
            args.stamp,
            remote.target(),
            if stamps.is_empty() {
                "none".to_string()
            } else {
                stamps.join(" ")
            }
        ));
    }
    match assess(remote, o, std::slice::from_ref(&args.stamp), ids)?.remove(&args.stamp) {
        Some(Ok(a)) if a.complete() => Ok((args.stamp.clone(), a)),
        Some(Ok(a)) => Err(refuse(
            &args.stamp,
            &format!("{} on {}", a.missing.join(", "), remote.target()),
        )),
        Some(Err(e)) => Err(refuse(&args.stamp, &e)),
        None => Err(refuse(&args.stamp, "it could not be read")),
    }
}

/// What `dest` is now.
enum Dest {
    Absent,
    Empty,
    /// Holds exactly the snapshot (an earlier attempt finished).
    Same,
    Other,
}

fn dest_state(dest: &Path, manifest: &Manifest, key: &RepoKey) -> Result<Dest, String> {
    let meta = match std::fs::symlink_metadata(dest) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Dest::Absent),
        Err(e) => return Err(format!("cannot read `{}`: {e}", dest.display())),
        Ok(m) => m,
    };
    if !meta.is_dir() {
        return Ok(Dest::Other);
    }
    let empty = std::fs::read_dir(dest)
        .map_err(|e| format!("cannot read `{}`: {e}", dest.display()))?
        .next()
        .is_none();
    if empty {
        return Ok(Dest::Empty);
    }
    Ok(if matches_manifest(dest, manifest, key) {
        Dest::Same
    } else {
        Dest::Other
    })
}

/// Whether the tree at `root` is the snapshot: the same entries, kinds, modes, link
/// targets and file contents (by their HMAC, the object name).
fn matches_manifest(root: &Path, manifest: &Manifest, key: &RepoKey) -> bool {
    let mut expected: BTreeMap<&str, &Entry> = manifest
        .entries
        .iter()
        .map(|e| (e.path.as_str(), e))
        .collect();
    let id_key = key.id_key();
    for item in walkdir::WalkDir::new(root).follow_links(false) {
        let Ok(item) = item else { return false };
        let Some(rel) = item.path().strip_prefix(root).ok().and_then(|p| p.to_str()) else {
            return false;
        };
        let Some(e) = expected.remove(rel) else {
            return false;
        };
        let Ok(m) = item.path().symlink_metadata() else {
            return false;
        };
        let t = m.file_type();
        let same = match e.kind {
            Kind::Dir => t.is_dir() && m.mode() & 0o7777 == e.mode,
            Kind::Symlink => {
                t.is_symlink()
                    && std::fs::read_link(item.path())
                        .ok()
                        .and_then(|p| p.to_str().map(str::to_string))
                        == e.target
            }
            Kind::File => {
                t.is_file()
                    && m.mode() & 0o7777 == e.mode
                    && Some(m.len()) == e.size
                    && hmac_of(item.path(), &id_key).ok() == e.object
            }
        };
        if !same {
            return false;
        }
    }
    expected.is_empty()
}

fn hmac_of(path: &Path, id_key: &[u8; 32]) -> std::io::Result<String> {
    key::hmac_file(path, id_key, &mut vec![0u8; 1 << 20], None)
}

fn staging_of(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "dest".into());
    dest.with_file_name(format!(".{name}.offsite-fetch"))
}

fn load(args: &FetchArgs) -> Result<Identities, String> {
    args.repo.check()?;
    crypto::load_identities(&args.identity).map_err(|e: CryptoError| e.to_string())
}

/// Free bytes where `dest` will be made.
fn room_at(dest: &Path) -> Option<u64> {
    let mut dir = dest.parent()?.to_path_buf();
    while !dir.exists() {
        dir = dir.parent()?.to_path_buf();
    }
    let c = CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a zeroed out-struct of the right type.
    (unsafe { libc::statvfs(c.as_ptr(), &mut s) } == 0)
        .then(|| s.f_bavail as u64 * s.f_frsize as u64)
}

/// The room a snapshot's tree takes: its bytes rounded to 4 KiB blocks, and a block
/// per directory and link.
fn room_needed(manifest: &Manifest) -> u64 {
    manifest
        .entries
        .iter()
        .map(|e| e.size.unwrap_or(0).div_ceil(4096).max(1) * 4096)
        .sum()
}

fn check_room(dest: &Path, manifest: &Manifest) -> Result<(), String> {
    let need = room_needed(manifest);
    match room_at(dest) {
        Some(free) if free < need => Err(format!(
            "`{}` has {} free, the snapshot needs {}: make room, or fetch to another `dest`",
            dest.parent().unwrap_or(dest).display(),
            human(free),
            human(need)
        )),
        _ => Ok(()),
    }
}

pub fn plan(args: &FetchArgs, ctx: &ActionCtx) -> Result<String, Planned> {
    let ids = load(args).map_err(Planned::Fails)?;
    let remote = Remote::new(&args.repo);
    let o = open(&remote, &ctx.state_dir, Some((&ids, &args.identity))).map_err(Planned::Fails)?;
    let (stamp, a) = choose(args, &remote, &o, &ids).map_err(Planned::Fails)?;
    let files = a
        .manifest
        .entries
        .iter()
        .filter(|e| e.kind == Kind::File)
        .count();
    let plain: u64 = a.manifest.entries.iter().filter_map(|e| e.size).sum();
    match dest_state(&args.dest, &a.manifest, &o.key).map_err(Planned::Fails)? {
        Dest::Same => {
            return Err(Planned::Done(format!(
                "`{}` already holds snapshot {stamp} from {}",
                args.dest.display(),
                remote.target()
            )));
        }
        Dest::Other => {
            return Err(Planned::Fails(format!(
                "`{}` exists and is not empty (argument `dest`): fetch into a new or empty directory",
                args.dest.display()
            )));
        }
        Dest::Absent | Dest::Empty => {}
    }
    if let Err(e) = guard::writable(&args.dest, ctx) {
        return Err(Planned::Fails(e.to_string()));
    }
    check_room(&args.dest, &a.manifest).map_err(Planned::Fails)?;
    Ok(format!(
        "fetch snapshot {stamp} from {} (authenticated by key {}): {} objects, decrypt and check {files} files ({}) into `{}`",
        remote.target(),
        o.key.fingerprint(),
        a.manifest.objects().len(),
        human(plain),
        args.dest.display()
    ))
}

pub fn run(args: &FetchArgs, ctx: &ActionCtx) -> Result<Outputs, String> {
    let ids = load(args)?;
    let remote = Remote::new(&args.repo);
    let o = open(&remote, &ctx.state_dir, Some((&ids, &args.identity)))?;
    let (stamp, a) = choose(args, &remote, &o, &ids)?;
    let files = a
        .manifest
        .entries
        .iter()
        .filter(|e| e.kind == Kind::File)
        .count();
    let plain: u64 = a.manifest.entries.iter().filter_map(|e| e.size).sum();
    let out = |received: u64| {
        let mut m = Outputs::new();
        m.insert("stamp".into(), json!(stamp));
        m.insert("path".into(), json!(args.dest));
        m.insert("files".into(), json!(files));
        m.insert("bytes".into(), json!(plain));
        m.insert("bytes_received".into(), json!(received));
        m.insert("key".into(), json!(o.key.fingerprint()));
        m
    };
    let dest_was = dest_state(&args.dest, &a.manifest, &o.key)?;
    match dest_was {
        Dest::Same => return Ok(out(0)),
        Dest::Other => {
            return Err(format!(
                "`{}` exists and is not empty (argument `dest`): fetch into a new or empty directory",
                args.dest.display()
            ));
        }
        Dest::Absent | Dest::Empty => {}
    }
    guard::writable(&args.dest, ctx).map_err(|e| e.to_string())?;
    check_room(&args.dest, &a.manifest)?;
    let staging = staging_of(&args.dest);
    if std::fs::symlink_metadata(&staging).is_ok() {
        std::fs::remove_dir_all(&staging)
            .map_err(|e| format!("removing `{}`: {e}", staging.display()))?;
    }
    let total: u64 = a.manifest.entries.iter().filter_map(|e| e.size).sum();
    let bar = super::push::bar(total, format!("fetch from {}", remote.target()), ctx);
    let built = build(&remote, &staging, &a.manifest, &o.key, &ids, bar.as_ref());
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let received = match built {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(match e {
                Built::Refused(why) => format!(
                    "refusing snapshot {stamp}: {why}; nothing was written to `{}`",
                    args.dest.display()
                ),
                Built::Failed(why) => why,
            });
        }
    };
    sync_tree(&staging);
    if matches!(dest_was, Dest::Empty) {
        std::fs::remove_dir(&args.dest)
            .map_err(|e| format!("replacing the empty `{}`: {e}", args.dest.display()))?;
    }
    std::fs::rename(&staging, &args.dest)
        .map_err(|e| format!("moving the fetched tree to `{}`: {e}", args.dest.display()))?;
    Ok(out(received))
}

enum Built {
    /// The snapshot's bytes are not what its manifest says.
    Refused(String),
    /// Anything else (the link, the disk).
    Failed(String),
}

fn cstr(name: &str) -> Result<CString, Built> {
    CString::new(name).map_err(|_| Built::Refused(format!("`{name}` holds a NUL byte")))
}

fn os(what: &str, path: &str) -> Built {
    let e = std::io::Error::last_os_error();
    Built::Failed(format!(
        "{what} `{path}` in the fetch: {e}{}",
        super::room_hint(&e)
    ))
}

/// A directory of the tree being built, held open: everything below it is made
/// relative to this handle.
struct DirFd(OwnedFd);

impl DirFd {
    fn open_beneath(parent: &DirFd, name: &CString, path: &str) -> Result<DirFd, Built> {
        // SAFETY: a valid descriptor and C string; the result is checked.
        let fd = unsafe {
            libc::openat(
                parent.0.as_raw_fd(),
                name.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(os("opening", path));
        }
        // SAFETY: a descriptor we just opened and own.
        Ok(DirFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }
}

fn set_times(fd: i32, e: &Entry, path: &str) -> Result<(), Built> {
    let t = libc::timespec {
        tv_sec: e.mtime as libc::time_t,
        tv_nsec: e.mtime_nsec.min(999_999_999) as libc::c_long,
    };
    let times = [t, t];
    // SAFETY: a valid descriptor and two timespecs.
    if unsafe { libc::futimens(fd, times.as_ptr()) } != 0 {
        return Err(os("setting the time of", path));
    }
    Ok(())
}

/// Makes the tree in `root` (new): directories and links first, then every object
/// streamed in one transfer and decrypted into the files that hold it, each checked
/// by its HMAC; then modes and times. Returns the bytes received.
fn build(
    remote: &Remote,
    root: &Path,
    manifest: &Manifest,
    key: &RepoKey,
    ids: &Identities,
    bar: Option<&indicatif::ProgressBar>,
) -> Result<u64, Built> {
    std::fs::create_dir(root).map_err(|e| {
        Built::Failed(format!(
            "creating `{}`: {e}{}",
            root.display(),
            super::room_hint(&e)
        ))
    })?;
    let root_fd = File::open(root)
        .map_err(|e| Built::Failed(format!("opening `{}`: {e}", root.display())))?;
    let mut dirs: BTreeMap<&str, DirFd> = BTreeMap::new();
    dirs.insert("", DirFd(OwnedFd::from(root_fd)));
    let split = |p: &str| -> (String, String) {
        match p.rsplit_once('/') {
            Some((a, b)) => (a.to_string(), b.to_string()),
            None => (String::new(), p.to_string()),
        }
    };
    // The manifest is sorted and checked: every parent is a directory entry before
    // its children.
    let mut entries: Vec<&Entry> = manifest.entries.iter().collect();
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    for e in &entries {
        if e.path.is_empty() {
            continue;
        }
        let (parent, name) = split(&e.path);
        let pfd = dirs
            .get(parent.as_str())
            .ok_or_else(|| Built::Refused(format!("`{}` has no directory", e.path)))?;
        let c = cstr(&name)?;
        match e.kind {
            Kind::Dir => {
                // SAFETY: valid descriptor and C string; the result is checked.
                if unsafe { libc::mkdirat(pfd.0.as_raw_fd(), c.as_ptr(), 0o700) } != 0 {
                    return Err(os("creating", &e.path));
                }
                let fd = DirFd::open_beneath(pfd, &c, &e.path)?;
                dirs.insert(e.path.as_str(), fd);
            }
            Kind::Symlink => {
                let target = cstr(e.target.as_deref().unwrap_or_default())?;
                // SAFETY: valid C strings and descriptor; the result is checked.
                if unsafe { libc::symlinkat(target.as_ptr(), pfd.0.as_raw_fd(), c.as_ptr()) } != 0 {
                    return Err(os("creating", &e.path));
                }
            }
            Kind::File => {}
        }
    }
    // Which files each object fills, in the order they are asked for.
    let mut holders: BTreeMap<&str, Vec<&Entry>> = BTreeMap::new();
    let mut order: Vec<&str> = Vec::new();
    for e in entries.iter().filter(|e| e.kind == Kind::File) {
        let id = e.object.as_deref().expect("checked");
        let v = holders.entry(id).or_default();
        if v.is_empty() {
            order.push(id);
        }
        v.push(e);
    }
    let names: Vec<String> = order.iter().map(|id| object_path(id)).collect();
    let id_key = key.id_key();
    let mut received = 0u64;
    let mut next = 0usize;
    let streamed = repo::fetch(remote, &names, &mut |r| {
        let mut counted = Counted { inner: r, bytes: 0 };
        let result = (|| -> Result<(), Built> {
            let mut archive = tar::Archive::new(&mut counted);
            let mut it = archive
                .entries()
                .map_err(|e| Built::Failed(format!("reading the transfer: {e}")))?;
            while next < order.len() {
                let id = order[next];
                let mut entry = match it.next() {
                    Some(Ok(x)) => x,
                    Some(Err(e)) => {
                        return Err(Built::Failed(format!("reading the transfer: {e}")));
                    }
                    None => {
                        return Err(Built::Refused(format!(
                            "object {} is missing on {}",
                            object_path(id),
                            remote.target()
                        )));
                    }
                };
                let got = entry
                    .path()
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if got != object_path(id) {
                    return Err(Built::Refused(format!(
                        "object {} is missing on {} (the transfer sent {got} in its place)",
                        object_path(id),
                        remote.target()
                    )));
                }
                fill(&mut entry, id, &holders[id], &dirs, ids, &id_key, bar)?;
                next += 1;
            }
            Ok(())
        })();
        received = counted.bytes;
        result.map_err(|b| match b {
            Built::Refused(s) => format!("R{s}"),
            Built::Failed(s) => format!("F{s}"),
        })
    });
    if let Err(e) = streamed {
        return Err(match (e.strip_prefix('R'), e.strip_prefix('F')) {
            (Some(s), _) => Built::Refused(s.to_string()),
            (_, Some(s)) => Built::Failed(s.to_string()),
            _ => Built::Failed(e),
        });
    }
    // Modes and times of the directories, deepest first (writing into one changes it).
    for e in entries.iter().rev() {
        match e.kind {
            Kind::Dir => {
                let fd = dirs[e.path.as_str()].0.as_raw_fd();
                // SAFETY: a valid descriptor.
                if unsafe { libc::fchmod(fd, e.mode) } != 0 {
                    return Err(os("setting the mode of", &e.path));
                }
                set_times(fd, e, &e.path)?;
            }
            Kind::Symlink => {
                let (parent, name) = split(&e.path);
                let c = cstr(&name)?;
                let t = libc::timespec {
                    tv_sec: e.mtime as libc::time_t,
                    tv_nsec: e.mtime_nsec.min(999_999_999) as libc::c_long,
                };
                // SAFETY: valid descriptor, C string and timespecs; a link's own time.
                unsafe {
                    libc::utimensat(
                        dirs[parent.as_str()].0.as_raw_fd(),
                        c.as_ptr(),
                        [t, t].as_ptr(),
                        libc::AT_SYMLINK_NOFOLLOW,
                    )
                };
            }
            Kind::File => {}
        }
    }
    Ok(received)
}

struct Counted<'r> {
    inner: &'r mut dyn Read,
    bytes: u64,
}

impl Read for Counted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Decrypts one object into every file that holds it (created new, never through a
/// link), checking the plaintext's HMAC and size against the manifest.
fn fill(
    entry: &mut dyn Read,
    id: &str,
    files: &[&Entry],
    dirs: &BTreeMap<&str, DirFd>,
    ids: &Identities,
    id_key: &[u8; 32],
    bar: Option<&indicatif::ProgressBar>,
) -> Result<(), Built> {
    use hmac::{Hmac, KeyInit, Mac};
    let name = object_path(id);
    let holds = files
        .iter()
        .map(|e| format!("`{}`", e.path))
        .collect::<Vec<_>>()
        .join(", ");
    let mut outs: Vec<File> = Vec::new();
    for e in files {
        let (parent, base) = match e.path.rsplit_once('/') {
            Some((a, b)) => (a, b),
            None => ("", e.path.as_str()),
        };
        let c = cstr(base)?;
        // SAFETY: a valid descriptor and C string; the result is checked.
        let fd = unsafe {
            libc::openat(
                dirs[parent].0.as_raw_fd(),
                c.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o600 as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(os("creating", &e.path));
        }
        // SAFETY: a descriptor we just opened and own.
        outs.push(unsafe { File::from_raw_fd(fd) });
    }
    let mut reader = crypto::decrypt(ids, entry, "").map_err(|x| {
        Built::Refused(format!(
            "object {name} (holds {holds}) does not decrypt: {x}"
        ))
    })?;
    let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(id_key).expect("any key");
    let mut buf = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = reader.read(&mut buf).map_err(|x| {
            Built::Refused(format!("object {name} (holds {holds}) is damaged: {x}"))
        })?;
        if n == 0 {
            break;
        }
        mac.update(&buf[..n]);
        size += n as u64;
        for (f, e) in outs.iter_mut().zip(files) {
            f.write_all(&buf[..n]).map_err(|x| {
                Built::Failed(format!("writing `{}`: {x}{}", e.path, super::room_hint(&x)))
            })?;
        }
        if let Some(b) = bar {
            b.inc(n as u64);
        }
    }
    if crypto::hex(&mac.finalize().into_bytes()) != id || Some(size) != files[0].size {
        return Err(Built::Refused(format!(
            "object {name} (holds {holds}) decrypts to other bytes than were shipped (swapped, forged or damaged)"
        )));
    }
    for (f, e) in outs.iter().zip(files) {
        // SAFETY: a valid descriptor.
        if unsafe { libc::fchmod(f.as_raw_fd(), e.mode) } != 0 {
            return Err(os("setting the mode of", &e.path));
        }
        set_times(f.as_raw_fd(), e, &e.path)?;
    }
    Ok(())
}

/// One syncfs for the whole tree: the rename that publishes it comes after its data.
fn sync_tree(root: &Path) {
    if let Ok(f) = File::open(root) {
        // SAFETY: a valid descriptor we own for the call's duration.
        unsafe {
            libc::syncfs(f.as_raw_fd());
        }
    }
}
