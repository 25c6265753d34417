//! `offsite-fetch`: everything is checked before anything reaches `dest`. The order is
//! (1) the manifest's ciphertext digest against the snapshot's list, then its AEAD by
//! decrypting it; (2) every object's presence and size in the listing; (3) every
//! fetched ciphertext's sha256; (4) each file's AEAD and plaintext sha256 while it is
//! decrypted into a staging sibling of `dest`. Only then is the staging tree renamed
//! to `dest`. A `dest` that already holds exactly the snapshot is the step done.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::json;
use sha2::{Digest, Sha256};

use super::crypto::{self, CryptoError, Identities};
use super::repo::{self, Entry, Inventory, Kind, Manifest, ObjectList, object_path};
use super::ssh::Remote;
use super::{FetchArgs, human, resume_hint};
use crate::actions::{ActionCtx, Outputs, guard};

pub enum Planned {
    /// `dest` already holds the snapshot.
    Done(String),
    Fails(String),
}

/// The snapshot chosen, its list and its decrypted manifest.
struct Chosen {
    stamp: String,
    list: ObjectList,
    manifest: Manifest,
    inv: Inventory,
}

fn link_error(remote: &Remote, e: super::ssh::SshError) -> String {
    if e.is_link() {
        format!("{e}; {}", resume_hint(remote))
    } else {
        e.to_string()
    }
}

fn choose(args: &FetchArgs, remote: &Remote, ids: &Identities) -> Result<Chosen, String> {
    let inv = Inventory::read(remote, repo::Texts::Lists).map_err(|e| match e {
        repo::RepoError::Ssh(e) => link_error(remote, e),
        other => other.to_string(),
    })?;
    let mut stamps = inv.stamps();
    stamps.sort();
    let stamp = if args.stamp == "latest" {
        stamps
            .iter()
            .rev()
            .find(|s| inv.marker(s).is_some())
            .cloned()
            .ok_or_else(|| {
                format!(
                    "no verified snapshot on {} in `{}` (argument `stamp`: latest)",
                    remote.target(),
                    args.repo.dir.display()
                )
            })?
    } else if repo::valid_stamp(&args.stamp) {
        args.stamp.clone()
    } else {
        return Err(format!(
            "`stamp`: `{}` is not a snapshot name (letters, digits, `-`, `_`, `.`)",
            args.stamp
        ));
    };
    if !stamps.contains(&stamp) {
        return Err(format!(
            "no snapshot {stamp} on {} (argument `stamp`); there: {}",
            remote.target(),
            if stamps.is_empty() {
                "none".to_string()
            } else {
                stamps.join(" ")
            }
        ));
    }
    if inv.marker(&stamp).is_none() {
        return Err(format!(
            "snapshot {stamp} on {} was never verified (its push did not finish): resume that push, or fetch another stamp",
            remote.target()
        ));
    }
    let list = inv.list(&stamp).ok_or_else(|| {
        format!(
            "refusing snapshot {stamp}: its object list {} on {} is missing or damaged",
            repo::list_path(&stamp),
            remote.target()
        )
    })?;
    let mpath = repo::manifest_path(&stamp);
    let listed = list.manifest.clone().expect("parse requires it");
    let refuse = |why: &str| format!("refusing snapshot {stamp}: its manifest {mpath} {why}");
    match inv.files.get(&mpath) {
        None => return Err(refuse("is missing on the remote")),
        Some(n) if *n != listed.bytes => {
            return Err(refuse(&format!(
                "has {n} bytes on the remote, {} were sent (truncated or damaged)",
                listed.bytes
            )));
        }
        Some(_) => {}
    }
    let sealed = repo::get(remote, &mpath).map_err(|e| link_error(remote, e))?;
    if crypto::sha256_hex(&sealed) != listed.sha256 {
        return Err(refuse("does not match its digest (damaged on the remote)"));
    }
    let plain = match decrypt_manifest(ids, &sealed) {
        Ok(p) => p,
        Err(DecryptFailure::NotARecipient) => {
            return Err(format!(
                "the identity `{}` cannot decrypt the manifest of snapshot {stamp} (argument `identity`): it holds none of the keys the snapshot was encrypted to",
                args.identity.display()
            ));
        }
        Err(DecryptFailure::Damaged(why)) => return Err(refuse(&format!("is damaged: {why}"))),
    };
    let manifest: Manifest =
        serde_json::from_slice(&plain).map_err(|e| refuse(&format!("does not parse: {e}")))?;
    Ok(Chosen {
        stamp,
        list,
        manifest,
        inv,
    })
}

enum DecryptFailure {
    NotARecipient,
    Damaged(String),
}

fn decrypt_manifest(ids: &Identities, sealed: &[u8]) -> Result<Vec<u8>, DecryptFailure> {
    let decryptor =
        age::Decryptor::new(sealed).map_err(|e| DecryptFailure::Damaged(e.to_string()))?;
    let mut reader = match decryptor.decrypt(ids.iter().map(|i| i.as_ref() as &dyn age::Identity)) {
        Ok(r) => r,
        Err(age::DecryptError::NoMatchingKeys) => return Err(DecryptFailure::NotARecipient),
        Err(e) => return Err(DecryptFailure::Damaged(e.to_string())),
    };
    let mut out = Vec::new();
    reader
        .read_to_end(&mut out)
        .map_err(|e| DecryptFailure::Damaged(e.to_string()))?;
    Ok(out)
}

/// Checks every object of the snapshot by the remote's sha256, naming the first
/// problem's object and the files it holds.
fn remote_check(
    remote: &Remote,
    c: &Chosen,
    h: &BTreeMap<String, Vec<String>>,
    dest: &Path,
) -> Result<(), String> {
    let names: Vec<String> = c.list.objects.keys().map(|id| object_path(id)).collect();
    let digests = repo::remote_digests(remote, &names).map_err(|e| link_error(remote, e))?;
    for (id, l) in &c.list.objects {
        let p = object_path(id);
        let why = match digests.get(&p) {
            None => format!("is missing on {}", remote.target()),
            Some(r) if r.bytes != l.bytes => format!(
                "has {} bytes on {}, {} were sent (truncated or damaged)",
                r.bytes,
                remote.target(),
                l.bytes
            ),
            Some(r) if r.sha256.as_deref() != Some(l.sha256.as_str()) => {
                format!("does not match its digest (damaged on {})", remote.target())
            }
            Some(_) => continue,
        };
        return Err(format!(
            "refusing snapshot {}: object {p} (holds {}) {why}; nothing was written to `{}`",
            c.stamp,
            holds(h, id),
            dest.display()
        ));
    }
    Ok(())
}

/// The files each object holds, for messages.
fn holders(manifest: &Manifest) -> BTreeMap<String, Vec<String>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for e in &manifest.entries {
        if let Some(id) = &e.object {
            map.entry(id.clone()).or_default().push(e.path.clone());
        }
    }
    map
}

fn holds(h: &BTreeMap<String, Vec<String>>, id: &str) -> String {
    h.get(id)
        .map(|v| {
            v.iter()
                .map(|p| format!("`{p}`"))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

/// What `dest` is now.
enum Dest {
    Absent,
    Empty,
    /// Holds exactly the snapshot (an earlier attempt finished).
    Same,
    Other,
}

fn dest_state(dest: &Path, manifest: &Manifest) -> Result<Dest, String> {
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
    Ok(if matches_manifest(dest, manifest) {
        Dest::Same
    } else {
        Dest::Other
    })
}

/// Whether the tree at `root` is the snapshot: the same entries, kinds, modes, link
/// targets and file contents (by sha256).
fn matches_manifest(root: &Path, manifest: &Manifest) -> bool {
    let mut expected: BTreeMap<&str, &Entry> = manifest
        .entries
        .iter()
        .map(|e| (e.path.as_str(), e))
        .collect();
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
                    && file_sha(item.path()).ok() == e.sha256
            }
        };
        if !same {
            return false;
        }
    }
    expected.is_empty()
}

fn file_sha(path: &Path) -> std::io::Result<String> {
    crypto::sha256_file(path).map(|(sha, _)| sha)
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

pub fn plan(args: &FetchArgs, _ctx: &ActionCtx) -> Result<String, Planned> {
    let ids = load(args).map_err(Planned::Fails)?;
    let remote = Remote::new(&args.repo);
    let c = choose(args, &remote, &ids).map_err(Planned::Fails)?;
    let files = c
        .manifest
        .entries
        .iter()
        .filter(|e| e.kind == Kind::File)
        .count();
    let plain: u64 = c.manifest.entries.iter().filter_map(|e| e.size).sum();
    let bytes: u64 = c.list.objects.values().map(|l| l.bytes).sum();
    match dest_state(&args.dest, &c.manifest).map_err(Planned::Fails)? {
        Dest::Same => {
            return Err(Planned::Done(format!(
                "`{}` already holds snapshot {} from {}",
                args.dest.display(),
                c.stamp,
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
    if let Err(e) = guard::writable(&args.dest, _ctx) {
        return Err(Planned::Fails(e.to_string()));
    }
    // The remote's digests of the snapshot's objects (only digests cross): a damaged
    // one fails the plan as it would fail the run.
    let h = holders(&c.manifest);
    if let Err(e) = remote_check(&remote, &c, &h, &args.dest) {
        return Err(Planned::Fails(e));
    }
    Ok(format!(
        "fetch snapshot {} from {}: {} objects ({}), verify and decrypt {} files ({}) into `{}`",
        c.stamp,
        remote.target(),
        c.list.objects.len(),
        human(bytes),
        files,
        human(plain),
        args.dest.display()
    ))
}

pub fn run(args: &FetchArgs, ctx: &ActionCtx) -> Result<Outputs, String> {
    let ids = load(args)?;
    let remote = Remote::new(&args.repo);
    let c = choose(args, &remote, &ids)?;
    let files = c
        .manifest
        .entries
        .iter()
        .filter(|e| e.kind == Kind::File)
        .count();
    let plain: u64 = c.manifest.entries.iter().filter_map(|e| e.size).sum();
    let out = |received: u64| {
        let mut o = Outputs::new();
        o.insert("stamp".into(), json!(c.stamp));
        o.insert("path".into(), json!(args.dest));
        o.insert("files".into(), json!(files));
        o.insert("bytes".into(), json!(plain));
        o.insert("bytes_received".into(), json!(received));
        o
    };
    let dest_was = dest_state(&args.dest, &c.manifest)?;
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
    let h = holders(&c.manifest);
    remote_check(&remote, &c, &h, &args.dest)?;
    // Every listed object there, whole, before anything is fetched.
    for (id, l) in &c.list.objects {
        let p = object_path(id);
        match c.inv.files.get(&p) {
            None => {
                return Err(format!(
                    "refusing snapshot {}: object {p} (holds {}) is missing on {}; nothing was written to `{}`",
                    c.stamp,
                    holds(&h, id),
                    remote.target(),
                    args.dest.display()
                ));
            }
            Some(n) if *n != l.bytes => {
                return Err(format!(
                    "refusing snapshot {}: object {p} (holds {}) has {n} bytes on {}, {} were sent (truncated or damaged); nothing was written to `{}`",
                    c.stamp,
                    holds(&h, id),
                    remote.target(),
                    l.bytes,
                    args.dest.display()
                ));
            }
            Some(_) => {}
        }
    }
    // Every object the manifest names must be one the list vouches for.
    for e in &c.manifest.entries {
        if let Some(id) = &e.object
            && !c.list.objects.contains_key(id)
        {
            return Err(format!(
                "refusing snapshot {}: `{}` is in object {id}, which its list does not name",
                c.stamp, e.path
            ));
        }
    }

    let cache = args
        .repo
        .local_dir(&ctx.state_dir)
        .join("fetch")
        .join(&c.stamp);
    std::fs::create_dir_all(&cache).map_err(|e| format!("creating `{}`: {e}", cache.display()))?;
    let names: Vec<String> = c.list.objects.keys().map(|id| object_path(id)).collect();
    let total: u64 = c.list.objects.values().map(|l| l.bytes).sum();
    let bar = super::push::bar(total, format!("fetch from {}", remote.target()), ctx);
    let t = remote
        .download(&cache, &names, bar.as_ref())
        .map_err(|e| link_error(&remote, e))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    for (id, l) in &c.list.objects {
        let p = cache.join(object_path(id));
        let got = file_sha(&p).map_err(|e| format!("reading `{}`: {e}", p.display()))?;
        if got != l.sha256 {
            // A later attempt fetches it again.
            let _ = std::fs::remove_file(&p);
            return Err(format!(
                "refusing snapshot {}: object {} (holds {}) does not match its digest (damaged on {}); nothing was written to `{}`",
                c.stamp,
                object_path(id),
                holds(&h, id),
                remote.target(),
                args.dest.display()
            ));
        }
    }

    let staging = staging_of(&args.dest);
    if staging.exists() {
        std::fs::remove_dir_all(&staging)
            .map_err(|e| format!("removing `{}`: {e}", staging.display()))?;
    }
    if let Err(e) = build(&staging, &cache, &c.manifest, &ids) {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(format!(
            "refusing snapshot {}: {e}; nothing was written to `{}`",
            c.stamp,
            args.dest.display()
        ));
    }
    sync_tree(&staging);
    if matches!(dest_was, Dest::Empty) {
        std::fs::remove_dir(&args.dest)
            .map_err(|e| format!("replacing the empty `{}`: {e}", args.dest.display()))?;
    }
    std::fs::rename(&staging, &args.dest)
        .map_err(|e| format!("moving the fetched tree to `{}`: {e}", args.dest.display()))?;
    let _ = std::fs::remove_dir_all(&cache);
    Ok(out(t.bytes_received))
}

/// Decrypts every file into `root`, checking each one's sha256, then sets modes and
/// times (directories last, deepest first, so writing into them does not change them).
fn build(root: &Path, cache: &Path, manifest: &Manifest, ids: &Identities) -> Result<(), String> {
    let mut entries: Vec<&Entry> = manifest.entries.iter().collect();
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    for e in &entries {
        if e.path.split('/').any(|c| c == ".." || c == ".") || e.path.starts_with('/') {
            return Err(format!(
                "the manifest names `{}`, outside the snapshot",
                e.path
            ));
        }
        let to = if e.path.is_empty() {
            root.to_path_buf()
        } else {
            root.join(&e.path)
        };
        let ctx = |what: &str, err: std::io::Error| format!("{what} `{}`: {err}", to.display());
        match e.kind {
            Kind::Dir => std::fs::create_dir_all(&to).map_err(|x| ctx("creating", x))?,
            Kind::Symlink => {
                let target = e.target.as_deref().unwrap_or_default();
                std::os::unix::fs::symlink(target, &to).map_err(|x| ctx("creating", x))?;
            }
            Kind::File => {
                let id = e.object.as_deref().unwrap_or_default();
                let sealed = cache.join(object_path(id));
                let input = File::open(&sealed)
                    .map_err(|x| format!("reading `{}`: {x}", sealed.display()))?;
                let mut reader =
                    crypto::decrypt(ids, std::io::BufReader::new(input), "").map_err(|x| {
                        format!(
                            "object {} (holds `{}`) does not decrypt: {x}",
                            object_path(id),
                            e.path
                        )
                    })?;
                let mut out =
                    std::io::BufWriter::new(File::create(&to).map_err(|x| ctx("creating", x))?);
                let mut h = Sha256::new();
                let mut buf = vec![0u8; 1 << 16];
                let mut size = 0u64;
                loop {
                    let n = reader.read(&mut buf).map_err(|x| {
                        format!(
                            "object {} (holds `{}`) is damaged: {x}",
                            object_path(id),
                            e.path
                        )
                    })?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                    size += n as u64;
                    out.write_all(&buf[..n]).map_err(|x| ctx("writing", x))?;
                }
                out.flush().map_err(|x| ctx("writing", x))?;
                let sha = crypto::hex(&h.finalize());
                if Some(sha) != e.sha256 || Some(size) != e.size {
                    return Err(format!(
                        "object {} (holds `{}`) decrypts to other bytes than were shipped",
                        object_path(id),
                        e.path
                    ));
                }
                std::fs::set_permissions(&to, std::fs::Permissions::from_mode(e.mode))
                    .map_err(|x| ctx("setting the mode of", x))?;
                set_mtime(&to, e)?;
            }
        }
    }
    for e in entries.iter().rev().filter(|e| e.kind == Kind::Dir) {
        let to = if e.path.is_empty() {
            root.to_path_buf()
        } else {
            root.join(&e.path)
        };
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(e.mode))
            .map_err(|x| format!("setting the mode of `{}`: {x}", to.display()))?;
        set_mtime(&to, e)?;
    }
    Ok(())
}

fn set_mtime(path: &Path, e: &Entry) -> Result<(), String> {
    let t = std::time::UNIX_EPOCH
        + std::time::Duration::new(e.mtime.max(0) as u64, e.mtime_nsec.min(999_999_999));
    File::open(path)
        .and_then(|f| f.set_modified(t))
        .map_err(|x| format!("setting the time of `{}`: {x}", path.display()))
}

/// One syncfs for the whole tree: the rename that publishes it comes after its data.
fn sync_tree(root: &Path) {
    if let Ok(f) = File::open(root) {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid descriptor we own for the call's duration.
        unsafe {
            libc::syncfs(f.as_raw_fd());
        }
    }
}
