//! Off-site copies against a real sshd (`OffsiteHost`: Debian's sshd in a network
//! namespace behind a veth): push, list, fetch onto a "new host", the incremental
//! second push measured on the link, plaintext never on the remote, `age` CLI interop
//! both ways, tampering, a cut link and a killed engine, then resume, and retention.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value as Json;
use sha2::{Digest, Sha256};

use crate::support::{OffsiteHost, Run, Sandbox, tree_digest};

const DB_TEXT: &str = "ATOCORE-DB-PLAINTEXT-7f3a9c";
const REGISTRY_TEXT: &str = "ATOCORE-REGISTRY-PLAINTEXT-51be";
const CHROMA_TEXT: &str = "CHROMA-VECTOR-PLAINTEXT-e02d";
const FILE_NAMES: [&str; 4] = [
    "atocore.db",
    "projects.json",
    "chroma.sqlite3",
    "vectorstore",
];

/// An age identity made by Debian's age-keygen: (identity file, public key).
pub(crate) fn age_keys(dir: &Path, name: &str) -> (PathBuf, String) {
    let path = dir.join(name);
    let out = Command::new("age-keygen")
        .arg("-o")
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .expect("age-keygen (Debian's age)");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    let public = text
        .split_whitespace()
        .find(|w| w.starts_with("age1"))
        .unwrap_or_else(|| panic!("no public key in {text}"))
        .to_string();
    (path, public)
}

/// A snapshot like AtoCore's: a database, a registry, a vector store of many files, a
/// symlink, modes that differ.
pub(crate) fn make_snapshot(root: &Path, chroma_files: usize, chroma_bytes: usize) {
    let w = |rel: &str, data: &[u8], mode: u32| {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, data).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    w(
        "db/atocore.db",
        format!("SQLite format 3\0 {DB_TEXT} rows").as_bytes(),
        0o640,
    );
    w(
        "registry/projects.json",
        format!("{{\"projects\": [\"{REGISTRY_TEXT}\"]}}\n").as_bytes(),
        0o644,
    );
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    for i in 0..chroma_files {
        let mut data = format!("{CHROMA_TEXT} {i}\n").into_bytes();
        while data.len() < chroma_bytes {
            // xorshift: incompressible, so byte counts mean what they say.
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            data.extend_from_slice(&seed.to_le_bytes());
        }
        data.truncate(chroma_bytes.max(40));
        w(
            &format!("chroma/vectorstore/seg-{:03}/data_level0.bin", i % 7),
            b"",
            0o600,
        );
        w(
            &format!("chroma/vectorstore/seg-{:03}/part-{i:04}.bin", i % 7),
            &data,
            0o600,
        );
    }
    w("chroma/chroma.sqlite3", b"chroma index", 0o644);
    std::os::unix::fs::symlink("db/atocore.db", root.join("current.db")).unwrap();
    std::fs::set_permissions(root.join("chroma"), std::fs::Permissions::from_mode(0o750)).unwrap();
}

/// What a restore must reproduce: every entry's kind, mode, size, content digest,
/// link target and (files) mtime.
pub(crate) fn tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for e in walkdir::WalkDir::new(root)
        .follow_links(false)
        .sort_by_file_name()
    {
        let e = e.unwrap();
        let rel = e.path().strip_prefix(root).unwrap().display().to_string();
        let m = e.path().symlink_metadata().unwrap();
        let what = if m.file_type().is_symlink() {
            format!("link {}", std::fs::read_link(e.path()).unwrap().display())
        } else if m.is_dir() {
            format!("dir {:o}", m.mode() & 0o7777)
        } else {
            let data = std::fs::read(e.path()).unwrap();
            format!(
                "file {:o} {} {} mtime {}.{}",
                m.mode() & 0o7777,
                data.len(),
                hex(&data),
                m.mtime(),
                m.mtime_nsec()
            )
        };
        out.insert(rel, what);
    }
    out
}

pub(crate) fn repo_yaml(h: &OffsiteHost) -> String {
    repo_yaml_pinned(h, None)
}

/// The repo arguments, with the repository key's fingerprint pinned when `key` is given
/// (how a host that does not keep the key trusts the repository).
pub(crate) fn repo_yaml_pinned(h: &OffsiteHost, key: Option<&str>) -> String {
    format!(
        "{{host: \"{}\", port: {}, user: {}, dir: \"{}\", ssh_key: \"{}\", known_hosts: \"{}\"{}}}",
        h.host,
        h.port,
        h.user,
        h.repo_dir.display(),
        h.ssh_key.display(),
        h.known_hosts.display(),
        key.map(|k| format!(", key: \"{k}\"")).unwrap_or_default()
    )
}

pub(crate) fn push_runbook(
    sb: &Sandbox,
    h: &OffsiteHost,
    name: &str,
    source: &Path,
    stamp: &str,
    recipient: &str,
) {
    sb.write(
        &format!("runbooks/{name}.yaml"),
        &format!(
            "version: 1\nsteps:\n  - id: push\n    action: offsite-push\n    with:\n      repo: {}\n      source: \"{}\"\n      stamp: \"{stamp}\"\n      recipients: [\"{recipient}\"]\n",
            repo_yaml(h),
            source.display()
        ),
    );
}

pub(crate) fn fetch_runbook(
    sb: &Sandbox,
    h: &OffsiteHost,
    name: &str,
    stamp: &str,
    identity: &Path,
    dest: &Path,
    key: Option<&str>,
) {
    sb.write(
        &format!("runbooks/{name}.yaml"),
        &format!(
            "version: 1\nsteps:\n  - id: fetch\n    action: offsite-fetch\n    with:\n      repo: {}\n      stamp: \"{stamp}\"\n      identity: \"{}\"\n      dest: \"{}\"\n",
            repo_yaml_pinned(h, key),
            identity.display(),
            dest.display()
        ),
    );
}

pub(crate) fn list_runbook(sb: &Sandbox, h: &OffsiteHost) {
    sb.write(
        "runbooks/list.yaml",
        &format!(
            "version: 1\nsteps:\n  - id: list\n    action: offsite-list\n    with:\n      repo: {}\n",
            repo_yaml(h)
        ),
    );
}

pub(crate) fn events(r: &Run) -> Vec<Json> {
    r.stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The outputs of step `key` in a `--format json` run.
pub(crate) fn outputs(r: &Run, key: &str) -> Json {
    events(r)
        .into_iter()
        .find(|e| e["event"] == "step-succeeded" && e["key"] == key)
        .unwrap_or_else(|| panic!("step {key} did not succeed: {r:?}"))["outputs"]
        .clone()
}

pub(crate) fn run_json(sb: &Sandbox, name: &str) -> Run {
    sb.run(&["run", name, "--yes", "--format", "json"])
}

pub(crate) fn list(sb: &Sandbox, h: &OffsiteHost) -> BTreeMap<String, Json> {
    list_runbook(sb, h);
    let r = run_json(sb, "list");
    assert_eq!(r.code, 0, "{r:?}");
    outputs(&r, "list")["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["stamp"].as_str().unwrap().to_string(), s.clone()))
        .collect()
}

/// Every byte of every file below `root`.
fn all_bytes(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    walkdir::WalkDir::new(root)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .map(|e| (e.path().to_path_buf(), std::fs::read(e.path()).unwrap()))
        .collect()
}

pub(crate) fn hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Limits what the host side of the link sends to the host (tc's token bucket).
pub(crate) fn slow_link(host: &OffsiteHost, rate: &str) {
    let st = Command::new("tc")
        .args([
            "qdisc", "replace", "dev", &host.veth, "root", "tbf", "rate", rate,
        ])
        .args(["burst", "64kb", "latency", "400ms"])
        .status()
        .expect("tc (iproute2)");
    assert!(st.success(), "tc qdisc replace on {}", host.veth);
}

/// Waits (bounded by `secs`) until `cond` holds.
pub(crate) fn wait_for(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn a_pushed_snapshot_fetched_onto_a_new_host_is_identical_and_the_remote_holds_no_plaintext() {
    let host = OffsiteHost::start();
    let sb = Sandbox::new();
    let (identity, recipient) = age_keys(sb.path(), "identity.txt");
    let snap = sb.p("backups/20261201T020000Z");
    make_snapshot(&snap, 60, 400_000);
    push_runbook(&sb, &host, "push", &snap, "20261201T020000Z", &recipient);

    // The plan lists the remote and writes nothing, here or there; without an id key
    // yet, every object is new (and the plan does not create the key).
    let before_local = tree_digest(sb.path());
    let before_remote = tree_digest(&host.repo_dir);
    let plan = sb.run(&["plan", "push"]);
    assert_eq!(plan.code, 0, "{plan:?}");
    assert!(
        plan.stdout.contains(&format!(
            "offsite-push: create the repository (a new key) and send all 70 files (22.9 MiB), encrypted, as 20261201T020000Z to root@{}:22; verified there by digest before the snapshot is committed",
            host.host
        )),
        "{plan:?}"
    );
    assert_eq!(
        tree_digest(sb.path()),
        before_local,
        "the plan wrote locally"
    );
    assert_eq!(
        tree_digest(&host.repo_dir),
        before_remote,
        "the plan wrote remotely"
    );

    let r = run_json(&sb, "push");
    assert_eq!(r.code, 0, "{r:?}");
    let out = outputs(&r, "push");
    assert_eq!(out["verified"], true);
    assert_eq!(out["objects"], 64);
    assert_eq!(out["objects_sent"], 64);
    // The snapshot is committed (its file linked last), and the key's fingerprint is
    // what a new host pins.
    assert!(host.repo_dir.join("snapshots/20261201T020000Z").is_file());
    assert!(host.repo_dir.join("config").is_file());
    let key = out["key"].as_str().unwrap().to_string();
    assert_eq!(key.len(), 32, "{out}");

    // Nothing plaintext on the remote: no content, no file name of the snapshot.
    for (path, data) in all_bytes(&host.repo_dir) {
        for needle in [DB_TEXT, REGISTRY_TEXT, CHROMA_TEXT]
            .iter()
            .chain(FILE_NAMES.iter())
        {
            assert!(
                !contains(&data, needle.as_bytes()),
                "`{needle}` in plaintext in {}",
                path.display()
            );
        }
        for name in FILE_NAMES {
            assert!(
                !path.display().to_string().contains(name),
                "{}",
                path.display()
            );
        }
    }
    // Nor the identity anywhere, nor any secret key in what the engine keeps or says.
    let secret = std::fs::read_to_string(&identity).unwrap();
    let secret = secret
        .lines()
        .find(|l| l.starts_with("AGE-SECRET-KEY-"))
        .unwrap();
    let ssh_key = std::fs::read_to_string(&host.ssh_key).unwrap();
    let ssh_body = ssh_key.lines().nth(1).unwrap();
    for (path, data) in all_bytes(&host.repo_dir)
        .into_iter()
        .chain(all_bytes(&sb.p("state")))
    {
        assert!(!contains(&data, secret.as_bytes()), "{}", path.display());
        assert!(!contains(&data, ssh_body.as_bytes()), "{}", path.display());
    }
    assert!(!r.stdout.contains(ssh_body) && !r.stderr.contains(ssh_body));

    let listed = list(&sb, &host);
    assert_eq!(
        listed["20261201T020000Z"]["authenticated"], true,
        "{listed:?}"
    );
    assert_eq!(listed["20261201T020000Z"]["complete"], true, "{listed:?}");

    // A new host: its own sandbox and state dir; only the identity and the repo args.
    let fresh = Sandbox::new();
    let id2 = fresh.p("keys/identity.txt");
    std::fs::create_dir_all(id2.parent().unwrap()).unwrap();
    std::fs::copy(&identity, &id2).unwrap();
    let dest = fresh.p("restore/snapshot");
    std::fs::create_dir_all(fresh.p("restore")).unwrap();
    fetch_runbook(&fresh, &host, "recover", "latest", &id2, &dest, Some(&key));
    let plan = fresh.run(&["plan", "recover"]);
    assert_eq!(plan.code, 0, "{plan:?}");
    assert!(
        plan.stdout.contains(&format!(
            "fetch snapshot 20261201T020000Z from root@{}:22 (authenticated by key {key}): 64 objects, decrypt and check 70 files (22.9 MiB)",
            host.host
        )),
        "{plan:?}"
    );
    assert!(!dest.exists(), "the plan wrote the destination");
    let r = run_json(&fresh, "recover");
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(outputs(&r, "fetch")["stamp"], "20261201T020000Z");
    assert_eq!(tree(&dest), tree(&snap));
    let leftovers: Vec<String> = std::fs::read_dir(fresh.p("restore"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(leftovers, ["snapshot"], "staging left behind");
    // Fetched again: the destination already holds the snapshot.
    let again = run_json(&fresh, "recover");
    assert_eq!(again.code, 0, "{again:?}");
    for (path, data) in all_bytes(fresh.path()) {
        assert!(!contains(&data, ssh_body.as_bytes()), "{}", path.display());
        if path != id2 {
            assert!(!contains(&data, secret.as_bytes()), "{}", path.display());
        }
    }

    // The unchanged snapshot shipped again under the next stamp: almost nothing crosses.
    push_runbook(&sb, &host, "push2", &snap, "20261202T020000Z", &recipient);
    let plan = sb.run(&["plan", "push2"]);
    assert!(
        plan.stdout.contains(
            "send at most a new manifest: all 70 files (22.9 MiB) are unchanged since the last push"
        ),
        "{plan:?}"
    );
    let crossed = host.bytes_crossed();
    let r = run_json(&sb, "push2");
    assert_eq!(r.code, 0, "{r:?}");
    let link = host.bytes_crossed() - crossed;
    let out = outputs(&r, "push");
    let total = out["bytes_total"].as_u64().unwrap();
    assert_eq!(out["objects_sent"], 0, "{out}");
    assert!(out["bytes_sent"].as_u64().unwrap() * 100 <= total, "{out}");
    // Both directions of the link, ssh handshakes included.
    assert!(
        link * 100 <= total,
        "{link} bytes crossed the link for a {total}-byte snapshot"
    );
    let listed = list(&sb, &host);
    assert_eq!(
        listed["20261202T020000Z"]["authenticated"], true,
        "{listed:?}"
    );
    assert_eq!(listed["20261202T020000Z"]["complete"], true, "{listed:?}");
}

#[test]
fn the_age_cli_alone_recovers_every_file_by_hand_from_the_identity() {
    let host = OffsiteHost::start();
    let sb = Sandbox::new();
    let (identity, recipient) = age_keys(sb.path(), "identity.txt");
    let snap = sb.p("snap");
    make_snapshot(&snap, 3, 5000);
    push_runbook(&sb, &host, "push", &snap, "20261201T020000Z", &recipient);
    let r = run_json(&sb, "push");
    assert_eq!(r.code, 0, "{r:?}");
    let key = outputs(&r, "push")["key"].as_str().unwrap().to_string();

    // An operator with only the identity file and Debian's age, by hand: the snapshot
    // file (plain JSON) names the manifest object; the manifest names every file's
    // object; each decrypts with `age -d -i identity`.
    let age_d = |file: &Path| -> Vec<u8> {
        let out = Command::new("age")
            .arg("-d")
            .arg("-i")
            .arg(&identity)
            .arg(file)
            .output()
            .unwrap();
        assert!(out.status.success(), "age -d {}: {out:?}", file.display());
        out.stdout
    };
    let object = |id: &str| host.repo_dir.join(format!("objects/{}/{id}", &id[..2]));
    let snapshot: Json = serde_json::from_slice(
        &std::fs::read(host.repo_dir.join("snapshots/20261201T020000Z")).unwrap(),
    )
    .unwrap();
    assert_eq!(snapshot["stamp"], "20261201T020000Z");
    let manifest: Json =
        serde_json::from_slice(&age_d(&object(snapshot["manifest"].as_str().unwrap()))).unwrap();
    let mut by_hand = BTreeMap::new();
    for e in manifest["entries"].as_array().unwrap() {
        if e["kind"] == "file" {
            let data = age_d(&object(e["object"].as_str().unwrap()));
            by_hand.insert(e["path"].as_str().unwrap().to_string(), hex(&data));
        }
    }
    let files: BTreeMap<String, String> = tree(&snap)
        .into_iter()
        .filter(|(_, v)| v.starts_with("file"))
        .collect();
    assert_eq!(by_hand.len(), files.len(), "{by_hand:?}");
    for (path, data) in &by_hand {
        assert_eq!(
            hex(&std::fs::read(snap.join(path)).unwrap()),
            *data,
            "{path}"
        );
    }
    // The repository key too, under the name of the fingerprint the push printed: a
    // header line, then 64 hex digits.
    let k = String::from_utf8(age_d(&host.repo_dir.join(format!("keys/{key}.age")))).unwrap();
    let lines: Vec<&str> = k.lines().collect();
    assert_eq!(lines.len(), 2, "{k}");
    assert!(lines[1].len() == 64 && lines[1].bytes().all(|b| b.is_ascii_hexdigit()));
}

/// The manifest of snapshot `stamp` as the age CLI decrypts it, and its object's path.
pub(crate) fn manifest_by_hand(
    host: &OffsiteHost,
    identity: &Path,
    stamp: &str,
) -> (Json, PathBuf) {
    let snapshot: Json = serde_json::from_slice(
        &std::fs::read(host.repo_dir.join(format!("snapshots/{stamp}"))).unwrap(),
    )
    .unwrap();
    let id = snapshot["manifest"].as_str().unwrap();
    let file = host.repo_dir.join(format!("objects/{}/{id}", &id[..2]));
    let out = Command::new("age")
        .arg("-d")
        .arg("-i")
        .arg(identity)
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    (serde_json::from_slice(&out.stdout).unwrap(), file)
}

/// The object path of the file `path` in a manifest.
pub(crate) fn object_of(host: &OffsiteHost, manifest: &Json, path: &str) -> PathBuf {
    let id = manifest["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["path"] == path)
        .unwrap()["object"]
        .as_str()
        .unwrap()
        .to_string();
    host.repo_dir.join(format!("objects/{}/{id}", &id[..2]))
}

#[test]
fn a_damaged_swapped_or_missing_object_or_manifest_is_refused_before_anything_reaches_dest() {
    let host = OffsiteHost::start();
    let sb = Sandbox::new();
    let (identity, recipient) = age_keys(sb.path(), "identity.txt");
    let snap = sb.p("snap");
    make_snapshot(&snap, 4, 3000);
    push_runbook(&sb, &host, "push", &snap, "20261201T020000Z", &recipient);
    assert_eq!(sb.run(&["run", "push", "--yes"]).code, 0);
    let (manifest, manifest_file) = manifest_by_hand(&host, &identity, "20261201T020000Z");
    let object = object_of(&host, &manifest, "registry/projects.json");
    let other = object_of(&host, &manifest, "db/atocore.db");
    let rel = |p: &Path| {
        p.strip_prefix(&host.repo_dir)
            .unwrap()
            .display()
            .to_string()
    };
    let dest = sb.p("restore/dest");
    std::fs::create_dir_all(sb.p("restore")).unwrap();
    fetch_runbook(
        &sb,
        &host,
        "fetch",
        "20261201T020000Z",
        &identity,
        &dest,
        None,
    );

    enum Damage {
        Flip,
        Truncate,
        Delete,
        /// The other object's ciphertext under this one's name: valid age to the same
        /// recipients, but other plaintext than the name says. The index (what the
        /// sizes are checked against) is moved away too, as an attacker would.
        SwapWith(PathBuf),
    }
    let cases: Vec<(&str, &Path, Damage, &str)> = vec![
        ("flipped object", &object, Damage::Flip, "damaged"),
        (
            "truncated object",
            &object,
            Damage::Truncate,
            "other than were sent",
        ),
        ("deleted object", &object, Damage::Delete, "is missing"),
        (
            "swapped object",
            &object,
            Damage::SwapWith(other.clone()),
            "swapped",
        ),
        (
            "flipped manifest",
            &manifest_file,
            Damage::Flip,
            "does not decrypt (damaged)",
        ),
        (
            "truncated manifest",
            &manifest_file,
            Damage::Truncate,
            "does not decrypt (damaged)",
        ),
        (
            "deleted manifest",
            &manifest_file,
            Damage::Delete,
            "is missing",
        ),
        (
            "swapped manifest",
            &manifest_file,
            Damage::SwapWith(other.clone()),
            "holds other bytes than its name says (swapped or forged)",
        ),
    ];
    for (what, file, damage, why) in cases {
        let saved = std::fs::read(file).unwrap();
        match &damage {
            Damage::Flip => {
                let mut d = saved.clone();
                let i = d.len() - 20;
                d[i] ^= 0x01;
                std::fs::write(file, d).unwrap();
            }
            Damage::Truncate => std::fs::write(file, &saved[..saved.len() - 7]).unwrap(),
            Damage::Delete => std::fs::remove_file(file).unwrap(),
            Damage::SwapWith(o) => {
                std::fs::remove_file(file).unwrap();
                std::fs::copy(o, file).unwrap();
                std::fs::rename(host.repo_dir.join("index"), sb.p("index.away")).unwrap();
            }
        }
        // What lies below restore/ (its own mtime moves: the fetch streams into a
        // staging directory beside dest, removed when the snapshot is refused).
        let below = || {
            let mut t = tree_digest(&sb.p("restore"));
            t.remove(Path::new(""));
            t
        };
        let before = below();
        for cmd in [&["plan", "fetch"][..], &["run", "fetch", "--yes"][..]] {
            let r = sb.run(cmd);
            let text = format!("{}{}", r.stdout, r.stderr);
            // A damaged object's bytes are known only once they are read: the plan
            // (which reads no object) may pass it; the run must not.
            let plan_cannot_see = cmd[0] == "plan"
                && file == object
                && matches!(damage, Damage::Flip | Damage::SwapWith(_));
            if plan_cannot_see {
                continue;
            }
            assert_ne!(r.code, 0, "{what}: {cmd:?} did not refuse: {r:?}");
            assert!(text.contains(why), "{what}: {cmd:?}: {r:?}");
            assert!(
                text.contains(&rel(file)),
                "{what}: the object is not named: {r:?}"
            );
            if file == object && cmd[0] == "run" {
                assert!(
                    text.contains("registry/projects.json"),
                    "{what}: the file it holds is not named: {r:?}"
                );
            }
        }
        assert_eq!(below(), before, "{what}: something was left");
        assert!(!dest.exists(), "{what}");
        std::fs::write(file, saved).unwrap();
        if matches!(damage, Damage::SwapWith(_)) {
            std::fs::rename(sb.p("index.away"), host.repo_dir.join("index")).unwrap();
        }
    }
    // Repaired, it lists as complete and fetches again.
    let listed = list(&sb, &host);
    assert_eq!(listed["20261201T020000Z"]["complete"], true, "{listed:?}");
    let r = sb.run(&["run", "fetch", "--yes"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(tree(&dest), tree(&snap));
}

#[test]
fn the_fetch_plan_names_the_identity_when_it_is_missing_or_cannot_decrypt() {
    let host = OffsiteHost::start();
    let sb = Sandbox::new();
    let (_, recipient) = age_keys(sb.path(), "identity.txt");
    let (other, _) = age_keys(sb.path(), "other.txt");
    let snap = sb.p("snap");
    make_snapshot(&snap, 2, 100);
    push_runbook(&sb, &host, "push", &snap, "20261201T020000Z", &recipient);
    assert_eq!(sb.run(&["run", "push", "--yes"]).code, 0);
    let dest = sb.p("dest");
    fetch_runbook(
        &sb,
        &host,
        "missing",
        "latest",
        &sb.p("nope.txt"),
        &dest,
        None,
    );
    let r = sb.run(&["plan", "missing"]);
    assert_ne!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.contains("would fail") && r.stdout.contains("(argument `identity`)"),
        "{r:?}"
    );
    fetch_runbook(&sb, &host, "wrong", "latest", &other, &dest, None);
    let r = sb.run(&["plan", "wrong"]);
    assert_ne!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.contains(
            "cannot decrypt the manifest of snapshot 20261201T020000Z (argument `identity`)"
        ),
        "{r:?}"
    );
    let secret = std::fs::read_to_string(&other).unwrap();
    let secret = secret
        .lines()
        .find(|l| l.starts_with("AGE-SECRET-KEY-"))
        .unwrap();
    assert!(!r.stdout.contains(secret) && !r.stderr.contains(secret));
    assert!(!dest.exists());

    // A new host: the wrong identity cannot open the repository key; the right one
    // without the pinned fingerprint is told to give `repo.key`.
    // Pushed again under the same stamp, the push changes nothing and says the key.
    let r = run_json(&sb, "push");
    assert_eq!(r.code, 0, "{r:?}");
    let key = outputs(&r, "push")["key"].as_str().unwrap().to_string();
    let fresh = Sandbox::new();
    let other2 = fresh.p("other.txt");
    std::fs::copy(&other, &other2).unwrap();
    let dest = fresh.p("dest");
    fetch_runbook(&fresh, &host, "wrong", "latest", &other2, &dest, Some(&key));
    let r = fresh.run(&["plan", "wrong"]);
    assert_ne!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.contains(&format!(
            "the identity `{}` cannot decrypt the repository key",
            other2.display()
        )) && r.stdout.contains("(argument `identity`)"),
        "{r:?}"
    );
    let right = fresh.p("identity.txt");
    std::fs::copy(sb.path().join("identity.txt"), &right).unwrap();
    fetch_runbook(&fresh, &host, "unpinned", "latest", &right, &dest, None);
    let r = fresh.run(&["plan", "unpinned"]);
    assert_ne!(r.code, 0, "{r:?}");
    assert!(
        r.stdout
            .contains("give the repository key's fingerprint as `repo.key`")
            && r.stdout.contains(&key),
        "{r:?}"
    );
    assert!(!dest.exists());
}

pub(crate) fn count_objects_below(dir: &Path) -> usize {
    walkdir::WalkDir::new(dir.join("objects"))
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file() && e.file_name().len() == 64)
        .count()
}

#[test]
fn a_link_cut_mid_push_fails_clearly_and_resume_sends_only_what_is_missing() {
    let host = OffsiteHost::start();
    let sb = Sandbox::new();
    let (identity, recipient) = age_keys(sb.path(), "identity.txt");
    let snap = sb.p("snap");
    make_snapshot(&snap, 160, 256 << 10);
    push_runbook(&sb, &host, "push", &snap, "20261201T020000Z", &recipient);
    // A slow link, so the cut lands in the middle of the transfer.
    slow_link(&host, "24mbit");
    let child = sb
        .cmd(&["run", "push", "--yes", "--format", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("a third of the objects on the remote", 120, || {
        count_objects_below(&host.repo_dir) >= 55
    });
    host.link_down();
    let at_cut = count_objects_below(&host.repo_dir);
    let r: Run = child.wait_with_output().unwrap().into();
    assert_ne!(r.code, 0, "{r:?}");
    let text = format!("{}{}", r.stdout, r.stderr);
    assert!(
        text.contains(&format!(
            "cannot reach the off-site host root@{}:22",
            host.host
        )) && text.contains("`runbook resume` this run"),
        "{r:?}"
    );
    assert!(!host.repo_dir.join("snapshots/20261201T020000Z").exists());
    let id = events(&r)[0]["run_id"].as_str().unwrap().to_string();
    host.link_up();
    let r = sb.run(&["resume", &id, "--format", "json"]);
    assert_eq!(r.code, 0, "{r:?}");
    let out = outputs(&r, "push");
    assert_eq!(out["verified"], true);
    let sent = out["objects_sent"].as_u64().unwrap() as usize;
    assert!(at_cut > 0, "no batch was committed before the cut");
    assert!(
        sent <= 164 - at_cut,
        "resume sent {sent} objects; {at_cut} were there already: {out}"
    );
    let dest = sb.p("dest");
    fetch_runbook(&sb, &host, "fetch", "latest", &identity, &dest, None);
    assert_eq!(sb.run(&["run", "fetch", "--yes"]).code, 0);
    assert_eq!(tree(&dest), tree(&snap));
}

#[test]
fn the_engine_killed_during_a_push_or_a_fetch_resumes_to_the_same_end_state() {
    let host = OffsiteHost::start();
    let sb = Sandbox::new();
    let (identity, recipient) = age_keys(sb.path(), "identity.txt");
    let snap = sb.p("snap");
    make_snapshot(&snap, 40, 50_000);
    let dest = sb.p("dest");
    sb.write(
        "runbooks/both.yaml",
        &format!(
            "version: 1\nsteps:\n  - id: push\n    action: offsite-push\n    with:\n      repo: {r}\n      source: \"{}\"\n      stamp: \"20261201T020000Z\"\n      recipients: [\"{recipient}\"]\n  - id: fetch\n    action: offsite-fetch\n    with:\n      repo: {r}\n      identity: \"{}\"\n      dest: \"{}\"\n",
            snap.display(),
            identity.display(),
            dest.display(),
            r = repo_yaml(&host)
        ),
    );
    let mut seen_remote: Option<BTreeMap<PathBuf, String>> = None;
    for point in ["before:push", "after:push", "before:fetch", "after:fetch"] {
        let killed = sb
            .cmd(&["run", "both", "--yes"])
            .env("RUNBOOK_FAILPOINT", point)
            .output()
            .unwrap();
        assert_eq!(
            killed.status.code(),
            None,
            "{point} was not killed: {}",
            String::from_utf8_lossy(&killed.stderr)
        );
        let stdout = String::from_utf8_lossy(&killed.stdout);
        let id = stdout.split_whitespace().nth(1).unwrap().to_string();
        let r = sb.run(&["resume", &id]);
        assert_eq!(r.code, 0, "{point}: {r:?}");
        assert_eq!(tree(&dest), tree(&snap), "{point}");
        let listed = list(&sb, &host);
        assert_eq!(
            listed["20261201T020000Z"]["complete"], true,
            "{point}: {listed:?}"
        );
        // The remote ends as an uninterrupted run leaves it: the same objects, one
        // snapshot, and no temp files.
        let mut names: Vec<String> = walkdir::WalkDir::new(&host.repo_dir)
            .into_iter()
            .flatten()
            .filter(|e| e.file_type().is_file())
            .map(|e| {
                e.path()
                    .strip_prefix(&host.repo_dir)
                    .unwrap()
                    .display()
                    .to_string()
            })
            .collect();
        names.sort();
        assert!(
            names
                .iter()
                .all(|n| !n.contains(".tmp") && !n.contains("/.")),
            "{point}: {names:?}"
        );
        // 44 distinct contents and the manifest.
        assert_eq!(count_objects_below(&host.repo_dir), 45, "{point}");
        let objects = tree_digest(&host.repo_dir.join("objects"));
        if let Some(prev) = &seen_remote {
            assert_eq!(&objects, prev, "{point}: objects were rewritten");
        }
        seen_remote = Some(objects);
        std::fs::remove_dir_all(&dest).unwrap();
        // The next round pushes the same stamp again: it is already verified.
    }

    // Killed in the middle of the transfer itself (a slow link, so it is), then resumed.
    std::fs::remove_dir_all(&host.repo_dir).unwrap();
    std::fs::create_dir(&host.repo_dir).unwrap();
    slow_link(&host, "8mbit");
    let mut child = sb
        .cmd(&["run", "both", "--yes"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("objects arriving", 60, || {
        count_objects_below(&host.repo_dir) >= 5
    });
    child.kill().unwrap();
    assert!(
        !host.repo_dir.join("snapshots/20261201T020000Z").exists(),
        "the push was over before the kill"
    );
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let id = stdout.split_whitespace().nth(1).unwrap().to_string();
    let r = resume_when_unlocked(&sb, &id);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(tree(&dest), tree(&snap));
    assert_eq!(count_objects_below(&host.repo_dir), 45);
}

/// `runbook resume`, again while the killed engine's rsync still holds the run lock.
fn resume_when_unlocked(sb: &Sandbox, id: &str) -> Run {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let r = sb.run(&["resume", id]);
        if r.code == 0 || std::time::Instant::now() > deadline || !r.stderr.contains("lock") {
            return r;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// What the 7/4/6 policy keeps of [`calendar`] (as the local `retention` test).
const KEPT: [&str; 15] = [
    "20261126T020000Z",
    "20261125T020000Z",
    "20261124T020000Z",
    "20261123T020000Z",
    "20261122T020000Z",
    "20261121T020000Z",
    "20261120T020000Z",
    "20261115T020000Z",
    "20261108T020000Z",
    "20261101T020000Z",
    "20261001T020000Z",
    "20260901T020000Z",
    "20260801T020000Z",
    "20260701T020000Z",
    "20260601T020000Z",
];

/// Stamps of a simulated calendar: daily 02:00Z from 2026-01-01 to 2026-11-26.
/// The stamps the retention test pushes: every day of November up to the 26th, the
/// first of every earlier month, and two more that only the policy's age removes.
fn calendar() -> Vec<String> {
    let mut out = Vec::new();
    for day in 1..=26 {
        out.push(format!("202611{day:02}T020000Z"));
    }
    for month in 1..=10 {
        out.push(format!("2026{month:02}01T020000Z"));
    }
    out.push("20260102T020000Z".into());
    out.push("20260615T020000Z".into());
    out.sort();
    out
}

#[test]
fn offsite_retention_keeps_the_policys_fifteen_and_removes_what_only_the_others_list() {
    let host = OffsiteHost::start();
    let sb = Sandbox::new();
    let (identity, recipient) = age_keys(sb.path(), "identity.txt");
    // Real pushes (a copied snapshot file would be a replay, refused): the oldest
    // snapshot with a file of its own, then the newest under every other stamp.
    let old = sb.p("old");
    make_snapshot(&old, 2, 100);
    std::fs::write(old.join("only-in-january.txt"), "january").unwrap();
    push_runbook(&sb, &host, "push-old", &old, "20260101T020000Z", &recipient);
    assert_eq!(sb.run(&["run", "push-old", "--yes"]).code, 0);
    let new = sb.p("new");
    make_snapshot(&new, 2, 100);
    let mut steps = String::from("version: 1\nsteps:\n");
    for stamp in calendar().iter().filter(|s| *s != "20260101T020000Z") {
        steps.push_str(&format!(
            "  - id: push-{stamp}\n    action: offsite-push\n    with:\n      repo: {}\n      source: \"{}\"\n      stamp: \"{stamp}\"\n      recipients: [\"{recipient}\"]\n",
            repo_yaml(&host),
            new.display()
        ));
    }
    sb.write("runbooks/push-new.yaml", &steps);
    let r = sb.run(&["run", "push-new", "--yes"]);
    assert_eq!(r.code, 0, "{r:?}");
    // 6 distinct contents in the newest, January's own file, and two manifests.
    assert_eq!(count_objects_below(&host.repo_dir), 9);
    let snapshots = host.repo_dir.join("snapshots");
    sb.write(
        "runbooks/prune.yaml",
        &format!(
            "version: 1\nsteps:\n  - id: prune\n    action: offsite-retention\n    with:\n      repo: {}\n",
            repo_yaml(&host)
        ),
    );
    let before = tree_digest(&host.repo_dir);
    let plan = sb.run(&["plan", "prune"]);
    assert_eq!(plan.code, 0, "{plan:?}");
    assert!(
        plan.stdout.contains(&format!(
            "delete 23 of 38 off-site snapshots on root@{}:22: 20260101T020000Z 20260102T020000Z",
            host.host
        )) && plan.stdout.contains("and 2 objects")
            && plan
                .stdout
                .contains("keep 15: 20261126T020000Z [daily (2026-11-26), newest]"),
        "{plan:?}"
    );
    assert_eq!(
        tree_digest(&host.repo_dir),
        before,
        "the plan removed something"
    );
    let r = run_json(&sb, "prune");
    assert_eq!(r.code, 0, "{r:?}");
    let out = outputs(&r, "prune");
    // January's file and January's manifest.
    assert_eq!(out["objects_deleted"], 2);
    let mut left: Vec<String> = std::fs::read_dir(&snapshots)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    let mut kept: Vec<String> = KEPT.iter().map(|s| s.to_string()).collect();
    kept.sort();
    assert_eq!(left, kept);
    assert_eq!(count_objects_below(&host.repo_dir), 7);
    let listed = list(&sb, &host);
    assert!(
        listed
            .values()
            .all(|s| s["authenticated"] == true && s["complete"] == true),
        "{listed:?}"
    );
    // Again: nothing more goes.
    let plan = sb.run(&["plan", "prune"]);
    assert!(
        plan.stdout.contains("keeps all 15 off-site snapshots"),
        "{plan:?}"
    );
    let dest = sb.p("dest");
    fetch_runbook(
        &sb,
        &host,
        "fetch",
        "20261101T020000Z",
        &identity,
        &dest,
        None,
    );
    assert_eq!(sb.run(&["run", "fetch", "--yes"]).code, 0);
    assert_eq!(tree(&dest), tree(&new));
}

#[test]
fn a_version_1_repository_is_refused_by_name_and_left_as_it_is() {
    let host = OffsiteHost::start();
    let sb = Sandbox::new();
    let (identity, recipient) = age_keys(sb.path(), "identity.txt");
    // What a v1 push left: its format file, a snapshot with its marker, an object.
    std::fs::write(
        host.repo_dir.join("runbook-offsite.json"),
        "{\"format\":\"runbook-offsite\",\"version\":1}",
    )
    .unwrap();
    std::fs::create_dir_all(host.repo_dir.join("snapshots/20261101T020000Z")).unwrap();
    std::fs::write(
        host.repo_dir.join("snapshots/20261101T020000Z/verified"),
        "",
    )
    .unwrap();
    let before = tree_digest(&host.repo_dir);
    let snap = sb.p("snap");
    make_snapshot(&snap, 1, 100);
    push_runbook(&sb, &host, "push", &snap, "20261201T020000Z", &recipient);
    list_runbook(&sb, &host);
    let dest = sb.p("dest");
    fetch_runbook(&sb, &host, "fetch", "latest", &identity, &dest, None);
    for name in ["push", "list", "fetch"] {
        for cmd in [&["plan", name][..], &["run", name, "--yes"][..]] {
            let r = sb.run(cmd);
            assert_ne!(r.code, 0, "{cmd:?}: {r:?}");
            assert!(
                r.stdout.contains("is of format version 1")
                    || r.stderr.contains("is of format version 1"),
                "{cmd:?}: {r:?}"
            );
        }
    }
    assert_eq!(
        tree_digest(&host.repo_dir),
        before,
        "the v1 repository changed"
    );
    assert!(!dest.exists());
}

#[test]
fn ciphertext_an_earlier_release_staged_under_the_state_dir_is_named_by_the_plan_and_removed() {
    let host = OffsiteHost::start();
    let sb = Sandbox::new();
    let (_, recipient) = age_keys(sb.path(), "identity.txt");
    let snap = sb.p("snap");
    make_snapshot(&snap, 1, 100);
    push_runbook(&sb, &host, "push", &snap, "20261201T020000Z", &recipient);
    assert_eq!(sb.run(&["run", "push", "--yes"]).code, 0);
    // Where format 1 staged a failed push's ciphertext: beside this repository's key.
    let local = walkdir::WalkDir::new(sb.p("state"))
        .into_iter()
        .flatten()
        .find(|e| e.file_name() == "repo-key")
        .unwrap()
        .path()
        .parent()
        .unwrap()
        .to_path_buf();
    let staged = local.join("staging/20261130T020000Z/objects/ab");
    std::fs::create_dir_all(&staged).unwrap();
    std::fs::write(staged.join("ab01"), vec![0u8; 3 << 20]).unwrap();
    push_runbook(&sb, &host, "push2", &snap, "20261202T020000Z", &recipient);
    let plan = sb.run(&["plan", "push2"]);
    assert_eq!(plan.code, 0, "{plan:?}");
    assert!(
        plan.stdout
            .contains("first removes 3.0 MiB an earlier release staged under the state dir"),
        "{plan:?}"
    );
    assert!(staged.join("ab01").exists(), "the plan removed it");
    assert_eq!(sb.run(&["run", "push2", "--yes"]).code, 0);
    assert!(!local.join("staging").exists());
}
