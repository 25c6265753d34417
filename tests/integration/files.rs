//! The files family against real trees: cp -a parity, EXDEV moves, ownership, checks.

use std::fs::{self, File, FileTimes};
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::support::{Sandbox, tree_digest};

/// Everything `cp -a` keeps, per entry: type, mode, owner, size, mtime, link target,
/// xattrs, and which entries share an inode.
fn metadata_listing(root: &Path) -> Vec<String> {
    let mut inodes: Vec<u64> = Vec::new();
    let mut out = Vec::new();
    for entry in walkdir::WalkDir::new(root).sort_by_file_name() {
        let entry = entry.unwrap();
        let m = entry.path().symlink_metadata().unwrap();
        let rel = entry
            .path()
            .strip_prefix(root)
            .unwrap()
            .display()
            .to_string();
        let link = fs::read_link(entry.path())
            .map(|l| l.display().to_string())
            .unwrap_or_default();
        let inode_group = if m.is_file() && m.nlink() > 1 {
            let i = inodes
                .iter()
                .position(|&x| x == m.ino())
                .unwrap_or_else(|| {
                    inodes.push(m.ino());
                    inodes.len() - 1
                });
            format!("link-group-{i}")
        } else {
            String::new()
        };
        let mut xattrs: Vec<String> = xattr::list(entry.path())
            .map(|names| {
                names
                    .map(|n| {
                        format!(
                            "{}={:?}",
                            n.to_string_lossy(),
                            xattr::get(entry.path(), &n).ok().flatten()
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        xattrs.sort();
        let (size, mtime) = if m.file_type().is_symlink() || m.is_dir() {
            (0, 0)
        } else {
            (m.len(), m.mtime())
        };
        out.push(format!(
            "{rel} {:o} {}:{} {size} {mtime} {link} {inode_group} {}",
            m.mode(),
            m.uid(),
            m.gid(),
            xattrs.join(",")
        ));
    }
    out
}

fn set_mtime(path: &Path, secs_ago: u64) {
    let t = SystemTime::now() - Duration::from_secs(secs_ago);
    File::options()
        .read(true)
        .open(path)
        .unwrap()
        .set_times(FileTimes::new().set_modified(t).set_accessed(t))
        .unwrap();
}

/// A tree with what `cp -a` must keep: modes, owners, times, symlinks (one dangling),
/// hard links and an extended attribute.
fn make_tree(root: &Path) {
    fs::create_dir_all(root.join("seg/deep")).unwrap();
    fs::write(root.join("index.bin"), vec![7u8; 100_000]).unwrap();
    fs::write(root.join("seg/a.dat"), b"segment a").unwrap();
    fs::write(root.join("seg/deep/b.dat"), b"segment b").unwrap();
    fs::hard_link(root.join("seg/a.dat"), root.join("seg/a-link.dat")).unwrap();
    symlink("seg/a.dat", root.join("latest")).unwrap();
    symlink("nowhere", root.join("dangling")).unwrap();
    fs::set_permissions(root.join("seg/a.dat"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::set_permissions(root.join("index.bin"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(root.join("seg/deep"), fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::chown(root.join("seg/deep/b.dat"), Some(1234), Some(5678)).unwrap();
    xattr::set(root.join("index.bin"), "user.origin", b"chroma").unwrap();
    set_mtime(&root.join("index.bin"), 86_400);
    set_mtime(&root.join("seg/deep/b.dat"), 3_600);
    set_mtime(&root.join("seg/deep"), 7_200);
}

#[test]
fn copy_of_a_tree_keeps_what_cp_a_keeps() {
    let sb = Sandbox::new();
    make_tree(&sb.p("src"));
    let cp = std::process::Command::new("cp")
        .args(["-a", "src", "by-cp"])
        .current_dir(sb.path())
        .status()
        .unwrap();
    assert!(cp.success());
    sb.write("runbooks/copy.yaml", "version: 1\nsteps:\n  - id: copy\n    action: copy\n    with: {from: src, to: by-runbook}\n");
    let r = sb.run(&["run", "copy"]);
    assert_eq!(r.code, 0, "{r:?}");
    let ours = metadata_listing(&sb.p("by-runbook"));
    assert_eq!(ours, metadata_listing(&sb.p("by-cp")));
    assert!(
        ours.iter()
            .any(|l| l.contains("user.origin=Some([99, 104, 114, 111, 109, 97])")),
        "{ours:#?}"
    );
    assert!(
        ours.iter()
            .any(|l| l.starts_with("seg/deep/b.dat ") && l.contains(" 1234:5678 ")),
        "{ours:#?}"
    );
    assert_eq!(
        ours.iter().filter(|l| l.contains("link-group-0")).count(),
        2,
        "{ours:#?}"
    );
    assert!(!sb.p(".by-runbook.runbook-partial").exists());
    // Copying again is no change.
    let plan = sb.run(&["plan", "copy"]);
    assert_eq!(plan.code, 0);
    assert!(
        plan.stdout
            .contains("  no change   copy  copy: `by-runbook` already holds a copy of `src`\n"),
        "{plan:?}"
    );
}

#[test]
fn copy_replace_keeps_the_replaced_tree_aside_and_sets_the_owner() {
    let sb = Sandbox::new();
    make_tree(&sb.p("snapshot/chroma"));
    sb.write("live/chroma/old-segment", "old");
    sb.write(
        "runbooks/restore.yaml",
        "version: 1\nroots: [\"{root}/live\"]\nsteps:\n  - id: chroma\n    action: copy\n    with: {from: snapshot/chroma, to: live/chroma, overwrite: replace, keep_replaced: live/chroma.pre-restore, owner: \"1000:1000\"}\n",
    );
    let before = tree_digest(sb.path());
    let plan = sb.run(&["plan", "restore"]);
    assert_eq!(plan.code, 0, "{plan:?}");
    assert!(plan.stdout.contains("  will change chroma  copy: replace `live/chroma` with a copy of tree (4 files, 100027 bytes) `snapshot/chroma`\n"), "{plan:?}");
    assert_eq!(tree_digest(sb.path()), before);
    let r = sb.run(&["run", "restore"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(sb.read("live/chroma.pre-restore/old-segment"), "old");
    assert!(!sb.p("live/chroma/old-segment").exists());
    for entry in walkdir::WalkDir::new(sb.p("live/chroma")) {
        let m = entry.unwrap().path().symlink_metadata().unwrap();
        assert_eq!((m.uid(), m.gid()), (1000, 1000));
    }
    // A second replace must not overwrite the safety copy: the plan already says so,
    // and nothing runs.
    sb.write("live/chroma/new-junk", "x");
    let again = sb.run(&["run", "restore"]);
    assert_eq!(again.code, 3, "{again:?}");
    assert!(again.stderr.contains("`keep_replaced` live/chroma.pre-restore already exists; refusing to overwrite a safety copy"), "{again:?}");
    assert_eq!(sb.read("live/chroma/new-junk"), "x");
}

/// A fresh directory on another filesystem (tmpfs) for EXDEV.
fn other_fs_dir(name: &str) -> std::path::PathBuf {
    let dir = Path::new("/dev/shm").join(format!("runbook-test-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    assert_ne!(
        fs::metadata(&dir).unwrap().dev(),
        fs::metadata(std::env::temp_dir()).unwrap().dev(),
        "/dev/shm is not another filesystem here"
    );
    dir
}

#[test]
fn move_across_filesystems_copies_syncs_renames_then_deletes_the_source() {
    let sb = Sandbox::new();
    let shm = other_fs_dir("move");
    make_tree(&shm.join("chroma"));
    let expected = metadata_listing(&shm.join("chroma"));
    sb.write(
        "runbooks/mv.yaml",
        &format!("version: 1\nroots: [\"{}\"]\nsteps:\n  - id: aside\n    action: move\n    with: {{from: \"{}/chroma\", to: moved}}\n", shm.display(), shm.display()),
    );
    let r = sb.run(&["run", "mv", "--format", "json"]);
    assert_eq!(r.code, 0, "{r:?}");
    let done: serde_json::Value = r
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|e| e["event"] == "step-succeeded")
        .unwrap();
    assert_eq!(done["outputs"]["across_filesystems"], true);
    assert!(!shm.join("chroma").exists());
    assert_eq!(metadata_listing(&sb.p("moved")), expected);
    let again = sb.run(&["plan", "mv"]);
    assert!(
        sb.redact(&again.stdout).contains(&format!(
            "  no change   aside  move: `{}/chroma` is already at `moved`\n",
            shm.display()
        )),
        "{again:?}"
    );
    fs::remove_dir_all(&shm).unwrap();
}

#[test]
fn an_interrupted_cross_filesystem_move_resumes_to_the_same_end_state() {
    let sb = Sandbox::new();
    let shm = other_fs_dir("killed-move");
    let src = shm.join("chroma");
    fs::create_dir_all(&src).unwrap();
    for i in 0..300 {
        fs::write(
            src.join(format!("seg-{i:03}")),
            vec![(i % 251) as u8; 256 * 1024],
        )
        .unwrap();
    }
    let expected = metadata_listing(&src);
    sb.write(
        "runbooks/mv.yaml",
        &format!("version: 1\nroots: [\"{}\"]\nsteps:\n  - id: aside\n    action: move\n    with: {{from: \"{}\", to: moved}}\n", shm.display(), src.display()),
    );
    let mut child = sb.spawn(&["run", "mv"]);
    let partial = sb.p(".moved.runbook-partial");
    sb.wait_for("the copy to start", || {
        fs::read_dir(&partial).is_ok_and(|d| d.count() > 5)
    });
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(src.exists(), "the source went before the copy finished");
    let runs = sb.run(&["runs", "--format", "json"]);
    let id = serde_json::from_str::<serde_json::Value>(&runs.stdout).unwrap()[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = sb.run(&["resume", &id]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(!src.exists());
    assert!(!partial.exists());
    assert_eq!(metadata_listing(&sb.p("moved")), expected);
    fs::remove_dir_all(&shm).unwrap();
}

#[test]
fn chown_chmod_and_path_check_act_on_real_ownership() {
    let sb = Sandbox::new();
    sb.write("data/db/atocore.db", "db");
    sb.write("data/db/wal", "w");
    sb.write(
        "runbooks/perms.yaml",
        r#"version: 1
roots: ["{root}/data"]
steps:
  - id: own
    action: chown
    with: {path: data/db, owner: "1000:1000", recursive: true}
  - id: mode
    action: chmod
    with: {path: data/db/atocore.db, mode: "0600"}
  - id: check
    action: path-check
    with: {path: data/db/atocore.db, type: file, owner: "1000:1000", mode: "0600", min_size: 2}
"#,
    );
    // The real path fails the check now; after the two steps before it, it will not.
    let before = tree_digest(sb.path());
    let plan = sb.run(&["plan", "perms"]);
    assert_eq!(plan.code, 0, "{plan:?}");
    let lines: Vec<&str> = plan.stdout.lines().collect();
    assert_eq!(lines[1], "steps:");
    assert_eq!(
        lines[2],
        "  will change own    chown: chown 1000:1000 `data/db` (3 of 3 entries differ; now 0:0)"
    );
    assert_eq!(
        lines[3],
        "  will change mode   chmod: chmod 0600 `data/db/atocore.db`"
    );
    assert_eq!(
        lines[4],
        "  no change   check  path-check: will check `data/db/atocore.db` after the steps before this one"
    );
    assert_eq!(tree_digest(sb.path()), before);
    let text = sb.read("runbooks/perms.yaml");
    sb.write(
        "runbooks/check-only.yaml",
        &format!(
            "version: 1\nsteps:\n{}",
            &text[text.find("  - id: check").unwrap()..]
        ),
    );
    let check_only = sb.run(&["plan", "check-only"]);
    assert_eq!(check_only.code, 3);
    assert!(check_only.stdout.contains("  would fail  check  path-check: `data/db/atocore.db`: owner is 0:0, not 1000:1000; mode is 0644, not 0600\n"), "{check_only:?}");
    let failed = sb.run(&["run", "check-only"]);
    assert_eq!(failed.code, 3);
    assert_eq!(sb.run(&["run", "perms"]).code, 0);
    let m = fs::metadata(sb.p("data/db/atocore.db")).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (1000, 1000, 0o600));
    assert_eq!(fs::metadata(sb.p("data/db/wal")).unwrap().uid(), 1000);
    let again = sb.run(&["plan", "perms"]);
    assert_eq!(again.code, 0, "{again:?}");
    assert!(
        again
            .stdout
            .contains("  no change   own    chown: `data/db` is owned by 1000:1000\n"),
        "{again:?}"
    );
    assert!(
        again
            .stdout
            .contains("  no change   check  path-check: `data/db/atocore.db` is as expected\n"),
        "{again:?}"
    );
    let r = sb.run(&["run", "perms", "--format", "json"]);
    assert_eq!(r.code, 0);
    let check = r
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|e| e["key"] == "check" && e["event"] == "step-succeeded")
        .unwrap();
    assert_eq!(
        check["outputs"],
        serde_json::json!({"path": "data/db/atocore.db", "exists": true, "type": "file", "size": 2, "owner": "1000:1000", "mode": "0600"})
    );
}

#[test]
fn dry_run_of_every_file_action_predicts_and_writes_nothing() {
    let sb = Sandbox::new();
    sb.write("live/registry.json", "{}");
    sb.write(
        "runbooks/all.yaml",
        r#"version: 1
roots: ["{root}/backups", "{root}/live"]
steps:
  - id: dir
    action: mkdir
    with: {path: backups/s1/config}
  - id: copy
    action: copy
    with: {from: live/registry.json, to: backups/s1/config/registry.json}
  - id: own
    action: chown
    with: {path: backups/s1, owner: "1000:1000", recursive: true}
  - id: mode
    action: chmod
    with: {path: backups/s1/config/registry.json, mode: "0644"}
  - id: exists
    action: path-check
    with: {path: backups/s1/config/registry.json, type: file}
  - id: aside
    action: move
    with: {from: live/registry.json, to: live/registry.json.old}
  - id: gone
    action: path-check
    with: {path: live/registry.json, exists: false}
  - id: meta
    action: write-file
    with: {path: backups/s1/meta.txt, content: "s1\n"}
  - id: drop
    action: remove
    with: {path: backups/s1}
  - id: after
    action: path-check
    with: {path: backups/s1/meta.txt}
"#,
    );
    let before = tree_digest(sb.path());
    let plan = sb.run(&["plan", "all"]);
    assert_eq!(plan.code, 3, "{plan:?}");
    assert_eq!(
        plan.stdout.lines().skip(1).collect::<Vec<_>>(),
        [
            "steps:",
            "  will change dir     mkdir: create `backups/s1/config`",
            "  will change copy    copy: copy file (2 bytes) `live/registry.json` to `backups/s1/config/registry.json`",
            "  will change own     chown: chown 1000:1000 `backups/s1`",
            "  will change mode    chmod: chmod 0644 `backups/s1/config/registry.json`",
            "  no change   exists  path-check: will check `backups/s1/config/registry.json` after the steps before this one",
            "  will change aside   move: move `live/registry.json` to `live/registry.json.old`",
            "  no change   gone    path-check: will check `live/registry.json` after the steps before this one",
            "  will change meta    write-file: create `backups/s1/meta.txt` (3 bytes)",
            "  will change drop    remove: remove tree `backups/s1`",
            "  would fail  after   path-check: `backups/s1/meta.txt` will not exist after the steps before this one",
            "10 steps: 7 will change, 2 no change, 0 unknown, 0 skipped, 1 would fail",
        ]
    );
    assert_eq!(tree_digest(sb.path()), before, "the plan wrote something");
}

/// On a terminal (a pty from util-linux `script`), a large tree copy draws a progress bar.
#[test]
fn a_large_copy_shows_progress_on_a_terminal_only() {
    let sb = Sandbox::new();
    fs::create_dir_all(sb.p("big")).unwrap();
    for i in 0..3 {
        fs::write(sb.p(&format!("big/part{i}")), vec![i as u8; 25 << 20]).unwrap();
    }
    sb.write(
        "runbooks/big.yaml",
        "version: 1\nsteps:\n  - id: copy\n    action: copy\n    with: {from: big, to: big-copy}\n",
    );
    let bin = env!("CARGO_BIN_EXE_runbook");
    let on_tty = std::process::Command::new("script")
        .args(["-qec", &format!("{bin} run big"), "/dev/null"])
        .current_dir(sb.path())
        .env("RUNBOOK_STATE_DIR", sb.p("state"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&on_tty.stdout);
    assert!(on_tty.status.success(), "{text}");
    assert!(
        text.contains("copy to big-copy"),
        "no progress bar on a terminal: {text}"
    );
    fs::remove_dir_all(sb.p("big-copy")).unwrap();
    // Without a terminal (CI, pipes) nothing is drawn.
    let piped = sb.run(&["run", "big"]);
    assert_eq!(piped.code, 0, "{piped:?}");
    assert!(!piped.stderr.contains("copy to"), "{piped:?}");
}

#[test]
fn path_check_with_sha256_of_a_missing_file_would_fail_and_does_not_panic() {
    let sb = Sandbox::new();
    sb.write(
        "runbooks/sum.yaml",
        "version: 1\nsteps:\n  - id: sum\n    action: path-check\n    with: {path: missing.db, type: file, sha256: true}\n",
    );
    let before = tree_digest(sb.path());
    let plan = sb.run(&["plan", "sum"]);
    assert_eq!(plan.code, 3, "{plan:?}");
    assert_eq!(
        plan.stdout.lines().skip(1).collect::<Vec<_>>(),
        [
            "steps:",
            "  would fail  sum  path-check: `missing.db`: does not exist",
            "1 steps: 0 will change, 0 no change, 0 unknown, 0 skipped, 1 would fail",
        ],
        "{plan:?}"
    );
    assert_eq!(plan.stderr, "", "{plan:?}");
    let run = sb.run(&["run", "sum"]);
    assert_eq!(run.code, 3, "{run:?}");
    assert_eq!(tree_digest(sb.path()), before, "the plan wrote something");
}
