//! `offsite-push`: decide locally what is new, then stream it to the repository in one
//! connection and commit it there.
//!
//! A file is named by the HMAC of its bytes under the repository's id key. Which files
//! need hashing, and which objects the repository holds, come from this host's cache
//! (`STATE_DIR/offsite/<repo>/cache.json`): a file whose inode, size, mtime and ctime
//! are unchanged keeps its name (ctime cannot be set back by anyone, so a rewrite in
//! place is always noticed); the objects listed are trusted only while the repository's
//! `generation` is the one the cache was made in (every deletion changes it). What the
//! cache does not vouch for is asked of the remote in the same listing that takes the
//! lock, so a lost or stale cache costs a question, never an overwrite (the remote
//! never replaces an object anyway).
//!
//! The upload is one tar stream (objects encrypted as they are written into it, nothing
//! staged on disk) that the remote unpacks into `tmp/`, checks against the sha256 of
//! every file sent, links into place without replacing, and commits by linking the
//! snapshot file last. A push killed at any point leaves no snapshot file, so a rerun
//! (resume) does the same work again minus what arrived.

use std::collections::{BTreeMap, BTreeSet};

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::crypto;
use super::format::{
    self, Cipher, Config, Entry, Index, Kind, LockKind, Manifest, Signed, Snapshot, object_path,
};
use super::key::{self, RepoKey};
use super::repo::{self, Depth, Holder, Listing, RepoError, Take};
use super::ssh::Remote;
use super::upload::{self, Sender, Sent, Source};
use super::{PushArgs, human, resume_hint};
use crate::actions::{ActionCtx, Outputs, Verdict};

/// A file of the source, with where it is on disk and its identity for the cache.
struct Local {
    entry: Entry,
    abs: PathBuf,
    /// dev, inode, size, mtime and ctime (ns): unchanged means unchanged bytes.
    stat: String,
}

/// Walks `source`: the root first, then every entry in name order. Only files, dirs
/// and symlinks: anything else cannot be restored and is refused.
fn walk(source: &Path) -> Result<Vec<Local>, String> {
    let meta = std::fs::symlink_metadata(source)
        .map_err(|e| format!("cannot read the snapshot `{}`: {e}", source.display()))?;
    if !meta.is_dir() {
        return Err(format!(
            "the snapshot `{}` is not a directory",
            source.display()
        ));
    }
    let mut out = Vec::new();
    for item in walkdir::WalkDir::new(source)
        .follow_links(false)
        .sort_by_file_name()
    {
        let item = item.map_err(|e| format!("walking `{}`: {e}", source.display()))?;
        let rel = item
            .path()
            .strip_prefix(source)
            .unwrap_or(item.path())
            .to_str()
            .ok_or_else(|| {
                format!(
                    "`{}`: only UTF-8 file names can be shipped",
                    item.path().display()
                )
            })?
            .to_string();
        let m = item
            .path()
            .symlink_metadata()
            .map_err(|e| format!("reading `{}`: {e}", item.path().display()))?;
        let t = m.file_type();
        let (kind, size, target) = if t.is_dir() {
            (Kind::Dir, None, None)
        } else if t.is_file() {
            (Kind::File, Some(m.len()), None)
        } else if t.is_symlink() {
            let to = std::fs::read_link(item.path())
                .map_err(|e| format!("reading the link `{}`: {e}", item.path().display()))?;
            let to = to
                .to_str()
                .ok_or_else(|| {
                    format!(
                        "`{}`: the link's target is not UTF-8",
                        item.path().display()
                    )
                })?
                .to_string();
            (Kind::Symlink, None, Some(to))
        } else {
            return Err(format!(
                "`{}` is not a file, directory or symlink: it cannot be shipped",
                item.path().display()
            ));
        };
        out.push(Local {
            stat: format!(
                "{} {} {} {}.{} {}.{}",
                m.dev(),
                m.ino(),
                m.len(),
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec()
            ),
            entry: Entry {
                path: rel,
                kind,
                mode: m.mode() & 0o7777,
                mtime: m.mtime(),
                mtime_nsec: m.mtime_nsec() as u32,
                size,
                object: None,
                target,
            },
            abs: item.path().to_path_buf(),
        });
    }
    Ok(out)
}

/// What this host remembers of a repository between pushes.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Cache {
    /// The fingerprint of the key the names were computed with.
    key: String,
    /// The repository's generation the object list is valid for.
    generation: String,
    /// Objects the repository holds (name -> ciphertext bytes).
    objects: BTreeMap<String, u64>,
    /// File identity (see [`Local::stat`]) -> object name.
    files: BTreeMap<String, String>,
}

impl Cache {
    fn path(local_dir: &Path) -> PathBuf {
        local_dir.join("cache.json")
    }

    /// The cache for this key; anything unreadable is an empty cache (it only saves work).
    fn load(local_dir: &Path, key: Option<&RepoKey>) -> Cache {
        let Some(key) = key else {
            return Cache::default();
        };
        let c: Cache = std::fs::read(Cache::path(local_dir))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        if c.key == key.fingerprint() {
            c
        } else {
            Cache::default()
        }
    }

    fn save(&self, local_dir: &Path) -> Result<(), String> {
        let data = serde_json::to_vec(self).map_err(|e| e.to_string())?;
        key::write_private(&Cache::path(local_dir), &data)
    }
}

/// Names every file the cache does not: HMAC-SHA256 of its bytes under the id key,
/// spread over the machine's cores.
fn hash_files(
    locals: &mut [Local],
    cache: &Cache,
    key: &RepoKey,
    bar: Option<&indicatif::ProgressBar>,
) -> Result<u64, String> {
    let mut todo: Vec<usize> = Vec::new();
    for (i, l) in locals.iter_mut().enumerate() {
        if l.entry.kind != Kind::File {
            continue;
        }
        match cache.files.get(&l.stat) {
            Some(id) => l.entry.object = Some(id.clone()),
            None => todo.push(i),
        }
    }
    let hashed_bytes: u64 = todo.iter().filter_map(|i| locals[*i].entry.size).sum();
    let id_key = key.id_key();
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, Result<String, String>)>> = Mutex::new(Vec::new());
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(todo.len().max(1));
    let paths: Vec<&Path> = todo.iter().map(|i| locals[*i].abs.as_path()).collect();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let Some(path) = paths.get(n) else { break };
                    let r = hmac_file(path, &id_key, &mut buf, bar);
                    results.lock().expect("no panics").push((todo[n], r));
                }
            });
        }
    });
    for (i, r) in results.into_inner().expect("no panics") {
        locals[i].entry.object = Some(r?);
    }
    Ok(hashed_bytes)
}

fn hmac_file(
    path: &Path,
    id_key: &[u8; 32],
    buf: &mut [u8],
    bar: Option<&indicatif::ProgressBar>,
) -> Result<String, String> {
    key::hmac_file(path, id_key, buf, bar).map_err(|e| format!("reading `{}`: {e}", path.display()))
}

pub(super) fn bar(total: u64, msg: String, ctx: &ActionCtx) -> Option<indicatif::ProgressBar> {
    if !ctx.progress || total < (16 << 20) {
        return None;
    }
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style);
    }
    bar.set_message(msg);
    Some(bar)
}

/// A rendered stamp is a name in remote paths: checked again, not only at validate.
fn check_stamp(stamp: &str) -> Result<(), String> {
    if format::valid_stamp(stamp) {
        Ok(())
    } else {
        Err(format!(
            "`stamp`: `{stamp}` is not a snapshot name (letters, digits, `-`, `_`, `.`)"
        ))
    }
}

pub struct Plan {
    target: String,
    stamp: String,
    files: usize,
    bytes: u64,
    changed_files: usize,
    changed_bytes: u64,
    already: bool,
    new_repo: bool,
    /// Bytes of ciphertext an earlier release staged under the state dir, removed by
    /// the run.
    leftover: u64,
}

impl Plan {
    pub fn verdict(&self) -> Verdict {
        if self.already {
            return Verdict::NoChange(format!(
                "{} is already on {}, authenticated",
                self.stamp, self.target
            ));
        }
        let what = if self.new_repo {
            format!(
                "create the repository (a new key) and send all {} files ({})",
                self.files,
                human(self.bytes)
            )
        } else if self.changed_files == 0 {
            format!(
                "send at most a new manifest: all {} files ({}) are unchanged since the last push",
                self.files,
                human(self.bytes)
            )
        } else {
            format!(
                "hash {} of {} files changed since the last push ({}) and send those the repository lacks",
                self.changed_files,
                self.files,
                human(self.changed_bytes)
            )
        };
        let cleanup = if self.leftover > 0 {
            format!(
                "; first removes {} an earlier release staged under the state dir",
                human(self.leftover)
            )
        } else {
            String::new()
        };
        Verdict::WillChange(format!(
            "{what}, encrypted, as {} to {}; verified there by digest before the snapshot is committed{cleanup}",
            self.stamp, self.target
        ))
    }
}

fn no_room(target: &str, dir: &Path, wanted: u64, room: u64) -> String {
    format!(
        "the off-site host {target} has {} free where the repository is (`{}`); this push needs about {}: free space there (`offsite-retention` removes old snapshots and what only they need) and run again",
        human(room),
        dir.display(),
        human(wanted)
    )
}

/// Bytes below `<local_dir>/staging`, what format 1's pushes left.
fn leftover_bytes(local_dir: &Path) -> u64 {
    walkdir::WalkDir::new(local_dir.join("staging"))
        .follow_links(false)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// The plan: the source's walk, this host's key and cache, and one listing; writes
/// nothing anywhere and hashes nothing (a file the cache does not know counts as
/// changed).
pub fn plan(args: &PushArgs, ctx: &ActionCtx) -> Result<Plan, String> {
    args.repo.check()?;
    check_stamp(&args.stamp)?;
    crypto::parse_recipients(&args.recipients).map_err(|e| e.to_string())?;
    let locals = walk(&args.source)?;
    let remote = Remote::new(&args.repo);
    let listing = Listing::read(&remote, Depth::Asked, None, &[]).map_err(|e| e.to_string())?;
    let local_dir = args.repo.local_dir(&ctx.state_dir);
    let local = RepoKey::load(&key::local_key_path(&local_dir))?;
    let new_repo = listing.config.is_none();
    let key = if new_repo {
        if let (Some(k), Some(p)) = (&local, args.repo.pinned())
            && k.fingerprint() != p
        {
            return Err(format!(
                "this host's key has fingerprint {}, but `repo.key` pins {p}",
                k.fingerprint()
            ));
        }
        local
    } else {
        Some(repo::key_for(&remote, &listing, local, None)?)
    };
    let files: Vec<&Local> = locals
        .iter()
        .filter(|l| l.entry.kind == Kind::File)
        .collect();
    let mut plan = Plan {
        target: remote.target(),
        stamp: args.stamp.clone(),
        files: files.len(),
        bytes: files.iter().filter_map(|l| l.entry.size).sum(),
        changed_files: files.len(),
        changed_bytes: files.iter().filter_map(|l| l.entry.size).sum(),
        already: false,
        new_repo,
        leftover: leftover_bytes(&local_dir),
    };
    if let Some(key) = &key {
        if let Some(text) = listing.texts.get(&format::snapshot_path(&args.stamp)) {
            let s = Snapshot::open(text, key).map_err(|why| {
                format!(
                    "{} exists on {} and does not authenticate: {why}; a push never replaces it",
                    format::snapshot_path(&args.stamp),
                    plan.target
                )
            })?;
            if s.stamp != args.stamp {
                return Err(format!(
                    "{} on {} is snapshot {} copied under another name; a push never replaces it",
                    format::snapshot_path(&args.stamp),
                    plan.target,
                    s.stamp
                ));
            }
            plan.already = true;
            return Ok(plan);
        }
        let cache = Cache::load(&local_dir, Some(key));
        let changed: Vec<&&Local> = files
            .iter()
            .filter(|l| !cache.files.contains_key(&l.stat))
            .collect();
        plan.changed_files = changed.len();
        plan.changed_bytes = changed.iter().filter_map(|l| l.entry.size).sum();
    }
    // Only a new repository is known to lack every file; otherwise a changed file may
    // be there already (the plan hashes nothing), so the run decides, before sending.
    if new_repo && let Some(room) = listing.room {
        let wanted = plan.bytes + plan.bytes / 512 + 1024 * (files.len() as u64 + 16);
        if room < wanted {
            return Err(no_room(&plan.target, &args.repo.dir, wanted, room));
        }
    }
    Ok(plan)
}

pub fn run(args: &PushArgs, ctx: &ActionCtx) -> Result<Outputs, String> {
    args.repo.check()?;
    check_stamp(&args.stamp)?;
    let recipients = crypto::parse_recipients(&args.recipients).map_err(|e| e.to_string())?;
    let remote = Remote::new(&args.repo);
    let link = |e: super::ssh::SshError| {
        if e.is_link() {
            format!("{e}; {}", resume_hint(&remote))
        } else {
            e.to_string()
        }
    };
    let repo_err = |e: RepoError| match e {
        RepoError::Ssh(e) => link(e),
        other => other.to_string(),
    };
    let mut locals = walk(&args.source)?;
    let local_dir = args.repo.local_dir(&ctx.state_dir);
    // Format 1 staged every object's ciphertext here and a failed push left it (GBs):
    // this release stages nothing, so what is there is garbage.
    let staging = local_dir.join("staging");
    if std::fs::symlink_metadata(&staging).is_ok() {
        std::fs::remove_dir_all(&staging)
            .map_err(|e| format!("removing `{}`: {e}", staging.display()))?;
    }
    let key_path = key::local_key_path(&local_dir);
    let local = RepoKey::load(&key_path)?;

    // Names first (the cache knows most), so the listing can ask about the rest.
    let mut cache = Cache::load(&local_dir, local.as_ref());
    let key = match &local {
        Some(k) => k.clone(),
        None => RepoKey::generate()?,
    };
    let total_plain: u64 = locals.iter().filter_map(|l| l.entry.size).sum();
    let hashing = bar(total_plain, format!("hash {}", args.source.display()), ctx);
    hash_files(&mut locals, &cache, &key, hashing.as_ref())?;
    if let Some(b) = hashing {
        b.finish_and_clear();
    }
    let mut entries: Vec<Entry> = locals.iter().map(|l| l.entry.clone()).collect();
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    let manifest = Manifest {
        format: "runbook-offsite-manifest".into(),
        version: format::VERSION,
        entries,
    };
    manifest.check()?;
    let manifest_plain = serde_json::to_vec(&manifest).map_err(|e| e.to_string())?;
    let manifest_id = crypto::hex(&key::hmac(&key.id_key(), &manifest_plain));
    let mut sources: BTreeMap<String, Source> = BTreeMap::new();
    for l in &locals {
        if let (Some(id), Some(size)) = (&l.entry.object, l.entry.size) {
            sources
                .entry(id.clone())
                .or_insert(Source::File(&l.abs, size));
        }
    }
    let file_objects = sources.len() as u64;
    sources.insert(manifest_id.clone(), Source::Bytes(&manifest_plain));

    let holder = Holder::new(LockKind::Shared, format!("offsite-push {}", args.stamp))?;
    // One listing takes the lock and asks about every object the cache does not vouch
    // for; only when the cache turns out stale (another generation) is the rest asked.
    let asked: Vec<String> = sources
        .keys()
        .filter(|id| !cache.objects.contains_key(*id))
        .map(|id| object_path(id))
        .collect();
    let mut listing = Listing::read(
        &remote,
        Depth::Asked,
        Some(Take {
            name: &holder.name,
            lock: &holder.lock,
        }),
        &asked,
    )
    .map_err(repo_err)?;
    let cache_valid = local.is_some()
        && listing.config.is_some()
        && listing.generation.as_deref() == Some(cache.generation.as_str());
    if !cache_valid && !cache.objects.is_empty() {
        let rest: Vec<String> = sources
            .keys()
            .filter(|id| cache.objects.contains_key(*id))
            .map(|id| object_path(id))
            .collect();
        cache.objects.clear();
        match Listing::read(&remote, Depth::Asked, None, &rest) {
            Ok(more) => listing.objects.extend(more.objects),
            Err(e) => {
                let _ = repo::unlock(&remote, std::slice::from_ref(&holder.name));
                return Err(repo_err(e));
            }
        }
    }
    let result = push_locked(
        args,
        ctx,
        &remote,
        &holder,
        &listing,
        PushState {
            key,
            local,
            cache,
            locals: &locals,
            sources,
            manifest_id,
            file_objects,
            recipients: &recipients,
            local_dir: &local_dir,
        },
    );
    if result.is_err() {
        // The lock is ours to give back; a push killed here leaves it to be judged
        // dead by the next command on this host.
        let _ = repo::unlock(&remote, std::slice::from_ref(&holder.name));
    }
    result.map_err(|e| match e {
        Failure::Link(e) => link(e),
        Failure::Other(s) => s,
    })
}

enum Failure {
    Link(super::ssh::SshError),
    Other(String),
}

impl From<String> for Failure {
    fn from(s: String) -> Self {
        Failure::Other(s)
    }
}

struct PushState<'a> {
    key: RepoKey,
    local: Option<RepoKey>,
    cache: Cache,
    locals: &'a [Local],
    sources: BTreeMap<String, Source<'a>>,
    manifest_id: String,
    file_objects: u64,
    recipients: &'a [age::x25519::Recipient],
    local_dir: &'a Path,
}

fn push_locked(
    args: &PushArgs,
    ctx: &ActionCtx,
    remote: &Remote,
    holder: &Holder,
    listing: &Listing,
    st: PushState,
) -> Result<Outputs, Failure> {
    let PushState {
        key,
        local,
        mut cache,
        locals,
        sources,
        manifest_id,
        file_objects,
        recipients,
        local_dir,
    } = st;
    let (dead, conflict) = holder.judge(listing);
    if let Some((name, lock)) = conflict {
        return Err(Failure::Other(repo::locked_message(remote, &name, &lock)));
    }
    if !dead.is_empty() {
        repo::unlock(remote, &dead).map_err(Failure::Link)?;
    }
    let creating = listing.config.is_none();
    let key = if creating {
        if let Some(p) = args.repo.pinned()
            && p != key.fingerprint()
        {
            return Err(Failure::Other(format!(
                "the repository {}/{} does not exist yet and this host's key would be {}, but `repo.key` pins {p}: refusing to make a repository the pinned key cannot read",
                remote.target(),
                args.repo.dir.display(),
                key.fingerprint()
            )));
        }
        if local.is_none() {
            // Kept before anything of it reaches the remote: a repository is never
            // made with a key this host lost.
            key.save(&key::local_key_path(local_dir))?;
        }
        key
    } else {
        repo::key_for(remote, listing, local, None)?
    };
    let target = remote.target();

    // Already committed (a rerun, or a resume after the commit): it must be ours.
    if let Some(text) = listing.texts.get(&format::snapshot_path(&args.stamp)) {
        let s = Snapshot::open(text, &key).map_err(|why| {
            format!(
                "{} exists on {target} and does not authenticate: {why}; a push never replaces it",
                format::snapshot_path(&args.stamp)
            )
        })?;
        if s.stamp != args.stamp {
            return Err(Failure::Other(format!(
                "{} on {target} is snapshot {} copied under another name; a push never replaces it",
                format::snapshot_path(&args.stamp),
                s.stamp
            )));
        }
        repo::unlock(remote, std::slice::from_ref(&holder.name)).map_err(Failure::Link)?;
        return Ok(outputs(args, &key, s.objects, 0, 0, s.bytes));
    }

    let there: BTreeSet<&str> = sources
        .keys()
        .filter(|id| {
            cache.objects.contains_key(*id) || listing.objects.contains_key(&object_path(id))
        })
        .map(String::as_str)
        .collect();
    let needed: Vec<&String> = sources
        .keys()
        .filter(|id| !there.contains(id.as_str()))
        .collect();
    let needed_plain: u64 = needed
        .iter()
        .map(|id| match &sources[*id] {
            Source::File(_, n) => *n,
            Source::Bytes(b) => b.len() as u64,
        })
        .sum();
    // Room there, judged before anything is sent: age adds little (32 bytes in 64 KiB
    // and a header), tar 512 bytes a file; an upload that would fill the disk half
    // way helps nobody.
    let wanted = needed_plain + needed_plain / 512 + 1024 * (needed.len() as u64 + 16);
    if let Some(room) = listing.room
        && room < wanted
    {
        return Err(Failure::Other(no_room(
            &target,
            &args.repo.dir,
            wanted,
            room,
        )));
    }

    let repo_recipient = key.recipient();
    let mut all: Vec<&(dyn age::Recipient + Sync)> = recipients
        .iter()
        .map(|r| r as &(dyn age::Recipient + Sync))
        .collect();
    all.push(&repo_recipient);
    let generation = match (&listing.generation, creating) {
        (Some(g), false) => g.clone(),
        _ => crypto::hex(&crypto::random_key().map_err(|e| e.to_string())?)[..16].to_string(),
    };
    let files = locals.iter().filter(|l| l.entry.kind == Kind::File).count() as u64;
    let plain_bytes: u64 = locals.iter().filter_map(|l| l.entry.size).sum();

    let sending = bar(needed_plain, format!("send to {target}"), ctx);
    let sender = Sender {
        remote,
        key: &key,
        recipients: &all,
        bar: sending.as_ref(),
    };
    let key_file = (format::key_path(&key.fingerprint()), key.wrap(recipients)?);
    let mut sent = Sent::default();
    // A new repository is made first, on its own and atomically (its config linked
    // last): a push that fails later leaves a valid, empty repository.
    if creating {
        let config = serde_json::to_vec(&Config::new(&key)).map_err(|e| e.to_string())?;
        let head = [
            key_file.clone(),
            (
                "generation".to_string(),
                format!("{generation}\n").into_bytes(),
            ),
            ("config".to_string(), config),
        ];
        sent.add(
            sender
                .send(&format!("{}.new", holder.name), "", &head, &[], &mut |_| {
                    Ok(Vec::new())
                })
                .map_err(Failure::Link)?,
        );
    }
    // The files' objects in batches that each commit there on their own.
    let objects: Vec<(String, &Source)> = needed
        .iter()
        .filter(|id| **id != &manifest_id)
        .map(|id| (object_path(id), &sources[*id]))
        .collect();
    let limit = upload::batch_bytes(needed_plain);
    sent.add(
        sender
            .send_batches(&holder.name, upload::batches(objects, limit))
            .map_err(Failure::Link)?,
    );
    // Last, the commit: the manifest (when new), the list of every object the
    // snapshot needs (checked there), and the snapshot file, linked last.
    let head: Vec<(String, Vec<u8>)> =
        if !creating && !listing.keys.contains(&format::key_path(&key.fingerprint())) {
            vec![key_file]
        } else {
            Vec::new()
        };
    let manifest_object: Vec<(String, &Source)> = if there.contains(manifest_id.as_str()) {
        Vec::new()
    } else {
        vec![(object_path(&manifest_id), &sources[&manifest_id])]
    };
    let mut snapshot_file: Vec<u8> = Vec::new();
    let last = sender.send(
        &holder.name,
        &args.stamp,
        &head,
        &manifest_object,
        &mut |sums| {
            let manifest_cipher = sums
                .get(&object_path(&manifest_id))
                .cloned()
                .or_else(|| {
                    cache.objects.get(&manifest_id).map(|b| Cipher {
                        sha256: String::new(),
                        bytes: *b,
                    })
                })
                .or_else(|| {
                    listing
                        .objects
                        .get(&object_path(&manifest_id))
                        .map(|b| Cipher {
                            sha256: String::new(),
                            bytes: *b,
                        })
                })
                .unwrap_or(Cipher {
                    sha256: String::new(),
                    bytes: 0,
                });
            let snapshot = Snapshot {
                format: format::FORMAT.into(),
                version: format::VERSION,
                stamp: args.stamp.clone(),
                created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                manifest: manifest_id.clone(),
                manifest_bytes: manifest_cipher.bytes,
                manifest_sha256: manifest_cipher.sha256,
                files,
                bytes: plain_bytes,
                objects: file_objects,
                mac: String::new(),
            };
            snapshot_file = snapshot.sign(&key);
            // Every object the snapshot needs, checked there before the commit:
            // a cache or a listing can be out of date, the remote's directory
            // cannot.
            let refs: String = sources
                .keys()
                .map(|id| format!("{}\n", &id[..16]))
                .collect();
            Ok(vec![
                ("REFS".to_string(), refs.into_bytes()),
                (format::snapshot_path(&args.stamp), snapshot_file.clone()),
            ])
        },
    );
    let last = match last {
        // Objects this host's record vouched for are not there (removed by hand, or
        // lost): the record is dropped, so the next attempt asks the repository.
        Err(super::ssh::SshError::Remote {
            code: 6, detail, ..
        }) => {
            cache.objects.clear();
            cache.save(local_dir)?;
            return Err(Failure::Other(format!(
                "objects this snapshot needs are not on {target}, though this host's record of the repository said they were: {detail}. The record is cleared; run the push again (`runbook resume` this run) and it sends what is missing"
            )));
        }
        other => other.map_err(Failure::Link)?,
    };
    sent.add(last);
    let committed = &sent;
    let stream_bytes = sent.bytes;
    let sent = &sent.sums;
    if let Some(b) = sending {
        b.finish_and_clear();
    }
    if committed.snapshot_existed {
        // Another push of the same stamp committed first: it must be ours too.
        let again = Listing::read(remote, Depth::Asked, None, &[]).map_err(|e| e.to_string())?;
        let ok = again
            .texts
            .get(&format::snapshot_path(&args.stamp))
            .and_then(|t| Snapshot::open(t, &key).ok())
            .is_some_and(|s| s.stamp == args.stamp);
        if !ok {
            return Err(Failure::Other(format!(
                "{} appeared on {target} during this push and does not authenticate; nothing was replaced",
                format::snapshot_path(&args.stamp)
            )));
        }
    }
    // Objects that were there already under a name this push sent keep their own
    // ciphertext: record its digest, so that checks compare the right one.
    let existing: BTreeMap<String, Cipher> = committed
        .existing
        .iter()
        .filter_map(|(path, sha)| {
            let id = path.rsplit('/').next()?.to_string();
            let bytes = sent.get(path).map(|c| c.bytes)?;
            Some((
                id,
                Cipher {
                    sha256: sha.clone(),
                    bytes,
                },
            ))
        })
        .collect();
    if !existing.is_empty() {
        let index = Index::new(existing).sign(&key);
        repo::put(remote, &format!("index/{}-existing", holder.name), &index)
            .map_err(Failure::Link)?;
    }

    // What this host now knows: the names of its files and what the repository holds.
    cache.key = key.fingerprint();
    cache.generation = generation;
    for id in sources.keys() {
        let bytes = sent
            .get(&object_path(id))
            .map(|c| c.bytes)
            .or_else(|| cache.objects.get(id).copied())
            .or_else(|| listing.objects.get(&object_path(id)).copied());
        if let Some(b) = bytes {
            cache.objects.insert(id.clone(), b);
        }
    }
    let live: BTreeSet<&str> = locals.iter().map(|l| l.stat.as_str()).collect();
    cache.files.retain(|k, _| live.contains(k.as_str()));
    for l in locals {
        if let Some(id) = &l.entry.object {
            cache.files.insert(l.stat.clone(), id.clone());
        }
    }
    cache.save(local_dir)?;
    // Counted like `objects`: the snapshot's contents, not its manifest.
    let objects_sent = needed
        .iter()
        .filter(|id| matches!(sources[**id], Source::File(..)))
        .count() as u64;
    Ok(outputs(
        args,
        &key,
        file_objects,
        objects_sent,
        stream_bytes,
        plain_bytes,
    ))
}

fn outputs(
    args: &PushArgs,
    key: &RepoKey,
    objects: u64,
    sent: u64,
    bytes_sent: u64,
    bytes_total: u64,
) -> Outputs {
    let mut out = Outputs::new();
    out.insert("stamp".into(), json!(args.stamp));
    out.insert("objects".into(), json!(objects));
    out.insert("objects_sent".into(), json!(sent));
    out.insert("bytes_sent".into(), json!(bytes_sent));
    out.insert("bytes_total".into(), json!(bytes_total));
    out.insert("verified".into(), json!(true));
    out.insert("key".into(), json!(key.fingerprint()));
    out
}
