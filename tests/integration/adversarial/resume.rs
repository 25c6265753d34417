//! "Resume always finishes": every multi-phase action killed inside each of its
//! phases (RUNBOOK_FAILPOINT=phase:ACTION:PHASE, a SIGKILL of the engine itself)
//! resumes to exactly the state of an uninterrupted run, with no `.runbook-*`
//! leftovers; failures (not kills) leave no partial; the plan checks room for what
//! the steps write; copies keep holes and never read special files or copy a tree
//! into itself.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{Sandbox, end_state, tree_digest};

/// A tmpfs mounted for one test (we are root), unmounted when dropped.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path, options: &str) -> Tmpfs {
        fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "mount: {out:?}");
        Tmpfs {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

fn leftovers(root: &Path) -> Vec<String> {
    walkdir::WalkDir::new(root)
        .into_iter()
        .flatten()
        .filter(|e| !e.path().starts_with(root.join("state")))
        .map(|e| e.path().strip_prefix(root).unwrap().display().to_string())
        .filter(|n| n.contains(".runbook-"))
        .collect()
}

fn tree(sb: &Sandbox, dir: &str, files: usize) {
    for i in 0..files {
        sb.write(
            &format!("{dir}/sub{}/f{i:02}.bin", i % 3),
            &format!("{dir} {i} ").repeat(200 + i),
        );
    }
    std::os::unix::fs::symlink("sub0/f00.bin", sb.p(dir).join("link")).unwrap();
}

fn live_db(path: &Path) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);
         INSERT INTO t(v) VALUES ('one'), ('two'), ('three');",
    )
    .unwrap();
}

/// One multi-phase action, its world, and the phases it can be killed in.
struct Case {
    name: &'static str,
    runbook: &'static str,
    setup: fn(&Sandbox) -> Option<Tmpfs>,
    /// What the end state compares.
    dirs: &'static [&'static str],
    phases: &'static [&'static str],
}

fn other_fs(sb: &Sandbox) -> Option<Tmpfs> {
    let fs = Tmpfs::mount(&sb.p("other"), "size=64m");
    tree(sb, "other/chroma", 12);
    Some(fs)
}

const CASES: &[Case] = &[
    Case {
        name: "move across filesystems",
        runbook: r#"version: 1
roots: ["{root}/other", "{root}/work"]
steps:
  - id: aside
    action: move
    with: {from: other/chroma, to: work/chroma}
"#,
        setup: |sb| {
            fs::create_dir_all(sb.p("work")).unwrap();
            other_fs(sb)
        },
        dirs: &["work", "other"],
        phases: &[
            "move:copying",
            "move:copied",
            "move:renamed",
            "move:source-deleting",
        ],
    },
    Case {
        name: "copy replacing a tree",
        runbook: r#"version: 1
roots: ["{root}/work"]
steps:
  - id: restore
    action: copy
    with: {from: data, to: work/chroma, overwrite: replace}
"#,
        setup: |sb| {
            tree(sb, "data", 9);
            tree(sb, "work/chroma", 4);
            None
        },
        dirs: &["work", "data"],
        phases: &[
            "copy:copying",
            "copy:copied",
            "copy:old-aside",
            "copy:old-deleting",
        ],
    },
    Case {
        name: "copy replacing a file, keeping the replaced one",
        runbook: r#"version: 1
roots: ["{root}/work"]
steps:
  - id: restore
    action: copy
    with: {from: data/app.conf, to: work/app.conf, overwrite: replace, keep_replaced: work/app.conf.orig}
"#,
        setup: |sb| {
            sb.write("data/app.conf", "new = 1\n");
            sb.write("work/app.conf", "old = 1\n");
            None
        },
        dirs: &["work", "data"],
        phases: &["copy:copied", "copy:kept"],
    },
    Case {
        name: "copy replacing a tree, keeping the replaced one",
        runbook: r#"version: 1
roots: ["{root}/work"]
steps:
  - id: restore
    action: copy
    with: {from: data, to: work/chroma, overwrite: replace, keep_replaced: work/chroma.pre-restore}
"#,
        setup: |sb| {
            tree(sb, "data", 9);
            tree(sb, "work/chroma", 4);
            None
        },
        dirs: &["work", "data"],
        phases: &["copy:copying", "copy:copied", "copy:kept"],
    },
    Case {
        // No roots: a snapshot into a new name needs none, and resume must not take
        // the one its interrupted attempt made for a file to replace.
        name: "sqlite-backup to a new file",
        runbook: r#"version: 1
steps:
  - id: db
    action: sqlite-backup
    with: {source: live.db, dest: work/app.db}
"#,
        setup: |sb| {
            fs::create_dir_all(sb.p("work")).unwrap();
            live_db(&sb.p("live.db"));
            None
        },
        dirs: &["work"],
        phases: &["sqlite-backup:copied", "sqlite-backup:linked"],
    },
    Case {
        name: "sqlite-backup replacing a snapshot",
        runbook: r#"version: 1
roots: ["{root}/work"]
steps:
  - id: db
    action: sqlite-backup
    with: {source: live.db, dest: work/app.db}
"#,
        setup: |sb| {
            fs::create_dir_all(sb.p("work")).unwrap();
            live_db(&sb.p("live.db"));
            live_db(&sb.p("work/app.db"));
            rusqlite::Connection::open(sb.p("work/app.db"))
                .unwrap()
                .execute_batch("DELETE FROM t WHERE id = 1; PRAGMA journal_mode=DELETE;")
                .unwrap();
            None
        },
        dirs: &["work"],
        phases: &["sqlite-backup:copied"],
    },
    Case {
        name: "retention mid-prune",
        runbook: r#"version: 1
roots: ["{root}/work"]
steps:
  - id: prune
    action: retention
    with: {dir: work/snapshots, keep_daily: 2, keep_weekly: 0, keep_monthly: 0}
"#,
        setup: |sb| {
            for day in 1..=6 {
                let stamp = format!("2026010{day}T020000Z");
                tree(sb, &format!("work/snapshots/{stamp}"), 5);
            }
            None
        },
        dirs: &["work"],
        phases: &["retention:pruning"],
    },
    Case {
        name: "write-file",
        runbook: r#"version: 1
steps:
  - id: conf
    action: write-file
    with: {path: work/app.conf, content: "port = 8100\n", mode: "0600"}
"#,
        setup: |sb| {
            sb.write("work/app.conf", "port = 1\n");
            None
        },
        dirs: &["work"],
        phases: &["write-file:written"],
    },
];

fn prepare(case: &Case) -> (Sandbox, Option<Tmpfs>) {
    let sb = Sandbox::new();
    sb.write("runbooks/case.yaml", case.runbook);
    let mount = (case.setup)(&sb);
    (sb, mount)
}

#[test]
fn every_phase_of_every_multi_phase_action_killed_there_resumes_to_the_uninterrupted_end() {
    for case in CASES {
        let (reference, _mount) = prepare(case);
        let r = reference.run(&["run", "case"]);
        assert_eq!(r.code, 0, "{}: {r:?}", case.name);
        let expected = end_state(reference.path(), case.dirs);
        for phase in case.phases {
            let (sb, _mount) = prepare(case);
            let killed = sb
                .cmd(&["run", "case"])
                .env("RUNBOOK_FAILPOINT", format!("phase:{phase}"))
                .output()
                .unwrap();
            assert_eq!(
                killed.status.code(),
                None,
                "{}: phase {phase} was never reached: {}",
                case.name,
                String::from_utf8_lossy(&killed.stdout)
            );
            if *phase == "retention:pruning" {
                // The half-deleted snapshot no longer carries a stamp's name: nothing
                // can take it for a valid snapshot before the resume finishes it.
                let names: Vec<String> = fs::read_dir(sb.p("work/snapshots"))
                    .unwrap()
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect();
                assert!(
                    names.iter().any(|n| n.ends_with(".runbook-deleting")),
                    "{names:?}"
                );
                for stamp in names.iter().filter(|n| !n.starts_with('.')) {
                    let listed = end_state(sb.path(), &[&format!("work/snapshots/{stamp}")]);
                    assert_eq!(listed.len(), 1 + 5 + 3 + 1, "{stamp} is incomplete");
                }
            }
            let stdout = String::from_utf8_lossy(&killed.stdout);
            let id = stdout.split_whitespace().nth(1).unwrap().to_string();
            let r = sb.run(&["resume", &id]);
            assert_eq!(r.code, 0, "{} killed at {phase}: {r:?}", case.name);
            assert_eq!(
                end_state(sb.path(), case.dirs),
                expected,
                "{} killed at {phase} ended elsewhere",
                case.name
            );
            assert_eq!(
                leftovers(sb.path()),
                Vec::<String>::new(),
                "{} killed at {phase}: leftovers",
                case.name
            );
        }
    }
}

#[test]
fn a_copy_that_runs_out_of_space_fails_and_leaves_no_partial() {
    let sb = Sandbox::new();
    // Room for the bytes, not for the inodes: the byte check passes and the
    // filesystem itself says ENOSPC in the middle of the copy.
    let _small = Tmpfs::mount(&sb.p("small"), "size=4m,nr_inodes=16");
    tree(&sb, "data", 40);
    let before = tree_digest(&sb.p("data"));
    for (runbook, action) in [("fill", "copy"), ("fill-move", "move")] {
        sb.write(
            &format!("runbooks/{runbook}.yaml"),
            &format!("version: 1\nroots: [\"{{root}}\"]\nsteps:\n  - id: fill\n    action: {action}\n    with: {{from: data, to: small/data}}\n"),
        );
        let r = sb.run(&["run", runbook]);
        assert_eq!(r.code, 1, "{r:?}");
        assert!(r.stdout.contains("No space left on device"), "{r:?}");
        assert_eq!(
            fs::read_dir(sb.p("small")).unwrap().count(),
            0,
            "the failed {action} left {:?}",
            leftovers(sb.path())
        );
        assert_eq!(tree_digest(&sb.p("data")), before, "{action}");
    }
}

#[test]
fn the_plan_counts_room_for_what_earlier_steps_write_on_the_same_filesystem() {
    let sb = Sandbox::new();
    let _small = Tmpfs::mount(&sb.p("small"), "size=1m");
    let blob = "x".repeat(600 * 1024);
    sb.write("data/one.bin", &blob);
    sb.write("data/two.bin", &blob);
    sb.write("data/big.bin", &"y".repeat(2 << 20));
    sb.write(
        "runbooks/two.yaml",
        "version: 1\nsteps:\n  - id: one\n    action: copy\n    with: {from: data/one.bin, to: small/one.bin}\n  - id: two\n    action: copy\n    with: {from: data/two.bin, to: small/two.bin}\n  - id: note\n    action: write-file\n    with: {path: small/note.txt, content: hello}\n",
    );
    let free = 1 << 20;
    let before = tree_digest(sb.path());
    let plan = sb.run(&["plan", "two"]);
    assert_eq!(tree_digest(sb.path()), before, "the plan wrote");
    assert_eq!(plan.code, 3, "{plan:?}");
    assert!(
        plan.stdout
            .contains("  will change one   copy: copy file (614400 bytes)"),
        "{plan:?}"
    );
    assert!(
        sb.redact(&plan.stdout).contains(&format!(
            "  would fail  two   copy: not enough room for the copy on the filesystem of `{{root}}/small`: it needs 614400 bytes ({free} bytes free, earlier steps write 614400)\n"
        )),
        "{plan:?}"
    );
    // The same check judges a write-file, and a single copy too big on its own.
    sb.write(
        "runbooks/big.yaml",
        "version: 1\nsteps:\n  - id: big\n    action: copy\n    with: {from: data/big.bin, to: small/big.bin}\n",
    );
    let r = sb.run(&["run", "big"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        sb.redact(&r.stderr).contains(&format!(
            "step `big` would fail: not enough room for the copy on the filesystem of `{{root}}/small`: it needs {} bytes ({free} bytes free, earlier steps write 0)",
            2 << 20
        )),
        "{r:?}"
    );
    assert_eq!(fs::read_dir(sb.p("small")).unwrap().count(), 0);
    sb.write(
        "runbooks/note.yaml",
        &format!(
            "version: 1\nsteps:\n  - id: note\n    action: write-file\n    with: {{path: small/note.txt, content: \"{}\"}}\n",
            "z".repeat((1 << 20) + 1)
        ),
    );
    let plan = sb.run(&["plan", "note"]);
    assert!(
        sb.redact(&plan.stdout).contains(&format!(
            "write-file: not enough room for the file on the filesystem of `{{root}}/small`: it needs {} bytes ({free} bytes free, earlier steps write 0)",
            (1 << 20) + 1
        )),
        "{plan:?}"
    );
}

#[test]
fn special_files_in_a_copy_source_are_refused_by_the_plan_and_never_read() {
    let sb = Sandbox::new();
    tree(&sb, "data", 3);
    let fifo = sb.p("data/sub1/queue");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    sb.write(
        "runbooks/fifo.yaml",
        "version: 1\nsteps:\n  - id: tree\n    action: copy\n    with: {from: data, to: copy}\n",
    );
    sb.write(
        "runbooks/one.yaml",
        "version: 1\nsteps:\n  - id: one\n    action: copy\n    with: {from: data/sub1/queue, to: queue-copy}\n",
    );
    sb.write(
        "runbooks/dev.yaml",
        "version: 1\nsteps:\n  - id: dev\n    action: copy\n    with: {from: /dev/zero, to: zeros}\n",
    );
    let plan = sb.run(&["plan", "fifo"]);
    assert!(
        sb.redact(&plan.stdout).contains(
            "  would fail  tree  copy: `data/sub1/queue` is a FIFO (named pipe): a copy takes only files, directories and symlinks (reading it could block or never end)\n"
        ),
        "{plan:?}"
    );
    for (rb, what) in [
        ("fifo", "`data/sub1/queue` is a FIFO (named pipe)"),
        ("one", "`data/sub1/queue` is a FIFO (named pipe)"),
        ("dev", "`/dev/zero` is a character device"),
    ] {
        let started = std::time::Instant::now();
        let r = sb.run(&["run", rb]);
        assert_eq!(r.code, 3, "{rb}: {r:?}");
        assert!(sb.redact(&r.stderr).contains(what), "{rb}: {r:?}");
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
    }
    assert!(!sb.p("copy").exists() && !sb.p("queue-copy").exists() && !sb.p("zeros").exists());
    assert_eq!(leftovers(sb.path()), Vec::<String>::new());
}

/// A 64 MiB file with 8 KiB of data at 1 MiB and 4 KiB at 40 MiB.
fn sparse(path: &Path) {
    use std::os::unix::fs::FileExt;
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let f = fs::File::create(path).unwrap();
    f.set_len(64 << 20).unwrap();
    f.write_all_at(&[7u8; 8192], 1 << 20).unwrap();
    f.write_all_at(&[9u8; 4096], 40 << 20).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn copies_and_moves_keep_holes_as_cp_a_does() {
    let sb = Sandbox::new();
    let _other = Tmpfs::mount(&sb.p("other"), "size=16m");
    sparse(&sb.p("data/disk.img"));
    sparse(&sb.p("tree/images/disk.img"));
    sparse(&sb.p("other/tree/disk.img"));
    sb.write("tree/notes.txt", "dense");
    sb.write(
        "runbooks/sparse.yaml",
        r#"version: 1
roots: ["{root}/other"]
steps:
  - id: file
    action: copy
    with: {from: data/disk.img, to: disk-copy.img}
  - id: tree
    action: copy
    with: {from: tree, to: tree-copy}
  - id: across
    action: move
    with: {from: other/tree, to: moved}
"#,
    );
    let cp = Command::new("cp")
        .arg("-a")
        .arg(sb.p("data/disk.img"))
        .arg(sb.p("cp-copy.img"))
        .status()
        .unwrap();
    assert!(cp.success());
    let r = sb.run(&["run", "sparse", "--format", "json"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains(r#""across_filesystems":true"#), "{r:?}");
    let cp_blocks = fs::metadata(sb.p("cp-copy.img")).unwrap().blocks();
    assert!(
        cp_blocks < 1024,
        "cp -a made {cp_blocks} blocks: holes not kept here"
    );
    for copy in [
        "disk-copy.img",
        "tree-copy/images/disk.img",
        "moved/disk.img",
    ] {
        let m = fs::metadata(sb.p(copy)).unwrap();
        assert_eq!(m.len(), 64 << 20, "{copy}");
        assert!(
            m.blocks() <= cp_blocks,
            "{copy}: {} blocks, cp -a's copy {cp_blocks}",
            m.blocks()
        );
        assert_eq!(
            fs::read(sb.p(copy)).unwrap(),
            fs::read(sb.p("cp-copy.img")).unwrap(),
            "{copy}"
        );
    }
}

#[test]
fn a_copy_or_move_into_its_own_subtree_is_refused_by_plan_and_run() {
    let sb = Sandbox::new();
    tree(&sb, "work/data", 4);
    std::os::unix::fs::symlink("data/sub1", sb.p("work/alias")).unwrap();
    let cases = [
        ("copy", "work/data/sub0/copy", "`work/data/sub0/copy`"),
        ("copy", "work/alias/copy", "`work/alias/copy`"),
        (
            "copy",
            "work/data/sub2/../../data/nested",
            "`work/data/sub2/../../data/nested`",
        ),
        ("move", "work/alias/moved", "`work/alias/moved`"),
        ("move", "work/data/sub0/moved", "`work/data/sub0/moved`"),
    ];
    for (action, to, shown) in cases {
        sb.write(
            "runbooks/self.yaml",
            &format!(
                "version: 1\nroots: [\"{{root}}/work\"]\nsteps:\n  - id: self\n    action: {action}\n    with: {{from: work/data, to: \"{to}\"}}\n"
            ),
        );
        let before = tree_digest(&sb.p("work"));
        let plan = sb.run(&["plan", "self"]);
        let want = format!("{shown} is inside `work/data` (resolved: `");
        assert!(
            plan.stdout.contains("would fail") && plan.stdout.contains(&want),
            "{action} to {to}: {plan:?}"
        );
        assert!(
            plan.stdout
                .contains("a tree cannot be copied or moved into itself"),
            "{plan:?}"
        );
        let r = sb.run(&["run", "self"]);
        assert_eq!(r.code, 3, "{action} to {to}: {r:?}");
        assert_eq!(tree_digest(&sb.p("work")), before, "{action} to {to} wrote");
    }
}
