//! Disaster recovery with the bundled runbooks: `atocore/offsite` ships a snapshot to a
//! real off-site host (`OffsiteHost`: Debian's sshd in a network namespace),
//! `atocore/offsite-list` shows it, and `atocore/recover` rebuilds AtoCore on a brand-new
//! host (`atocore-sandbox --empty`: its own paths, service and journal) from that copy
//! alone. The actions' own edge cases are in `offsite.rs`; these are the runbooks'.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::Digest;

use super::{Ato, Outcome, digest_but_shm, testkit, verdicts};
use crate::support::{OffsiteHost, tree_digest};

/// The off-site vars of a deployment: the host, the recipient, and (for recover) the
/// identity; written next to the sandbox's own vars.
pub(super) struct Offsite {
    vars: PathBuf,
    identity: PathBuf,
    recipient: String,
}

impl Offsite {
    /// An age identity (made by the testkit, with the engine's `age` crate) and a vars
    /// file for `host`, below `dir`.
    pub(super) fn new(host: &OffsiteHost, dir: &Path) -> Offsite {
        let identity = dir.join("age-identity.txt");
        let r = testkit(&["age-keygen", identity.to_str().unwrap()]);
        assert_eq!(r.code, 0, "{r:?}");
        let recipient = r.stdout.trim().to_string();
        assert!(recipient.starts_with("age1"), "{r:?}");
        let vars = dir.join("offsite.yaml");
        std::fs::write(
            &vars,
            format!(
                "{}age_recipients: [\"{recipient}\"]\nage_identity: \"{}\"\n",
                host.vars_yaml(),
                identity.display()
            ),
        )
        .unwrap();
        Offsite {
            vars,
            identity,
            recipient,
        }
    }

    pub(super) fn vars(&self) -> String {
        self.vars.display().to_string()
    }

    /// The identity's secret line and the ssh private key's body: what must never
    /// appear in a plan, log, journal or output.
    fn secrets(&self, host: &OffsiteHost) -> Vec<String> {
        let identity = std::fs::read_to_string(&self.identity).unwrap();
        let secret = identity
            .lines()
            .find(|l| l.starts_with("AGE-SECRET-KEY-"))
            .unwrap()
            .to_string();
        let key = std::fs::read_to_string(&host.ssh_key).unwrap();
        let body: Vec<String> = key
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() > 20)
            .map(str::to_string)
            .collect();
        assert!(
            !body.is_empty(),
            "no key body in {}",
            host.ssh_key.display()
        );
        std::iter::once(secret).chain(body).collect()
    }
}

/// `run NAME` with the sandbox's vars and the off-site vars.
fn run(ato: &Ato, off: &Offsite, name: &str, extra: &[&str]) -> Outcome {
    let vars = off.vars();
    let mut args = vec!["--vars", vars.as_str()];
    args.extend_from_slice(extra);
    ato.run(name, &args)
}

fn plan(ato: &Ato, off: &Offsite, name: &str, extra: &[&str]) -> Outcome {
    let vars = off.vars();
    let mut args = vec!["--vars", vars.as_str()];
    args.extend_from_slice(extra);
    ato.plan(name, &args)
}

/// A brand-new host: paths, service and journal of its own, no data.
fn new_host() -> Ato {
    let ato = Ato::with(&["--empty"]);
    assert!(!ato.db().exists() && !ato.chroma().exists());
    ato
}

/// Every file's bytes below the given roots, and whether any holds one of `secrets`.
fn leaks(roots: &[&Path], texts: &[&str], secrets: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    let mut check = |what: String, bytes: &[u8]| {
        for s in secrets {
            if bytes.windows(s.len()).any(|w| w == s.as_bytes()) {
                found.push(format!("{what} holds `{}...`", &s[..12]));
            }
        }
    };
    for root in roots {
        for e in walkdir::WalkDir::new(root).into_iter().flatten() {
            if e.file_type().is_file() {
                check(
                    e.path().display().to_string(),
                    &std::fs::read(e.path()).unwrap(),
                );
            }
        }
    }
    for (i, t) in texts.iter().enumerate() {
        check(format!("output {i}"), t.as_bytes());
    }
    found
}

/// The data a recovered host must hold: the snapshot's database, registry and vector
/// store, byte for byte.
fn assert_recovered(new: &Ato, snapshot: &Path) {
    assert_eq!(
        std::fs::read(new.db()).unwrap(),
        std::fs::read(snapshot.join("db/atocore.db")).unwrap(),
        "the database is not the snapshot's"
    );
    assert_eq!(
        std::fs::read(new.registry()).unwrap(),
        std::fs::read(snapshot.join("config/project-registry.json")).unwrap()
    );
    assert_eq!(
        tree_digest(&new.chroma()),
        tree_digest(&snapshot.join("chroma"))
    );
    let m = std::fs::metadata(new.db()).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (1000, 1000, 0o600));
}

fn snapshot_stamps(ato: &Ato) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(ato.snapshots())
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn offsite_then_recover_onto_a_new_host_gives_the_snapshot_and_passes_verify() {
    let host = OffsiteHost::start();
    let old = Ato::new();
    let off = Offsite::new(&host, old.dir());
    // Most of a real vector store's bytes are its vectors: a 16 MiB segment file, so the
    // snapshot's size is where the 1% bound is meant (ssh handshakes cost ~100 KB).
    let segment = old.chroma().join("6f1c2b1e-0000-4000-8000-000000000001");
    std::fs::create_dir(&segment).unwrap();
    let mut vectors = vec![0u8; 16 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in vectors.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(segment.join("data_level0.bin"), &vectors).unwrap();
    // Owned as the sandbox's files are (the deployment's container user).
    for p in [segment.join("data_level0.bin"), segment.clone()] {
        std::os::unix::fs::chown(&p, Some(1000), Some(1000)).unwrap();
    }
    old.start_service();
    let stamp = old.backup(true);

    // The plan connects read-only: it says what would be sent and writes nothing,
    // locally or on the off-site host.
    let local = digest_but_shm(old.dir());
    let remote = tree_digest(&host.repo_dir);
    let p = plan(&old, &off, "atocore/offsite", &[]);
    assert_eq!(p.code, 0, "{p:?}");
    let steps = verdicts(&p.json()["steps"]);
    let push = steps.iter().find(|s| s.0 == "push").unwrap();
    assert_eq!(push.1, "will-change", "{p:?}");
    assert!(
        push.2
            .contains(&format!("as {stamp} to root@{}:22", host.host))
            && push.2.contains("encrypt and send "),
        "{push:?}"
    );
    assert_eq!(digest_but_shm(old.dir()), local, "the plan wrote locally");
    assert_eq!(
        tree_digest(&host.repo_dir),
        remote,
        "the plan wrote remotely"
    );

    // Ship it; the list shows it verified.
    let shipped = run(&old, &off, "atocore/offsite", &["--set", "stamp=latest"]);
    assert_eq!(shipped.code, 0, "{shipped:?}");
    let out = shipped.outputs();
    assert_eq!(
        (out["stamp"].as_str(), out["verified"].as_bool()),
        (Some(stamp.as_str()), Some(true))
    );
    let listed = run(&old, &off, "atocore/offsite-list", &[]);
    assert_eq!(listed.code, 0, "{listed:?}");
    let snaps = listed.outputs()["snapshots"].clone();
    assert_eq!(snaps.as_array().unwrap().len(), 1, "{snaps}");
    assert_eq!(snaps[0]["stamp"], stamp.as_str());
    assert_eq!(snaps[0]["verified"], true);
    assert_eq!(listed.outputs()["latest"], stamp.as_str());

    // A second backup of the unchanged deployment ships at most 1% of its bytes, as
    // counted on the link.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let second = old.backup(true);
    let before = host.bytes_crossed();
    let again = run(
        &old,
        &off,
        "atocore/offsite",
        &["--set", &format!("stamp={second}")],
    );
    assert_eq!(again.code, 0, "{again:?}");
    let crossed = host.bytes_crossed() - before;
    let total = again.outputs()["bytes_total"].as_u64().unwrap();
    assert!(
        total > 16 << 20 && crossed * 100 <= total,
        "the unchanged second push crossed {crossed} bytes of {total}"
    );
    old.stop_service();

    // The host is lost. A new one, from the off-site copy alone: the plan says what it
    // would fetch and writes nothing.
    let new = new_host();
    let before_plan = tree_digest(new.dir());
    let p = plan(&new, &off, "atocore/recover", &[]);
    assert_eq!(p.code, 0, "{p:?}");
    let steps = verdicts(&p.json()["steps"]);
    let fetch = steps.iter().find(|s| s.0 == "fetch").unwrap();
    assert_eq!(fetch.1, "will-change", "{p:?}");
    assert!(
        fetch.2.starts_with(&format!(
            "fetch snapshot {second} from root@{}:22: ",
            host.host
        )),
        "{fetch:?}"
    );
    assert_eq!(
        tree_digest(new.dir()),
        before_plan,
        "the recover plan wrote"
    );

    let rec = run(&new, &off, "atocore/recover", &["--yes"]);
    assert_eq!(rec.code, 0, "{rec:?}");
    assert_eq!(rec.outputs()["recovered"], second.as_str());
    assert_eq!(rec.outputs()["documents"], 60);
    assert_recovered(&new, &old.snapshot(&second));
    // The fetched snapshot is the new host's first local one, whole, and valid.
    assert_eq!(snapshot_stamps(&new), std::slice::from_ref(&second));
    // Owners are not recorded off-site (the fetched snapshot belongs to whoever runs
    // recover); names, types, modes and bytes are the snapshot's.
    let without_owner = |root: &Path| -> BTreeMap<PathBuf, String> {
        content_digest(root)
            .into_iter()
            .map(|(p, d)| (p, d.rsplit_once(' ').unwrap().0.to_string()))
            .collect()
    };
    assert_eq!(
        without_owner(&new.snapshot(&second)),
        without_owner(&old.snapshot(&second))
    );
    let (status, stats) = new.get("/stats");
    assert_eq!((status, stats["documents"].as_u64()), (200, Some(60)));

    // Run again on what is now a live host: refused, in the plan and the run, and the
    // live data stays byte-identical.
    new.stop_service();
    let live = digest_but_shm(&new.data());
    let p = plan(&new, &off, "atocore/recover", &[]);
    assert_eq!(p.code, 3, "{p:?}");
    let steps = verdicts(&p.json()["steps"]);
    let refused = steps.iter().find(|s| s.0 == "new-host").unwrap();
    assert_eq!(refused.1, "would-fail");
    assert!(
        refused.2.contains(&format!(
            "a live database exists at {}: this is not a new host",
            new.db().display()
        )) && refused.2.contains("use atocore/restore"),
        "{refused:?}"
    );
    let r = run(&new, &off, "atocore/recover", &["--yes"]);
    assert_ne!(r.code, 0, "{r:?}");
    assert_eq!(
        digest_but_shm(&new.data()),
        live,
        "a refused recover changed live data"
    );

    // No plan, log, journal or output of either host holds the identity or the ssh key.
    let secrets = off.secrets(&host);
    let texts: Vec<&str> = [&shipped, &listed, &again, &rec, &r, &p]
        .iter()
        .flat_map(|o| [o.stdout.as_str(), o.stderr.as_str()])
        .collect();
    let found = leaks(
        &[
            &old.p("state"),
            &new.p("state"),
            &old.p("run"),
            &new.p("run"),
            &host.repo_dir,
        ],
        &texts,
        &secrets,
    );
    assert!(found.is_empty(), "secrets leaked: {found:?}");
    assert!(!off.recipient.is_empty());
}

#[test]
fn recover_refuses_a_wrong_identity_a_missing_var_and_damage_before_touching_live_paths() {
    let host = OffsiteHost::start();
    let old = Ato::new();
    let off = Offsite::new(&host, old.dir());
    let stamp = old.backup(true);
    let r = run(&old, &off, "atocore/offsite", &[]);
    assert_eq!(r.code, 0, "{r:?}");
    let new = new_host();
    let untouched = live_paths(&new);

    // A var not given: the plan names it, and nothing runs.
    let bare = new.plan("atocore/recover", &[]);
    assert_eq!(bare.code, 2, "{bare:?}");
    assert!(
        bare.error()
            .starts_with("missing required params:\n  offsite_host (string): ")
            && bare.error().contains("\n  age_identity (path): "),
        "{bare:?}"
    );

    // An identity file that is missing, or holds another key: the plan fails at
    // `fetch`, naming `identity` and the file.
    let missing = new.p("no-such-identity.txt");
    let other = new.p("other-identity.txt");
    assert_eq!(testkit(&["age-keygen", other.to_str().unwrap()]).code, 0);
    for (identity, why) in [(&missing, "missing"), (&other, "cannot decrypt")] {
        let set = format!("age_identity={}", identity.display());
        let p = plan(&new, &off, "atocore/recover", &["--set", &set]);
        assert_eq!(p.code, 3, "{why}: {p:?}");
        let steps = verdicts(&p.json()["steps"]);
        let fetch = steps.iter().find(|s| s.0 == "fetch").unwrap();
        assert_eq!(fetch.1, "would-fail", "{why}: {p:?}");
        assert!(
            fetch.2.contains("`identity`") && fetch.2.contains(&identity.display().to_string()),
            "{why}: {fetch:?}"
        );
        let r = run(&new, &off, "atocore/recover", &["--set", &set, "--yes"]);
        assert_ne!(r.code, 0, "{why}: {r:?}");
        assert_eq!(
            live_paths(&new),
            untouched,
            "{why}: the new host's live paths changed"
        );
    }

    // One byte of one object flipped on the remote: recover refuses naming the object,
    // before anything reaches the live paths; the list says it is not verified.
    let objects: Vec<PathBuf> = walkdir::WalkDir::new(host.repo_dir.join("objects"))
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .map(|e| e.into_path())
        .collect();
    let victim = objects
        .iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(victim).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(victim, &bytes).unwrap();
    let id = victim.file_name().unwrap().to_string_lossy().into_owned();
    let r = run(&new, &off, "atocore/recover", &["--yes"]);
    assert_ne!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.contains(&id),
        "the refusal does not name object {id}: {r:?}"
    );
    assert!(
        r.stdout.contains("An older snapshot may be whole: `offsite-list` (atocore/offsite-list) shows which are still verified"),
        "the refusal does not say what to do next: {r:?}"
    );
    assert!(
        !new.db().exists() && !new.chroma().exists(),
        "live paths written"
    );
    assert!(
        snapshot_stamps(&new).is_empty(),
        "a damaged snapshot was kept"
    );
    let listed = run(&old, &off, "atocore/offsite-list", &[]);
    assert_eq!(listed.code, 0, "{listed:?}");
    let snap = &listed.outputs()["snapshots"][0];
    assert_eq!(
        (snap["stamp"].as_str(), snap["verified"].as_bool()),
        (Some(stamp.as_str()), Some(false))
    );
    assert!(snap["problems"].to_string().contains(&id), "{snap}");
    bytes[at] ^= 0x01;
    std::fs::write(victim, &bytes).unwrap();

    // The manifest truncated: refused the same way.
    let manifest = host
        .repo_dir
        .join(format!("snapshots/{stamp}/manifest.age"));
    let whole = std::fs::read(&manifest).unwrap();
    std::fs::write(&manifest, &whole[..whole.len() - 7]).unwrap();
    let r = run(&new, &off, "atocore/recover", &["--yes"]);
    assert_ne!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("manifest"), "{r:?}");
    assert!(
        !new.db().exists() && !new.chroma().exists(),
        "live paths written"
    );
    std::fs::write(&manifest, &whole).unwrap();

    // The off-site host unreachable (its link cut): the plan and the run fail naming
    // it, and nothing reaches the live paths; with the link back, recovery goes on.
    host.link_down();
    let p = plan(&new, &off, "atocore/recover", &[]);
    let r = run(&new, &off, "atocore/recover", &["--yes"]);
    host.link_up();
    assert_eq!(p.code, 3, "{p:?}");
    let steps = verdicts(&p.json()["steps"]);
    let fetch = steps.iter().find(|s| s.0 == "fetch").unwrap();
    assert_eq!(fetch.1, "would-fail", "{p:?}");
    assert!(fetch.2.contains(&host.host), "{fetch:?}");
    assert_ne!(r.code, 0, "{r:?}");
    assert!(
        !new.db().exists() && !new.chroma().exists(),
        "live paths written"
    );

    // Repaired, the same new host recovers.
    let r = run(&new, &off, "atocore/recover", &["--yes"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_recovered(&new, &old.snapshot(&stamp));
    new.stop_service();
}

/// The new host's live paths (data and config dirs), mtimes and all.
fn live_paths(new: &Ato) -> (BTreeMap<PathBuf, String>, BTreeMap<PathBuf, String>) {
    (
        tree_digest(&new.data()),
        tree_digest(&new.root().join("config")),
    )
}

/// Relative path -> type, mode, owner and content (or link target) of everything below
/// `root`: what two hosts recovered at different times must agree on (not mtimes of
/// the directories each made).
fn content_digest(root: &Path) -> BTreeMap<PathBuf, String> {
    walkdir::WalkDir::new(root)
        .sort_by_file_name()
        .into_iter()
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy();
            !name.ends_with("-shm") && !name.ends_with("-wal")
        })
        .map(|e| {
            let m = e.path().symlink_metadata().unwrap();
            let what = if m.file_type().is_symlink() {
                format!("link {}", std::fs::read_link(e.path()).unwrap().display())
            } else if m.is_dir() {
                "dir".to_string()
            } else {
                let data = std::fs::read(e.path()).unwrap();
                format!(
                    "file {}",
                    runbook::actions::files::hex(&sha2::Sha256::digest(&data))
                )
            };
            let rel = e.path().strip_prefix(root).unwrap().to_path_buf();
            (
                rel,
                format!("{what} {:o} {}:{}", m.mode() & 0o7777, m.uid(), m.gid()),
            )
        })
        .collect()
}

/// What a finished recover leaves on the new host, for comparing an interrupted and
/// resumed one with an uninterrupted one: the data, the local snapshot, and the names
/// at the top of the data and backup dirs (no fetch staging left behind).
fn end_state(new: &Ato) -> (BTreeMap<PathBuf, String>, Vec<String>, Vec<String>) {
    let mut data = content_digest(&new.data());
    let names = |dir: PathBuf| -> Vec<String> {
        let mut n: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with("-shm") && !n.ends_with("-wal"))
            .collect();
        n.sort();
        n
    };
    let snaps = content_digest(&new.snapshots());
    data.extend(
        snaps
            .into_iter()
            .map(|(p, d)| (Path::new("SNAPSHOTS").join(p), d)),
    );
    (data, names(new.data()), names(new.root().join("backups")))
}

/// `run NAME` SIGKILLed at `point` (`RUNBOOK_FAILPOINT`), then `runbook resume`, which
/// must succeed; the run's id.
fn killed_then_resumed(ato: &Ato, off: &Offsite, name: &str, point: &str) -> String {
    let (sandbox, vars) = (ato.vars(), off.vars());
    let killed = ato
        .cmd(&["run", name, "--vars", &sandbox, "--vars", &vars, "--yes"])
        .env("RUNBOOK_FAILPOINT", point)
        .output()
        .unwrap();
    assert_eq!(
        killed.status.code(),
        None,
        "{point}: not killed: {killed:?}"
    );
    let id = String::from_utf8_lossy(&killed.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();
    let r = ato.runbook(&["resume", &id, "--yes"]);
    assert_eq!(r.code, 0, "{point}: {r:?}");
    id
}

#[test]
fn offsite_and_recover_killed_at_any_step_resume_to_the_same_end_state() {
    let host = OffsiteHost::start();
    let old = Ato::new();
    let off = Offsite::new(&host, old.dir());
    let stamp = old.backup(true);

    // atocore/offsite, killed before and after its push and after validating.
    for point in ["before:push", "after:push"] {
        killed_then_resumed(&old, &off, "atocore/offsite", point);
        let listed = run(&old, &off, "atocore/offsite-list", &[]);
        let snaps = &listed.outputs()["snapshots"];
        assert_eq!(snaps.as_array().unwrap().len(), 1, "{point}: {snaps}");
        assert_eq!(
            (snaps[0]["stamp"].as_str(), snaps[0]["verified"].as_bool()),
            (Some(stamp.as_str()), Some(true)),
            "{point}"
        );
    }

    // An uninterrupted recover, for the end state to compare with.
    let reference = new_host();
    let r = run(&reference, &off, "atocore/recover", &["--yes"]);
    assert_eq!(r.code, 0, "{r:?}");
    reference.stop_service();
    let expected = end_state(&reference);

    // atocore/recover killed at each step (before its effect, or after it and before
    // the journal has its result), then resumed.
    for point in [
        "before:fetch",
        "after:fetch",
        "after:snapshots-dir",
        "before:place",
        "after:place",
        "after:stop/process-stop",
        "after:db-dir",
        "after:db-dir-owner",
        "before:db",
        "after:db",
        "after:registry",
        "before:chroma",
        "after:chroma",
        "after:start/process-start",
        "after:verify/health",
    ] {
        let new = new_host();
        let id = killed_then_resumed(&new, &off, "atocore/recover", point);
        assert_eq!(new.run_status(&id), "succeeded", "{point}");
        assert_recovered(&new, &old.snapshot(&stamp));
        new.stop_service();
        assert_eq!(
            end_state(&new),
            expected,
            "{point}: not the uninterrupted end state"
        );
    }
}
