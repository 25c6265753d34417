//! Disaster recovery with the bundled runbooks: `atocore/offsite` ships a snapshot to a
//! real off-site host (`OffsiteHost`: Debian's sshd in a network namespace),
//! `atocore/offsite-list` shows it, and `atocore/recover` rebuilds AtoCore on a brand-new
//! host (`atocore-sandbox --empty`: its own paths, service and journal) from that copy
//! alone, trusting the repository through the key fingerprint the push printed (pinned
//! as `offsite_key`), and `atocore/offsite-check` verifies it there. The actions' own
//! edge cases are in `offsite.rs`; these are the runbooks'.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::Digest;

use serde_json::Value as Json;

use super::{Ato, Outcome, copy_tree, corrupt_page, digest_but_shm, testkit, verdicts};
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

    /// Records the repository key's fingerprint `key` (what the first push printed) as
    /// `offsite_key` in the vars file, as the operator does with the identity: every
    /// later run, on either host, pins it. Once per test.
    pub(super) fn pin(&self, key: &str) {
        assert!(
            key.len() == 32
                && key
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "not a key fingerprint: {key:?}"
        );
        let mut text = std::fs::read_to_string(&self.vars).unwrap();
        assert!(!text.contains("offsite_key:"), "pinned twice");
        text.push_str(&format!("offsite_key: \"{key}\"\n"));
        std::fs::write(&self.vars, text).unwrap();
    }

    /// `--set offsite_identity=...`: what offsite-list and offsite-check need on a host
    /// that does not keep the repository key.
    pub(super) fn identity_set(&self) -> String {
        format!("offsite_identity={}", self.identity.display())
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

/// The snapshots an `atocore/offsite-list` run reports, by stamp, newest first.
fn snapshots_of(r: &Outcome) -> Vec<(String, Json)> {
    assert_eq!(r.code, 0, "{r:?}");
    r.outputs()["snapshots"]
        .as_array()
        .unwrap_or_else(|| panic!("no snapshots: {r:?}"))
        .iter()
        .map(|s| (s["stamp"].as_str().unwrap().to_string(), s.clone()))
        .collect()
}

/// `(authenticated, complete, verified)` of a listed snapshot.
fn trust(snapshot: &Json) -> (bool, bool, bool) {
    let flag = |k: &str| {
        snapshot[k]
            .as_bool()
            .unwrap_or_else(|| panic!("no {k}: {snapshot}"))
    };
    (flag("authenticated"), flag("complete"), flag("verified"))
}

/// The snapshot file of `stamp` in the repository (v2: one file, linked last), and the
/// path of the manifest object it names.
fn snapshot_files(host: &OffsiteHost, stamp: &str) -> (PathBuf, PathBuf) {
    let file = host.repo_dir.join(format!("snapshots/{stamp}"));
    assert!(file.is_file(), "no snapshot file {}", file.display());
    let snapshot: Json = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let id = snapshot["manifest"].as_str().unwrap();
    let manifest = host.repo_dir.join(format!("objects/{}/{id}", &id[..2]));
    assert!(
        manifest.is_file(),
        "no manifest object {}",
        manifest.display()
    );
    (file, manifest)
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
            .starts_with("create the repository (a new key) and send all 13 files (")
            && push.2.contains(&format!(
                "), encrypted, as {stamp} to root@{}:22; verified there by digest before the snapshot is committed",
                host.host
            )),
        "{push:?}"
    );
    assert_eq!(digest_but_shm(old.dir()), local, "the plan wrote locally");
    assert_eq!(
        tree_digest(&host.repo_dir),
        remote,
        "the plan wrote remotely"
    );

    // Ship it: committed by its snapshot file, and the repository key's fingerprint is
    // printed (the operator records it with the identity). The list shows it
    // authenticated and complete, under that key, never checked yet.
    let shipped = run(&old, &off, "atocore/offsite", &["--set", "stamp=latest"]);
    assert_eq!(shipped.code, 0, "{shipped:?}");
    let out = shipped.outputs();
    assert_eq!(
        (out["stamp"].as_str(), out["verified"].as_bool()),
        (Some(stamp.as_str()), Some(true))
    );
    let key = out["key"].as_str().unwrap().to_string();
    snapshot_files(&host, &stamp);
    let listed = run(&old, &off, "atocore/offsite-list", &[]);
    let snaps = snapshots_of(&listed);
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert_eq!(snaps[0].0, stamp);
    assert_eq!(trust(&snaps[0].1), (true, true, true), "{snaps:?}");
    assert_eq!(snaps[0].1["last_checked"], Json::Null, "{snaps:?}");
    assert_eq!(listed.outputs()["latest"], stamp.as_str());
    assert_eq!(listed.outputs()["key"], key.as_str());
    off.pin(&key);

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
    // Pinned, the push checked that the repository is still the one it made.
    assert_eq!(again.outputs()["key"], key.as_str());
    snapshot_files(&host, &second);

    // The weekly check (atocore/offsite-check): its plan hashes nothing and writes
    // nothing; the run has the remote hash every object (subset all), finds nothing
    // wrong, and records it there, which the list shows as each snapshot's last check.
    let remote = tree_digest(&host.repo_dir);
    let p = plan(&old, &off, "atocore/offsite-check", &[]);
    assert_eq!(p.code, 0, "{p:?}");
    let steps = verdicts(&p.json()["steps"]);
    let check = steps.iter().find(|s| s.0 == "check").unwrap();
    assert_eq!(check.1, "will-change", "{p:?}");
    assert!(
        check.2.starts_with(&format!(
            "check 2 snapshots on root@{}:22: the remote hashes 10% of ",
            host.host
        )),
        "{check:?}"
    );
    assert_eq!(tree_digest(&host.repo_dir), remote, "the check plan wrote");
    let checked = run(
        &old,
        &off,
        "atocore/offsite-check",
        &["--set", "subset=all"],
    );
    assert_eq!(checked.code, 0, "{checked:?}");
    let out = checked.outputs();
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["problems"], serde_json::json!([]), "{out}");
    assert_eq!(out["snapshots"], 2, "{out}");
    assert!(
        out["bytes_total"].as_u64().unwrap() > 16 << 20
            && out["bytes_checked"] == out["bytes_total"],
        "{out}"
    );
    let checked_list = run(&old, &off, "atocore/offsite-list", &[]);
    for (stamp, s) in snapshots_of(&checked_list) {
        assert_eq!(trust(&s), (true, true, true), "{stamp}: {s}");
        assert!(s["last_checked"].is_string(), "{stamp}: {s}");
        assert_eq!(
            s["last_check_problems"],
            serde_json::json!([]),
            "{stamp}: {s}"
        );
    }
    old.stop_service();

    // The host is lost. A new one, from the off-site copy alone (the identity and the
    // pinned key): the list shows what survives, authenticated by the key the identity
    // unwraps, which is the pinned one; the plan says what it would fetch and writes
    // nothing.
    let new = new_host();
    let survives = run(
        &new,
        &off,
        "atocore/offsite-list",
        &["--set", &off.identity_set()],
    );
    let snaps = snapshots_of(&survives);
    assert_eq!(
        snaps.iter().map(|s| s.0.as_str()).collect::<Vec<_>>(),
        [second.as_str(), stamp.as_str()]
    );
    for (stamp, s) in &snaps {
        assert_eq!(trust(s), (true, true, true), "{stamp}: {s}");
    }
    assert_eq!(survives.outputs()["latest"], second.as_str());
    assert_eq!(survives.outputs()["key"], key.as_str());
    let before_plan = tree_digest(new.dir());
    let p = plan(&new, &off, "atocore/recover", &[]);
    assert_eq!(p.code, 0, "{p:?}");
    let steps = verdicts(&p.json()["steps"]);
    let fetch = steps.iter().find(|s| s.0 == "fetch").unwrap();
    assert_eq!(fetch.1, "will-change", "{p:?}");
    assert!(
        fetch.2.starts_with(&format!(
            "fetch snapshot {second} from root@{}:22 (authenticated by key {key}): ",
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
    assert_eq!(rec.outputs()["key"], key.as_str());
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
    let texts: Vec<&str> = [
        &shipped,
        &listed,
        &again,
        &checked,
        &checked_list,
        &survives,
        &rec,
        &r,
        &p,
    ]
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
    let key = r.outputs()["key"].as_str().unwrap().to_string();
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

    // The repository key not pinned: a new host has no key of its own, so the plan
    // fails at `fetch` saying to give its fingerprint as `repo.key` (and which one the
    // repository claims, to compare with the recorded one); the run is refused, and
    // nothing reaches the live paths. The list refuses the same way.
    let p = plan(&new, &off, "atocore/recover", &[]);
    assert_eq!(p.code, 3, "{p:?}");
    let steps = verdicts(&p.json()["steps"]);
    let fetch = steps.iter().find(|s| s.0 == "fetch").unwrap();
    assert_eq!(fetch.1, "would-fail", "{p:?}");
    assert!(
        fetch
            .2
            .starts_with("give the repository key's fingerprint as `repo.key`")
            && fetch.2.contains(&format!("says its key is {key}")),
        "{fetch:?}"
    );
    let r = run(&new, &off, "atocore/recover", &["--yes"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(r.error().contains("`repo.key`"), "{r:?}");
    assert_eq!(live_paths(&new), untouched, "unpinned: live paths changed");
    assert!(snapshot_stamps(&new).is_empty());
    let l = run(
        &new,
        &off,
        "atocore/offsite-list",
        &["--set", &off.identity_set()],
    );
    assert_ne!(l.code, 0, "{l:?}");
    assert!(l.stdout.contains("`repo.key`"), "{l:?}");
    // Another fingerprint pinned (the repository was replaced, or the wrong one was
    // recorded): refused, naming the pinned one.
    let wrong = "0123456789abcdef0123456789abcdef";
    let set = format!("offsite_key={wrong}");
    let p = plan(&new, &off, "atocore/recover", &["--set", &set]);
    assert_eq!(p.code, 3, "{p:?}");
    let steps = verdicts(&p.json()["steps"]);
    let fetch = steps.iter().find(|s| s.0 == "fetch").unwrap();
    assert_eq!(fetch.1, "would-fail", "{p:?}");
    assert!(
        fetch
            .2
            .contains(&format!("holds no key {wrong} (`repo.key`)"))
            && fetch.2.contains(&format!("says its key is {key}")),
        "{fetch:?}"
    );
    let r = run(&new, &off, "atocore/recover", &["--set", &set, "--yes"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert_eq!(live_paths(&new), untouched, "wrong pin: live paths changed");
    // Not a fingerprint at all: refused as a param, before anything is planned.
    let p = plan(
        &new,
        &off,
        "atocore/recover",
        &["--set", "offsite_key=none"],
    );
    assert_eq!(p.code, 2, "{p:?}");
    assert!(p.error().contains("param `offsite_key`"), "{p:?}");
    off.pin(&key);

    // An identity file that is missing, or holds another key: the plan fails at
    // `fetch`, naming `identity` and the file (the one that cannot decrypt: the
    // repository key it could not unwrap).
    let missing = new.p("no-such-identity.txt");
    let other = new.p("other-identity.txt");
    assert_eq!(testkit(&["age-keygen", other.to_str().unwrap()]).code, 0);
    let named = [
        missing.display().to_string(),
        format!(
            "the identity `{}` cannot decrypt the repository key keys/{key}.age",
            other.display()
        ),
    ];
    for ((identity, why), named) in [(&missing, "missing"), (&other, "cannot decrypt")]
        .into_iter()
        .zip(&named)
    {
        let set = format!("age_identity={}", identity.display());
        let p = plan(&new, &off, "atocore/recover", &["--set", &set]);
        assert_eq!(p.code, 3, "{why}: {p:?}");
        let steps = verdicts(&p.json()["steps"]);
        let fetch = steps.iter().find(|s| s.0 == "fetch").unwrap();
        assert_eq!(fetch.1, "would-fail", "{why}: {p:?}");
        assert!(
            fetch.2.contains("`identity`") && fetch.2.contains(named.as_str()),
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
    // before anything reaches the live paths; offsite-check (the remote's digests)
    // fails naming it, and the list shows that check's problem.
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
        r.stdout.contains("An older snapshot may be whole: `offsite-list` (atocore/offsite-list) shows which are still authenticated and complete"),
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
    let check = run(
        &old,
        &off,
        "atocore/offsite-check",
        &["--set", "subset=all"],
    );
    assert_eq!(check.code, 1, "{check:?}");
    assert!(
        check.stdout.contains(&format!(
            "snapshot {stamp}: objects/{}/{id} does not match its digest (damaged)",
            &id[..2]
        )),
        "the check does not name object {id}: {check:?}"
    );
    let listed = run(&old, &off, "atocore/offsite-list", &[]);
    let snaps = snapshots_of(&listed);
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert_eq!(snaps[0].0, stamp);
    assert!(snaps[0].1["last_checked"].is_string(), "{snaps:?}");
    assert!(
        snaps[0].1["last_check_problems"].to_string().contains(&id),
        "{snaps:?}"
    );
    bytes[at] ^= 0x01;
    std::fs::write(victim, &bytes).unwrap();
    // Repaired, the snapshot stays suspect for `latest` until a check finds it whole:
    // what the check found is not forgotten because the bytes look right again.
    let r = run(&new, &off, "atocore/recover", &["--yes"]);
    assert_ne!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.contains("the last offsite-check found") && r.stdout.contains(&id),
        "{r:?}"
    );
    let check = run(
        &old,
        &off,
        "atocore/offsite-check",
        &["--set", "subset=all"],
    );
    assert_eq!(check.code, 0, "{check:?}");

    // The manifest object truncated, or the snapshot file (which authenticates it):
    // refused the same way, naming what is wrong.
    let (snapshot_file, manifest) = snapshot_files(&host, &stamp);
    for (what, file, named) in [
        ("manifest", &manifest, "manifest"),
        ("snapshot file", &snapshot_file, stamp.as_str()),
    ] {
        let whole = std::fs::read(file).unwrap();
        std::fs::write(file, &whole[..whole.len() - 7]).unwrap();
        let r = run(&new, &off, "atocore/recover", &["--yes"]);
        assert_ne!(r.code, 0, "{what}: {r:?}");
        assert!(r.stdout.contains(named), "{what}: {r:?}");
        assert!(
            !new.db().exists() && !new.chroma().exists(),
            "{what}: live paths written"
        );
        assert!(snapshot_stamps(&new).is_empty(), "{what}: kept");
        std::fs::write(file, &whole).unwrap();
    }

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

    // atocore/offsite, killed before and after its push and after validating: one
    // snapshot, committed (its file there), authenticated and complete, under one key.
    let mut keys = BTreeSet::new();
    for point in ["before:push", "after:push"] {
        killed_then_resumed(&old, &off, "atocore/offsite", point);
        let listed = run(&old, &off, "atocore/offsite-list", &[]);
        let snaps = snapshots_of(&listed);
        assert_eq!(snaps.len(), 1, "{point}: {snaps:?}");
        assert_eq!(snaps[0].0, stamp, "{point}");
        assert_eq!(trust(&snaps[0].1), (true, true, true), "{point}: {snaps:?}");
        snapshot_files(&host, &stamp);
        keys.insert(listed.outputs()["key"].as_str().unwrap().to_string());
    }
    assert_eq!(keys.len(), 1, "{keys:?}");
    // The new hosts pin the key the pushing host printed.
    off.pin(keys.first().unwrap());

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

/// `--set backup_dir=X` reaches the validator: `atocore/offsite` validates the very
/// directory it would ship (a called runbook takes its params from the call and the
/// vars files, never from `--set`, so everything is passed to it). X holds a snapshot
/// whose database fails `integrity_check` under the same stamp as the good one in the
/// vars file's backup_dir: the plan and the run are refused naming it, and nothing is
/// shipped. With X repaired, the same command ships X's snapshot, validated in X.
#[test]
fn offsite_with_another_backup_dir_validates_what_it_ships_and_refuses_a_broken_snapshot() {
    let host = OffsiteHost::start();
    let old = Ato::new();
    let off = Offsite::new(&host, old.dir());
    let stamp = old.backup(true);
    let elsewhere = old.p("elsewhere/backups");
    let broken = elsewhere.join("snapshots").join(&stamp);
    copy_tree(&old.snapshot(&stamp), &broken);
    let good_db = std::fs::read(broken.join("db/atocore.db")).unwrap();
    corrupt_page(&broken.join("db/atocore.db"));
    let set = format!("backup_dir={}", elsewhere.display());
    let why = format!(
        "snapshot {stamp} is not valid (db_integrity_check_failed): refusing to rely on it"
    );
    let local = digest_but_shm(old.dir());
    let remote = tree_digest(&host.repo_dir);

    // Both `latest` (resolved in X) and the stamp named.
    for extra in [None, Some(format!("stamp={stamp}"))] {
        let mut args = vec!["--set", set.as_str()];
        if let Some(e) = &extra {
            args.extend(["--set", e.as_str()]);
        }
        let p = plan(&old, &off, "atocore/offsite", &args);
        assert_eq!(p.code, 3, "{extra:?}: {p:?}");
        let steps = verdicts(&p.json()["steps"]);
        assert_eq!(
            steps[0],
            (
                "validate".to_string(),
                "would-fail".to_string(),
                format!("step `verdict` of `atocore/validate` would fail: {why}")
            ),
            "{extra:?}"
        );
        let inner = verdicts(&p.json()["steps"][0]["steps"]);
        let db = inner.iter().find(|(id, _, _)| id == "db").unwrap();
        assert_eq!(db.1, "would-fail", "{extra:?}: {inner:?}");
        args.push("--yes");
        let r = run(&old, &off, "atocore/offsite", &args);
        assert_eq!(r.code, 3, "{extra:?}: {r:?}");
        assert_eq!(
            r.error(),
            format!(
                "refusing to run `atocore/offsite`: step `validate/verdict` would fail: {why}\nnothing was changed; fix the cause and run again (`runbook plan` shows the whole plan)"
            ),
            "{extra:?}"
        );
        assert_eq!(
            tree_digest(&host.repo_dir),
            remote,
            "{extra:?}: something was shipped"
        );
        assert_eq!(
            digest_but_shm(old.dir()),
            local,
            "{extra:?}: written locally"
        );
    }

    // Repaired in X: validated there (the called validate's own output says which
    // directory) and shipped from there.
    std::fs::write(broken.join("db/atocore.db"), &good_db).unwrap();
    let r = run(&old, &off, "atocore/offsite", &["--set", &set, "--yes"]);
    assert_eq!(r.code, 0, "{r:?}");
    let validated = r
        .events()
        .into_iter()
        .find(|e| e["event"] == "step-succeeded" && e["key"] == "validate")
        .unwrap_or_else(|| panic!("no validate step: {r:?}"));
    assert_eq!(
        validated["outputs"]["snapshot_dir"],
        broken.display().to_string(),
        "{validated}"
    );
    assert_eq!(validated["outputs"]["valid"], true, "{validated}");
    assert_eq!(r.outputs()["stamp"], stamp.as_str());
    snapshot_files(&host, &stamp);
}
