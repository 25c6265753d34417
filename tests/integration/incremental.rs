//! Incremental snapshots of the vector store (the procedure's follow-up 5): the
//! `chroma` copy of `atocore/backup` shares the files the previous snapshot holds
//! unchanged (hard links), copies the rest, and nothing ever writes through a shared
//! file: restore copies out, retention only unlinks, a later backup never touches an
//! older snapshot.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Ato, verdicts};
use crate::support::tree_digest;

/// Snapshot stamps have one-second resolution: the next backup waits for a new one.
fn next_second() {
    std::thread::sleep(Duration::from_millis(1100));
}

/// Relative path -> (dev, ino) of every regular file below `root`.
fn inodes(root: &Path) -> BTreeMap<PathBuf, (u64, u64)> {
    walkdir::WalkDir::new(root)
        .into_iter()
        .map(Result::unwrap)
        .filter(|e| e.file_type().is_file())
        .map(|e| {
            let m = e.metadata().unwrap();
            let rel = e.path().strip_prefix(root).unwrap().to_path_buf();
            (rel, (m.dev(), m.ino()))
        })
        .collect()
}

/// The disk (st_blocks) of the inodes below `new` that no entry below any of `old`
/// has: what making `new` cost, counting each inode once (directories included).
fn new_disk(new: &Path, old: &[&Path]) -> u64 {
    let seen: BTreeSet<(u64, u64)> = old
        .iter()
        .flat_map(|o| walkdir::WalkDir::new(o).into_iter().map(Result::unwrap))
        .map(|e| {
            let m = e.path().symlink_metadata().unwrap();
            (m.dev(), m.ino())
        })
        .collect();
    let mut counted = BTreeSet::new();
    let mut bytes = 0;
    for e in walkdir::WalkDir::new(new).into_iter().map(Result::unwrap) {
        let m = e.path().symlink_metadata().unwrap();
        let key = (m.dev(), m.ino());
        if !seen.contains(&key) && counted.insert(key) {
            bytes += m.blocks() * 512;
        }
    }
    bytes
}

fn metadata(ato: &Ato, stamp: &str) -> serde_json::Value {
    let text = std::fs::read(ato.snapshot(stamp).join("backup-metadata.json")).unwrap();
    serde_json::from_slice(&text).unwrap()
}

fn validate(ato: &Ato, stamp: &str) {
    let set = format!("stamp={stamp}");
    let r = ato.run("atocore/validate", &["--set", &set]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.outputs()["valid"], true, "{r:?}");
}

/// Rewrites the first bytes of `path` in place, as Chroma updates its files: the same
/// inode, opened for writing without truncating.
fn write_in_place(path: &Path, bytes: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(0)
        .open(path)
        .unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
}

/// The plan of the first backup says the copy is a full one; the plan of the second
/// (read-only: the sandbox is unchanged) says every file will be shared; the second
/// snapshot's files are the first's inodes, it costs at most 1 MiB of new disk, and
/// its metadata records what was shared.
#[test]
fn an_unchanged_second_backup_shares_the_vector_store_and_adds_almost_no_disk() {
    let ato = Ato::new();
    let plan = ato.plan("atocore/backup", &["--set", "include_chroma=true"]);
    assert_eq!(plan.code, 0, "{plan:?}");
    let chroma = verdicts(&plan.json()["steps"])
        .into_iter()
        .find(|s| s.0 == "chroma")
        .unwrap();
    assert_eq!(chroma.1, "will-change", "{chroma:?}");
    assert!(
        chroma
            .2
            .ends_with(": in full (`link_from` is empty: no earlier copy to share with)"),
        "{chroma:?}"
    );
    let first = ato.backup(true);
    let old = ato.snapshot(&first).join("chroma");
    let files = inodes(&old);
    assert!(files.len() >= 3, "{files:?}");
    let meta = metadata(&ato, &first);
    assert_eq!(meta["chroma"]["linked"], 0);
    next_second();

    let before = tree_digest(ato.dir());
    let plan = ato.plan("atocore/backup", &["--set", "include_chroma=true"]);
    assert_eq!(plan.code, 0, "{plan:?}");
    assert_eq!(tree_digest(ato.dir()), before, "the plan changed something");
    let chroma = verdicts(&plan.json()["steps"])
        .into_iter()
        .find(|s| s.0 == "chroma")
        .unwrap();
    let bytes: u64 = files
        .keys()
        .map(|rel| std::fs::metadata(old.join(rel)).unwrap().len())
        .sum();
    let want = format!(
        ": {} unchanged files ({bytes} bytes) shared with `{}`, 0 files copied",
        files.len(),
        old.display()
    );
    assert!(chroma.2.ends_with(&want), "{chroma:?}\nwant {want}");

    let second = ato.backup(true);
    let new = ato.snapshot(&second).join("chroma");
    assert_eq!(inodes(&new), files, "not every file is shared");
    let disk = new_disk(&new, &[&old]);
    assert!(
        disk <= 1 << 20,
        "the second snapshot's vector store took {disk} bytes"
    );
    let meta = metadata(&ato, &second);
    assert_eq!(meta["chroma"]["files"], files.len());
    assert_eq!(meta["chroma"]["linked"], files.len());
    assert_eq!(meta["chroma"]["linked_bytes"], bytes);
    assert_eq!(meta["chroma"]["copied_bytes"], 0);
    validate(&ato, &first);
    validate(&ato, &second);
}

/// A file whose content changed and one whose mode changed are copied, not linked
/// (and the older snapshot keeps its own content and mode); the others are shared.
#[test]
fn a_changed_file_is_copied_not_linked() {
    let ato = Ato::new();
    let first = ato.backup(true);
    let old = ato.snapshot(&first).join("chroma");
    let before = tree_digest(&old);
    let files = inodes(&old);
    let mut rels = files.keys().filter(|r| r.ends_with("data_level0.bin"));
    let (changed, chmodded) = (rels.next().unwrap().clone(), rels.next().unwrap().clone());
    write_in_place(&ato.chroma().join(&changed), b"changed vectors");
    let live_mode = ato.chroma().join(&chmodded);
    std::fs::set_permissions(&live_mode, std::fs::Permissions::from_mode(0o600)).unwrap();
    next_second();

    let second = ato.backup(true);
    let new = ato.snapshot(&second).join("chroma");
    let now = inodes(&new);
    for (rel, inode) in &now {
        let shared = files[rel] == *inode;
        assert_eq!(shared, *rel != changed && *rel != chmodded, "{rel:?}");
    }
    assert_eq!(
        std::fs::read(new.join(&changed)).unwrap(),
        std::fs::read(ato.chroma().join(&changed)).unwrap()
    );
    assert_eq!(
        std::fs::metadata(new.join(&chmodded)).unwrap().mode() & 0o777,
        0o600
    );
    assert_eq!(tree_digest(&old), before, "the older snapshot changed");
    let meta = metadata(&ato, &second);
    assert_eq!(meta["chroma"]["linked"], files.len() - 2);
    let copied = std::fs::metadata(new.join(&changed)).unwrap().len()
        + std::fs::metadata(new.join(&chmodded)).unwrap().len();
    assert_eq!(meta["chroma"]["copied_bytes"], copied);
    validate(&ato, &second);
}

/// Nothing writes through a shared file: after a restore from the older of two
/// snapshots that share their vector store, in-place writes and a chmod of the live
/// (restored) files, and a new backup, both snapshots are byte-identical to what they
/// were (names, modes, owners, sizes, mtimes, content), and every one validates.
#[test]
fn an_older_snapshot_stays_byte_identical_after_a_restore_from_it_and_a_new_backup() {
    let ato = Ato::new();
    ato.start_service();
    let first = ato.backup(true);
    next_second();
    let second = ato.backup(true);
    let (s1, s2) = (ato.snapshot(&first), ato.snapshot(&second));
    let shared = inodes(&s1.join("chroma"));
    assert_eq!(
        inodes(&s2.join("chroma")),
        shared,
        "the snapshots share no files: nothing to prove"
    );
    let (d1, d2) = (tree_digest(&s1), tree_digest(&s2));

    let set = format!("stamp={first}");
    let r = ato.run("atocore/restore", &["--set", &set, "--yes"]);
    assert_eq!(r.code, 0, "{r:?}");
    // The restore copied out: no live file is an inode of a snapshot.
    let snapshot_inodes: BTreeSet<(u64, u64)> = shared.values().copied().collect();
    let live = inodes(&ato.chroma());
    assert_eq!(live.len(), shared.len());
    for (rel, inode) in &live {
        assert!(
            !snapshot_inodes.contains(inode),
            "{rel:?} is a snapshot's inode"
        );
    }
    // The service writes its files in place; the operator changes a mode.
    ato.stop_service();
    for rel in live.keys() {
        write_in_place(&ato.chroma().join(rel), b"written after the restore");
    }
    let first_file = ato.chroma().join(live.keys().next().unwrap());
    std::fs::set_permissions(&first_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    next_second();
    let third = ato.backup(true);

    assert_eq!(tree_digest(&s1), d1, "the restored-from snapshot changed");
    assert_eq!(tree_digest(&s2), d2, "the snapshot sharing it changed");
    let s3 = inodes(&ato.snapshot(&third).join("chroma"));
    for (rel, inode) in &s3 {
        assert!(
            !snapshot_inodes.contains(inode),
            "{rel:?} changed but was linked"
        );
    }
    for stamp in [&first, &second, &third] {
        validate(&ato, stamp);
    }
}

/// Deleting the previous snapshot (retention, as it runs every night: of three
/// snapshots of one day it keeps the first, for the week and the month, and the
/// newest) leaves the next one whole: same digest, it validates, and the backup after
/// it shares with it.
#[test]
fn deleting_the_previous_snapshot_never_damages_the_next() {
    let ato = Ato::new();
    let first = ato.backup(true);
    next_second();
    let second = ato.backup(true);
    next_second();
    let third = ato.backup(true);
    let s3 = ato.snapshot(&third);
    assert_eq!(
        inodes(&s3.join("chroma")),
        inodes(&ato.snapshot(&second).join("chroma"))
    );
    let digest = tree_digest(&s3);

    if first[..8] == third[..8] {
        let r = ato.run("atocore/retention", &[]);
        assert_eq!(r.code, 0, "{r:?}");
        assert_eq!(r.outputs()["deleted"], serde_json::json!([second]), "{r:?}");
    } else {
        // Across midnight all three are kept: delete it by hand, as an operator would.
        std::fs::remove_dir_all(ato.snapshot(&second)).unwrap();
    }
    assert!(!ato.snapshot(&second).exists());
    assert_eq!(
        tree_digest(&s3),
        digest,
        "deleting the older snapshot changed it"
    );
    validate(&ato, &third);

    next_second();
    let fourth = ato.backup(true);
    assert_eq!(
        inodes(&ato.snapshot(&fourth).join("chroma")),
        inodes(&s3.join("chroma"))
    );
    validate(&ato, &fourth);
}

// ------------------------------------------------------- `copy` with `link_from`

const SHARE: &str = r#"version: 1
params:
  to: {type: string, required: true}
  base: {type: string, default: ""}
steps:
  - id: c
    action: copy
    with: {from: "{root}/src", to: "{root}/{{ to }}", link_from: "{{ base }}"}
outputs:
  o: "{{ steps.c.outputs }}"
"#;

fn share_sandbox() -> crate::support::Sandbox {
    let sb = crate::support::Sandbox::new();
    sb.write("runbooks/share.yaml", SHARE);
    sb.write("src/a", "same bytes");
    sb.write("src/b", "same bytes");
    sb.write("src/sub/c", "other bytes");
    // Same mtimes, so `a` and `b` are each the same file as one earlier inode.
    let t = std::fs::FileTimes::new()
        .set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
    for f in ["src/a", "src/b"] {
        std::fs::File::options()
            .write(true)
            .open(sb.p(f))
            .unwrap()
            .set_times(t)
            .unwrap();
    }
    sb
}

fn share(sb: &crate::support::Sandbox, to: &str, base: &Path) -> serde_json::Value {
    let base = format!("base={}", base.display());
    let r = sb.run(&[
        "run",
        "share",
        "--set",
        &format!("to={to}"),
        "--set",
        &base,
        "--format",
        "json",
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    let last: serde_json::Value = serde_json::from_str(r.stdout.lines().last().unwrap()).unwrap();
    last["outputs"]["o"].clone()
}

/// Two source files that an earlier copy holds as one inode (it was hard-linked
/// there) are not made one inode here: the second is copied, so the new copy keeps
/// the source's structure (a restore of it must not hard-link files Chroma keeps
/// apart).
#[test]
fn one_earlier_inode_never_stands_for_two_source_files() {
    let sb = share_sandbox();
    let out = share(&sb, "s1", Path::new(""));
    assert_eq!(out["linked"], 0);
    assert_eq!(out["copied_files"], 3);
    std::fs::remove_file(sb.p("s1/b")).unwrap();
    std::fs::hard_link(sb.p("s1/a"), sb.p("s1/b")).unwrap();
    let out = share(&sb, "s2", &sb.p("s1"));
    assert_eq!(out["linked"], 2, "{out}");
    assert_eq!(out["copied_files"], 1, "{out}");
    let ino = |p: &str| std::fs::metadata(sb.p(p)).unwrap().ino();
    assert_ne!(ino("s2/a"), ino("s2/b"));
    assert_eq!(ino("s2/sub/c"), ino("s1/sub/c"));
}

/// An earlier copy on another filesystem cannot be hard-linked (EXDEV) nor reflinked:
/// every file is copied, and the copy is whole.
#[test]
fn an_earlier_copy_on_another_filesystem_means_a_full_copy() {
    let sb = share_sandbox();
    share(&sb, "s1", Path::new(""));
    let other = Path::new("/dev/shm").join(format!("runbook-share-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&other);
    let r = std::process::Command::new("cp")
        .arg("-a")
        .arg(sb.p("s1"))
        .arg(&other)
        .status()
        .unwrap();
    assert!(r.success());
    assert_ne!(
        std::fs::metadata(&other).unwrap().dev(),
        std::fs::metadata(sb.path()).unwrap().dev(),
        "/dev/shm is not another filesystem here"
    );
    let out = share(&sb, "s2", &other);
    std::fs::remove_dir_all(&other).unwrap();
    assert_eq!(out["linked"], 0, "{out}");
    assert_eq!(out["reflinked"], 0, "{out}");
    assert_eq!(out["copied_files"], 3, "{out}");
    assert_eq!(tree_digest(&sb.p("s2")), tree_digest(&sb.p("s1")));
}

/// A copy never shares files with its own source (a snapshot linked to live data would
/// change with it), and `link_from` does not go with `owner` or `mode` (they would
/// chmod or chown the earlier copy's files through the link).
#[test]
fn link_from_refuses_the_source_itself_and_metadata_changes() {
    let sb = share_sandbox();
    let base = format!("base={}", sb.p("src/sub").display());
    let r = sb.run(&["plan", "share", "--set", "to=s1", "--set", &base]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(r.stdout.contains("is inside the source"), "{r:?}");
    assert!(!sb.p("s1").exists());
    sb.write(
        "runbooks/owned.yaml",
        "version: 1\nsteps:\n  - id: c\n    action: copy\n    with: {from: src, to: s1, link_from: s0, owner: \"0:0\"}\n",
    );
    let r = sb.run(&["validate", "owned"]);
    assert_ne!(r.code, 0, "{r:?}");
    assert!(
        (r.stdout.clone() + &r.stderr).contains("`link_from` does not go with `owner` or `mode`"),
        "{r:?}"
    );
}
