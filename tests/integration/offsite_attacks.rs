//! The off-site repository attacked the way issue 17 lists, through the binary against
//! a real sshd: whoever can write the off-site directory forges, replays, swaps or
//! plants; a host's own record goes stale; retention races a push; the disk fills
//! during the very first push; the newest snapshot breaks. Each ends with either a
//! refusal that names what is wrong and writes nothing, or every snapshot recovering
//! byte for byte.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value as Json;

use crate::offsite::{
    age_keys, fetch_runbook, list, make_snapshot, manifest_by_hand, object_of, outputs,
    push_runbook, repo_yaml, run_json, slow_link, tree, wait_for,
};
use crate::support::{OffsiteHost, Sandbox, tree_digest};

use runbook::actions::offsite::format::{self, Entry, Kind, Manifest, Signed, Snapshot};
use runbook::actions::offsite::key::RepoKey;

/// Pushes `source` as `stamp` and returns the push's outputs.
fn push(sb: &Sandbox, host: &OffsiteHost, source: &Path, stamp: &str, recipient: &str) -> Json {
    let name = format!("push-{stamp}");
    push_runbook(sb, host, &name, source, stamp, recipient);
    let r = run_json(sb, &name);
    assert_eq!(r.code, 0, "{r:?}");
    outputs(&r, "push")
}

/// Fetches `stamp` on `sb` (pinning `key` when given) into a new `dest`; the run.
fn fetch(
    sb: &Sandbox,
    host: &OffsiteHost,
    stamp: &str,
    identity: &Path,
    dest: &Path,
    key: Option<&str>,
) -> crate::support::Run {
    let name = format!("fetch-{}", stamp.replace('.', "-"));
    fetch_runbook(sb, host, &name, stamp, identity, dest, key);
    run_json(sb, &name)
}

/// The repository key the pushing host keeps (what only it and the identity can open).
fn kept_key(sb: &Sandbox) -> RepoKey {
    let file = walkdir::WalkDir::new(sb.p("state"))
        .into_iter()
        .flatten()
        .find(|e| e.file_name() == "repo-key")
        .expect("the pushing host keeps a repository key");
    RepoKey::load(file.path()).unwrap().unwrap()
}

/// A new host: only the identity file, in a sandbox of its own.
fn new_host(identity: &Path) -> (Sandbox, PathBuf) {
    let fresh = Sandbox::new();
    let id = fresh.p("identity.txt");
    std::fs::copy(identity, &id).unwrap();
    (fresh, id)
}

#[test]
fn a_repository_forged_with_only_the_public_key_is_refused_by_the_pushing_and_the_new_host() {
    let host = OffsiteHost::start();
    let sb = Sandbox::new();
    let (identity, recipient) = age_keys(sb.path(), "identity.txt");
    let snap = sb.p("snap");
    make_snapshot(&snap, 3, 2000);
    let key = push(&sb, &host, &snap, "20261201T020000Z", &recipient)["key"]
        .as_str()
        .unwrap()
        .to_string();
    let real_key_file = std::fs::read(host.repo_dir.join(format!("keys/{key}.age"))).unwrap();

    // The attacker replaces the repository with one of their own, made with the same
    // public key (it is in the vars file and the plans) and data of their choosing.
    let attacker = Sandbox::new();
    let evil = attacker.p("evil");
    make_snapshot(&evil, 1, 10);
    std::fs::write(evil.join("db/atocore.db"), "attacker's database").unwrap();
    std::fs::remove_dir_all(&host.repo_dir).unwrap();
    std::fs::create_dir(&host.repo_dir).unwrap();
    let forged = push(&attacker, &host, &evil, "20261202T020000Z", &recipient);
    assert_ne!(forged["key"].as_str().unwrap(), key);

    // The pushing host: its key is not the repository's.
    crate::offsite::list_runbook(&sb, &host);
    let r = sb.run(&["run", "list", "--yes"]);
    assert_ne!(r.code, 0, "{r:?}");
    assert!(
        r.stderr.contains("it was replaced") || r.stdout.contains("it was replaced"),
        "{r:?}"
    );
    // A push refuses too, and changes nothing there.
    let before = tree_digest(&host.repo_dir);
    push_runbook(&sb, &host, "again", &snap, "20261203T020000Z", &recipient);
    let r = sb.run(&["run", "again", "--yes"]);
    assert_ne!(r.code, 0, "{r:?}");
    assert_eq!(
        tree_digest(&host.repo_dir),
        before,
        "a refused push wrote there"
    );

    // A new host with the pinned fingerprint: the forged repository has no such key.
    let (fresh, id) = new_host(&identity);
    let dest = fresh.p("dest");
    let r = fetch(&fresh, &host, "latest", &id, &dest, Some(&key));
    assert_ne!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains(&format!("holds no key {key}")), "{r:?}");
    assert!(!dest.exists());

    // The real key file copied in beside the forgery: the key opens, but nothing the
    // attacker wrote authenticates under it.
    std::fs::write(
        host.repo_dir.join(format!("keys/{key}.age")),
        &real_key_file,
    )
    .unwrap();
    let r = fetch(&fresh, &host, "latest", &id, &dest, Some(&key));
    assert_ne!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.contains("no authenticated, complete snapshot")
            && r.stdout.contains("its HMAC is not the repository key's"),
        "{r:?}"
    );
    let r = fetch(&fresh, &host, "20261202T020000Z", &id, &dest, Some(&key));
    assert_ne!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.contains("refusing snapshot 20261202T020000Z"),
        "{r:?}"
    );
    assert!(!dest.exists());
    let leftovers = std::fs::read_dir(fresh.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("offsite-fetch"))
        .count();
    assert_eq!(leftovers, 0);
}

#[test]
fn an_older_snapshot_file_replayed_under_a_newer_stamp_is_refused_and_latest_is_the_real_newest() {
    let host = OffsiteHost::start();
    let sb = Sandbox::new();
    let (identity, recipient) = age_keys(sb.path(), "identity.txt");
    let old = sb.p("old");
    make_snapshot(&old, 2, 1000);
    let key = push(&sb, &host, &old, "20261201T020000Z", &recipient)["key"]
        .as_str()
        .unwrap()
        .to_string();
    let new = sb.p("new");
    make_snapshot(&new, 2, 1000);
    std::fs::write(new.join("db/atocore.db"), "the newer database").unwrap();
    push(&sb, &host, &new, "20261202T020000Z", &recipient);

    // The older snapshot's file copied over the newer one's (and under a new stamp).
    let snapshots = host.repo_dir.join("snapshots");
    std::fs::copy(
        snapshots.join("20261201T020000Z"),
        snapshots.join("20261202T020000Z"),
    )
    .unwrap();
    std::fs::copy(
        snapshots.join("20261201T020000Z"),
        snapshots.join("20261203T020000Z"),
    )
    .unwrap();
    let listed = list(&sb, &host);
    for stamp in ["20261202T020000Z", "20261203T020000Z"] {
        assert_eq!(listed[stamp]["authenticated"], false, "{listed:?}");
        assert!(
            listed[stamp]["problems"]
                .to_string()
                .contains("copied under another stamp (replayed)"),
            "{listed:?}"
        );
    }
    let (fresh, id) = new_host(&identity);
    let dest = fresh.p("dest");
    let r = fetch(&fresh, &host, "20261202T020000Z", &id, &dest, Some(&key));
    assert_ne!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("replayed"), "{r:?}");
    assert!(!dest.exists());
    // `latest` is the newest that authenticates: the real 20261201, named as such.
    let r = fetch(&fresh, &host, "latest", &id, &dest, Some(&key));
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(outputs(&r, "fetch")["stamp"], "20261201T020000Z");
    assert_eq!(tree(&dest), tree(&old));
}

/// Writes a manifest of the attacker's making, encrypted to `recipient` and
/// authenticated with the real key (the strongest attacker: one who has the key, or a
/// bug that lets a manifest through), as snapshot `stamp`.
fn plant(host: &OffsiteHost, key: &RepoKey, recipient: &str, stamp: &str, entries: Vec<Entry>) {
    let manifest = Manifest {
        format: "runbook-offsite-manifest".into(),
        version: format::VERSION,
        entries,
    };
    let plain = serde_json::to_vec(&manifest).unwrap();
    let id =
        runbook::actions::files::hex(&runbook::actions::offsite::key::hmac(&key.id_key(), &plain));
    let path = host.repo_dir.join(format::object_path(&id));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut age = Command::new("age")
        .args(["-e", "-r", recipient, "-o"])
        .arg(&path)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(age.stdin.as_mut().unwrap(), &plain).unwrap();
    drop(age.stdin.take());
    assert!(age.wait().unwrap().success());
    let cipher = std::fs::read(&path).unwrap();
    let snapshot = Snapshot {
        format: format::FORMAT.into(),
        version: format::VERSION,
        stamp: stamp.into(),
        created_at: "2026-12-01T02:00:00Z".into(),
        manifest: id,
        manifest_bytes: cipher.len() as u64,
        manifest_sha256: runbook::actions::files::hex(&<sha2::Sha256 as sha2::Digest>::digest(
            &cipher,
        )),
        files: 1,
        bytes: 1,
        objects: 1,
        mac: String::new(),
    };
    std::fs::write(
        host.repo_dir.join(format::snapshot_path(stamp)),
        snapshot.sign(key),
    )
    .unwrap();
}

#[test]
fn a_manifest_with_an_entry_below_a_symlink_or_a_dotdot_writes_nothing_outside_the_fetch() {
    let host = OffsiteHost::start();
    let sb = Sandbox::new();
    let (identity, recipient) = age_keys(sb.path(), "identity.txt");
    let snap = sb.p("snap");
    make_snapshot(&snap, 1, 100);
    push(&sb, &host, &snap, "20261201T020000Z", &recipient);
    let key = kept_key(&sb);
    let (manifest, _) = manifest_by_hand(&host, &identity, "20261201T020000Z");
    let some_object = object_of(&host, &manifest, "db/atocore.db");
    let object_id = some_object
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let outside = sb.p("outside");
    std::fs::create_dir(&outside).unwrap();
    let entry = |path: &str, kind: Kind| Entry {
        path: path.into(),
        kind,
        mode: if kind == Kind::Dir { 0o755 } else { 0o644 },
        mtime: 0,
        mtime_nsec: 0,
        size: (kind == Kind::File)
            .then_some(std::fs::metadata(snap.join("db/atocore.db")).unwrap().len()),
        object: (kind == Kind::File).then(|| object_id.clone()),
        target: (kind == Kind::Symlink).then(|| outside.display().to_string()),
    };
    let cases: [(&str, Vec<Entry>, &str); 4] = [
        (
            "20261202T020000Z",
            vec![
                entry("", Kind::Dir),
                entry("link", Kind::Symlink),
                entry("link/planted", Kind::File),
            ],
            "link/planted",
        ),
        (
            "20261203T020000Z",
            vec![entry("", Kind::Dir), entry("../planted", Kind::File)],
            "../planted",
        ),
        (
            "20261204T020000Z",
            vec![entry("", Kind::Dir), entry("/planted", Kind::File)],
            "/planted",
        ),
        (
            "20261205T020000Z",
            vec![
                entry("", Kind::Dir),
                entry("a", Kind::File),
                entry("a", Kind::File),
            ],
            "`a`",
        ),
    ];
    let dest = sb.p("restore/dest");
    std::fs::create_dir_all(sb.p("restore")).unwrap();
    for (stamp, entries, named) in cases {
        plant(&host, &key, &recipient, stamp, entries);
        for cmd in ["plan", "run"] {
            let name = format!("fetch-{stamp}");
            fetch_runbook(&sb, &host, &name, stamp, &identity, &dest, None);
            let r = if cmd == "plan" {
                sb.run(&["plan", &name])
            } else {
                sb.run(&["run", &name, "--yes"])
            };
            assert_ne!(r.code, 0, "{stamp} {cmd}: {r:?}");
            assert!(
                r.stdout.contains("is refused") && r.stdout.contains(named),
                "{stamp} {cmd}: {r:?}"
            );
        }
        assert_eq!(
            std::fs::read_dir(&outside).unwrap().count(),
            0,
            "{stamp}: written outside"
        );
        assert!(!sb.p("planted").exists() && !Path::new("/planted").exists());
        assert!(!dest.exists());
        assert_eq!(std::fs::read_dir(sb.p("restore")).unwrap().count(), 0);
    }
    // The list says the same of each, and latest passes over them to the real one.
    let listed = list(&sb, &host);
    for stamp in ["20261202T020000Z", "20261203T020000Z", "20261205T020000Z"] {
        assert_eq!(listed[stamp]["verified"], false, "{listed:?}");
    }
    let r = fetch(&sb, &host, "latest", &identity, &dest, None);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(outputs(&r, "fetch")["stamp"], "20261201T020000Z");
    assert_eq!(tree(&dest), tree(&snap));
}

/// Every object file: name -> (inode, mtime ns, size).
fn objects_stat(repo: &Path) -> std::collections::BTreeMap<String, (u64, i64, u64)> {
    use std::os::unix::fs::MetadataExt;
    walkdir::WalkDir::new(repo.join("objects"))
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .map(|e| {
            let m = e.metadata().unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                (m.ino(), m.mtime() * 1_000_000_000 + m.mtime_nsec(), m.len()),
            )
        })
        .collect()
}

fn copy_tree(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn a_state_dir_restored_from_an_older_copy_never_overwrites_and_every_snapshot_still_recovers() {
    let host = OffsiteHost::start();
    let sb = Sandbox::new();
    let (identity, recipient) = age_keys(sb.path(), "identity.txt");
    let snap = sb.p("snap");
    make_snapshot(&snap, 6, 30_000);
    push(&sb, &host, &snap, "20261201T020000Z", &recipient);
    let kept = [(String::from("20261201T020000Z"), tree(&snap))];
    let mut kept = kept.to_vec();
    // The state dir as a backup of it holds it now.
    copy_tree(&sb.p("state"), &sb.p("state.old"));

    std::fs::write(snap.join("db/atocore.db"), "the second day's database").unwrap();
    push(&sb, &host, &snap, "20261202T020000Z", &recipient);
    kept.push(("20261202T020000Z".into(), tree(&snap)));
    let before = objects_stat(&host.repo_dir);

    // The state dir restored from that older copy: its cache says less than is there
    // (and would say the same generation); the next push must ask, never overwrite.
    std::fs::remove_dir_all(sb.p("state")).unwrap();
    std::fs::rename(sb.p("state.old"), sb.p("state")).unwrap();
    std::fs::write(snap.join("registry/projects.json"), "{\"projects\": []}").unwrap();
    let out = push(&sb, &host, &snap, "20261203T020000Z", &recipient);
    kept.push(("20261203T020000Z".into(), tree(&snap)));
    // Only the new registry and the new manifest went out.
    assert_eq!(out["objects_sent"], 1, "{out}");
    let after = objects_stat(&host.repo_dir);
    for (name, stat) in &before {
        assert_eq!(after.get(name), Some(stat), "object {name} was rewritten");
    }
    assert_eq!(after.len(), before.len() + 2);

    let (fresh, id) = new_host(&identity);
    let key = out["key"].as_str().unwrap().to_string();
    for (stamp, want) in &kept {
        let dest = fresh.p(&format!("dest-{stamp}"));
        let r = fetch(&fresh, &host, stamp, &id, &dest, Some(&key));
        assert_eq!(r.code, 0, "{stamp}: {r:?}");
        assert_eq!(&tree(&dest), want, "{stamp}");
    }
}

#[test]
fn retention_from_a_second_host_while_a_push_runs_is_refused_by_the_lock_and_nothing_is_lost() {
    let host = OffsiteHost::start();
    let sb = Sandbox::new();
    let (identity, recipient) = age_keys(sb.path(), "identity.txt");
    let small = sb.p("small");
    make_snapshot(&small, 2, 1000);
    push(&sb, &host, &small, "20261101T020000Z", &recipient);
    // A second admin host that keeps the same repository key (copied with its state).
    let second = Sandbox::new();
    copy_tree(&sb.p("state"), &second.p("state"));
    second.write(
        "runbooks/prune.yaml",
        &format!(
            "version: 1\nsteps:\n  - id: prune\n    action: offsite-retention\n    with:\n      repo: {}\n      keep_daily: 1\n      keep_weekly: 0\n      keep_monthly: 0\n",
            repo_yaml(&host)
        ),
    );

    // A push slowed by the link, so it is certainly running when retention starts.
    let big = sb.p("big");
    make_snapshot(&big, 40, 256 << 10);
    push_runbook(&sb, &host, "push-big", &big, "20261202T020000Z", &recipient);
    slow_link(&host, "16mbit");
    let child = sb
        .cmd(&["run", "push-big", "--yes", "--format", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the push's lock", 60, || {
        std::fs::read_dir(host.repo_dir.join("locks"))
            .map(|d| d.count() > 0)
            .unwrap_or(false)
    });
    let before = tree_digest(&host.repo_dir.join("snapshots"));
    let r = second.run(&["run", "prune", "--yes"]);
    assert_ne!(r.code, 0, "retention ran during a push: {r:?}");
    let text = format!("{}{}", r.stdout, r.stderr);
    assert!(
        text.contains("is in use by offsite-push 20261202T020000Z (shared lock)")
            && text.contains("rm -- "),
        "{r:?}"
    );
    assert_eq!(tree_digest(&host.repo_dir.join("snapshots")), before);
    let pushed: crate::support::Run = child.wait_with_output().unwrap().into();
    assert_eq!(pushed.code, 0, "{pushed:?}");
    slow_link(&host, "10gbit");

    // Now retention runs (keeping the newest daily: the old one goes with its own
    // objects), and what it kept recovers whole.
    let r = second.run(&["run", "prune", "--yes"]);
    assert_eq!(r.code, 0, "{r:?}");
    let dest = sb.p("dest");
    let r = fetch(&sb, &host, "latest", &identity, &dest, None);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(outputs(&r, "fetch")["stamp"], "20261202T020000Z");
    assert_eq!(tree(&dest), tree(&big));
}

#[test]
fn a_disk_that_fills_during_the_first_push_leaves_a_valid_empty_repository_and_the_next_push_works()
{
    let host = OffsiteHost::start();
    let sb = Sandbox::new();
    let (identity, recipient) = age_keys(sb.path(), "identity.txt");
    let snap = sb.p("snap");
    make_snapshot(&snap, 30, 200_000);
    // The off-site host's own view (its sshd may live in a mount namespace of its
    // own): a 1 MiB filesystem where the repository goes.
    let on_host = |script: &str| -> String {
        let dir = host.repo_dir.display().to_string();
        let out = host
            .ssh(10)
            // One word: ssh hands the remote shell the command line as a string.
            .arg(format!("d='{dir}'; {script}"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{script}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    on_host("mount -t tmpfs -o size=1m tmpfs \"$d\"");

    // Too small from the start: the plan and the run say so, and nothing is made.
    push_runbook(&sb, &host, "push", &snap, "20261201T020000Z", &recipient);
    let plan = sb.run(&["plan", "push"]);
    assert_ne!(plan.code, 0, "{plan:?}");
    assert!(
        plan.stdout
            .contains("has 1.0 MiB free where the repository is")
            && plan.stdout.contains("this push needs about"),
        "{plan:?}"
    );
    let r = run_json(&sb, "push");
    assert_ne!(r.code, 0, "{r:?}");
    assert_eq!(
        on_host("find \"$d\" -type f | wc -l"),
        "0",
        "something was made"
    );

    // Room enough when the push starts, then the disk fills under it (another writer
    // on the same filesystem) while the link is slow.
    on_host("mount -o remount,size=8m \"$d\"");
    slow_link(&host, "8mbit");
    let child = sb
        .cmd(&["run", "push", "--yes", "--format", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the push's lock", 60, || {
        on_host("ls -A \"$d/locks\" 2>/dev/null | wc -l") != "0"
    });
    on_host("head -c 8M /dev/zero > \"$d/.filler\" 2>/dev/null; true");
    let r: crate::support::Run = child.wait_with_output().unwrap().into();
    slow_link(&host, "10gbit");
    assert_ne!(r.code, 0, "{r:?}");
    let text = format!("{}{}", r.stdout, r.stderr);
    assert!(text.contains("No space left on device"), "{r:?}");
    // Either nothing was made (the disk filled before the repository was) or a valid,
    // empty repository; no upload is left behind, and the push's lock is gone.
    if on_host("test -e \"$d/config\" && echo yes || echo no") == "yes" {
        assert_ne!(on_host("wc -c < \"$d/config\""), "0", "an empty config");
        let listed = list(&sb, &host);
        assert!(listed.is_empty(), "{listed:?}");
    } else {
        assert_eq!(on_host("ls \"$d\" | wc -l"), "0");
    }
    assert_eq!(
        on_host("ls -A \"$d/tmp\" 2>/dev/null | wc -l"),
        "0",
        "an upload was left there"
    );
    assert_eq!(on_host("ls -A \"$d/locks\" 2>/dev/null | wc -l"), "0");

    // Space freed: the same push, run again, works.
    on_host("rm -f \"$d/.filler\"");
    let r = run_json(&sb, "push");
    assert_eq!(r.code, 0, "{r:?}");
    let objects: usize = on_host("find \"$d/objects\" -type f | wc -l")
        .parse()
        .unwrap();
    assert!(objects > 30, "{objects}");
    let dest = sb.p("dest");
    let r = fetch(&sb, &host, "latest", &identity, &dest, None);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(tree(&dest), tree(&snap));
    on_host("umount -l \"$d\"");
}

#[test]
fn a_broken_newest_snapshot_is_passed_over_by_latest_naming_why() {
    let host = OffsiteHost::start();
    let sb = Sandbox::new();
    let (identity, recipient) = age_keys(sb.path(), "identity.txt");
    let old = sb.p("old");
    make_snapshot(&old, 2, 1000);
    let key = push(&sb, &host, &old, "20261201T020000Z", &recipient)["key"]
        .as_str()
        .unwrap()
        .to_string();
    let new = sb.p("new");
    make_snapshot(&new, 2, 1000);
    std::fs::write(new.join("db/atocore.db"), "only in the newest").unwrap();
    push(&sb, &host, &new, "20261202T020000Z", &recipient);
    let (manifest, _) = manifest_by_hand(&host, &identity, "20261202T020000Z");
    std::fs::remove_file(object_of(&host, &manifest, "db/atocore.db")).unwrap();

    let listed = list(&sb, &host);
    assert_eq!(listed["20261202T020000Z"]["complete"], false, "{listed:?}");
    assert_eq!(listed["20261201T020000Z"]["complete"], true, "{listed:?}");
    let (fresh, id) = new_host(&identity);
    let dest = fresh.p("dest");
    fetch_runbook(&fresh, &host, "f", "latest", &id, &dest, Some(&key));
    let plan = fresh.run(&["plan", "f"]);
    assert_eq!(plan.code, 0, "{plan:?}");
    assert!(
        plan.stdout.contains("fetch snapshot 20261201T020000Z"),
        "{plan:?}"
    );
    let r = run_json(&fresh, "f");
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(outputs(&r, "fetch")["stamp"], "20261201T020000Z");
    assert_eq!(tree(&dest), tree(&old));
}

#[test]
fn an_object_removed_by_hand_is_not_vouched_for_twice_by_this_hosts_record() {
    let host = OffsiteHost::start();
    let sb = Sandbox::new();
    let (identity, recipient) = age_keys(sb.path(), "identity.txt");
    let snap = sb.p("snap");
    make_snapshot(&snap, 3, 1000);
    push(&sb, &host, &snap, "20261201T020000Z", &recipient);
    // Gone without a retention (no new generation): the record says it is there.
    let (manifest, _) = manifest_by_hand(&host, &identity, "20261201T020000Z");
    let gone = object_of(&host, &manifest, "db/atocore.db");
    std::fs::remove_file(&gone).unwrap();
    push_runbook(&sb, &host, "again", &snap, "20261202T020000Z", &recipient);
    let r = run_json(&sb, "again");
    assert_ne!(
        r.code, 0,
        "a snapshot was committed without its object: {r:?}"
    );
    let name = gone.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        r.stdout.contains(&name[..16]) && r.stdout.contains("The record is cleared"),
        "{r:?}"
    );
    assert!(!host.repo_dir.join("snapshots/20261202T020000Z").exists());
    let id = r.stdout.lines().next().unwrap();
    let id: Json = serde_json::from_str(id).unwrap();
    let resumed = sb.run(&["resume", id["run_id"].as_str().unwrap()]);
    assert_eq!(resumed.code, 0, "{resumed:?}");
    assert!(gone.exists(), "the object was not sent again");
    let dest = sb.p("dest");
    let r = fetch(&sb, &host, "20261202T020000Z", &identity, &dest, None);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(tree(&dest), tree(&snap));
}
