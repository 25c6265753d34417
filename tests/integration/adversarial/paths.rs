//! Adversarial cases: paths (see mod.rs). "Never outside `roots`", "never the state
//! dir", "one filesystem", judged on resolved paths: symlinks on the way, a mounted
//! filesystem below a tree, the state dir spelt relative or through a link, and the
//! false alarm of a parent directory that is a symlink.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{Run, Sandbox, tree_digest};

fn plan_json(sb: &Sandbox, name: &str) -> (Run, serde_json::Value) {
    let r = sb.run(&["plan", name, "--format", "json"]);
    let v = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {r:?}"));
    (r, v)
}

/// A tree outside the roots that a hostile runbook tries to reach: files, a tree, and
/// stamped snapshot directories (for retention).
fn outside_tree(sb: &Sandbox) -> PathBuf {
    sb.write("outside/victim", "precious");
    sb.write("outside/tree/a", "a");
    sb.write("outside/tree/sub/b", "b");
    for stamp in ["20260101T020000Z", "20260102T020000Z", "20260103T020000Z"] {
        sb.write(&format!("outside/snaps/{stamp}/db"), stamp);
    }
    sb.p("outside")
}

#[test]
fn destructive_actions_through_a_symlink_on_the_way_are_refused_and_touch_nothing_outside() {
    let sb = Sandbox::new();
    let outside = outside_tree(&sb);
    sb.write("live/src", "new content");
    sb.write("live/other/victim", "inside, but reached through a link");
    // `live/via` leads outside the root; `live/back` leads back inside it: both are
    // symlinks on the way, and both are refused.
    symlink(&outside, sb.p("live/via")).unwrap();
    symlink(sb.p("live/other"), sb.p("live/back")).unwrap();
    let cases = [
        (
            "remove",
            "{path: live/via/victim}",
            "live/via/victim",
            "live/via",
        ),
        (
            "remove",
            "{path: live/back/victim}",
            "live/back/victim",
            "live/back",
        ),
        (
            "move",
            "{from: live/via/tree, to: live/moved}",
            "live/via/tree",
            "live/via",
        ),
        (
            "retention",
            "{dir: live/via/snaps, keep_daily: 1, keep_weekly: 0, keep_monthly: 0}",
            "live/via/snaps",
            "live/via",
        ),
        (
            "copy",
            "{from: live/src, to: live/via/victim, overwrite: replace}",
            "live/via/victim",
            "live/via",
        ),
        (
            "chown",
            "{path: live/via/tree, owner: \"4242:4242\", recursive: true}",
            "live/via/tree",
            "live/via",
        ),
        (
            "chmod",
            "{path: live/via/tree, mode: \"0600\", dir_mode: \"0700\", recursive: true}",
            "live/via/tree",
            "live/via",
        ),
    ];
    let before = tree_digest(&outside);
    let inside_before = tree_digest(&sb.p("live/other"));
    for (i, (action, with, target, link)) in cases.iter().enumerate() {
        let name = format!("case{i}");
        sb.write(
            &format!("runbooks/{name}.yaml"),
            &format!("version: 1\nroots: [\"{{root}}/live\"]\nsteps:\n  - id: hostile\n    action: {action}\n    with: {with}\n"),
        );
        let points_to = fs::read_link(sb.p(link)).unwrap();
        let want = format!(
            "refusing to act on `{}`: `{}` on the way is a symlink (-> `{}`); destructive actions do not follow symlinks below a root",
            sb.p(target).display(),
            sb.p(link).display(),
            points_to.display()
        );
        let (r, v) = plan_json(&sb, &name);
        assert_eq!(r.code, 3, "{action}: {r:?}");
        assert_eq!(v["steps"][0]["verdict"], "would-fail", "{action}: {r:?}");
        assert_eq!(v["steps"][0]["detail"], want.as_str(), "{action}");
        let run = sb.run(&["run", &name, "--yes"]);
        assert_eq!(run.code, 3, "{action}: {run:?}");
        assert!(
            run.stdout.contains(&want) || run.stderr.contains(&want),
            "{action}: {run:?}"
        );
        assert_eq!(
            tree_digest(&outside),
            before,
            "{action} touched the outside tree"
        );
        assert_eq!(tree_digest(&sb.p("live/other")), inside_before, "{action}");
    }
}

#[test]
fn a_symlink_as_the_last_component_is_acted_on_as_a_link_never_its_target() {
    let sb = Sandbox::new();
    let outside = outside_tree(&sb);
    fs::create_dir(sb.p("live")).unwrap();
    symlink(outside.join("tree"), sb.p("live/tree-link")).unwrap();
    symlink(outside.join("tree"), sb.p("live/mode-link")).unwrap();
    sb.write(
        "runbooks/links.yaml",
        r#"version: 1
roots: ["{root}/live"]
steps:
  - id: mode
    action: chmod
    with: {path: live/mode-link, mode: "0600", dir_mode: "0700", recursive: true}
  - id: own
    action: chown
    with: {path: live/mode-link, owner: "4242:4242", recursive: true}
  - id: unlink
    action: remove
    with: {path: live/tree-link}
"#,
    );
    let before = tree_digest(&outside);
    let (r, v) = plan_json(&sb, "links");
    assert_eq!(r.code, 0, "{r:?}");
    // chmod of a link changes nothing (a link has no mode of its own); chown changes the
    // link itself; remove removes the link.
    assert_eq!(v["steps"][0]["verdict"], "no-change", "{r:?}");
    assert_eq!(v["steps"][1]["verdict"], "will-change", "{r:?}");
    assert_eq!(
        v["steps"][1]["detail"]
            .as_str()
            .unwrap()
            .split(" (")
            .nth(1)
            .unwrap(),
        "1 of 1 entries differ; now 0:0)",
        "{r:?}"
    );
    assert_eq!(v["steps"][2]["detail"], "remove `live/tree-link`");
    let run = sb.run(&["run", "links", "--yes"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        fs::symlink_metadata(sb.p("live/tree-link")).is_err(),
        "the link is gone"
    );
    assert_eq!(
        fs::symlink_metadata(sb.p("live/mode-link")).unwrap().uid(),
        4242
    );
    assert_eq!(
        tree_digest(&outside),
        before,
        "the links' target was touched"
    );
}

/// A tmpfs mounted at a path for the length of a test, unmounted when dropped (also
/// when the test panics).
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(at: &Path) -> Mount {
        fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
            .arg(at)
            .output()
            .expect("run mount");
        assert!(out.status.success(), "mount tmpfs: {out:?}");
        Mount(at.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_tree_with_a_filesystem_mounted_below_is_refused_before_anything_is_deleted() {
    let sb = Sandbox::new();
    sb.write("live/tree/a", "a");
    sb.write("live/tree/sub/b", "b");
    sb.write("live/snaps/20260101T020000Z/db", "old");
    sb.write("live/snaps/20260103T020000Z/db", "new");
    let _tree_mount = Mount::tmpfs(&sb.p("live/tree/sub/mnt"));
    let _snap_mount = Mount::tmpfs(&sb.p("live/snaps/20260101T020000Z/mnt"));
    fs::write(sb.p("live/tree/sub/mnt/other-fs-file"), "on the tmpfs").unwrap();
    fs::write(sb.p("live/snaps/20260101T020000Z/mnt/f"), "on the tmpfs").unwrap();
    let steps = [
        (
            "remove",
            "{path: live/tree}",
            "live/tree",
            "live/tree/sub/mnt",
        ),
        (
            "retention",
            "{dir: live/snaps, keep_daily: 1, keep_weekly: 0, keep_monthly: 0}",
            "live/snaps/20260101T020000Z",
            "live/snaps/20260101T020000Z/mnt",
        ),
        (
            "chmod",
            "{path: live/tree, mode: \"0600\", dir_mode: \"0700\", recursive: true}",
            "live/tree",
            "live/tree/sub/mnt",
        ),
    ];
    let before = tree_digest(&sb.p("live"));
    for (i, (action, with, target, mount)) in steps.iter().enumerate() {
        let name = format!("mnt{i}");
        sb.write(
            &format!("runbooks/{name}.yaml"),
            &format!("version: 1\nroots: [\"{{root}}/live\"]\nsteps:\n  - id: go\n    action: {action}\n    with: {with}\n"),
        );
        let (r, v) = plan_json(&sb, &name);
        assert_eq!(r.code, 3, "{action}: {r:?}");
        assert_eq!(v["steps"][0]["verdict"], "would-fail");
        assert_eq!(
            v["steps"][0]["detail"],
            format!(
                "refusing to act on `{}`: `{}` below it is a mount point (another filesystem); destructive actions stay on one filesystem",
                sb.p(target).display(),
                sb.p(mount).display()
            ),
            "{action}"
        );
        let run = sb.run(&["run", &name, "--yes"]);
        assert_eq!(run.code, 3, "{action}: {run:?}");
        assert_eq!(
            tree_digest(&sb.p("live")),
            before,
            "{action} changed something"
        );
    }
    // The mount point itself is no target either: its files are the other filesystem's.
    sb.write(
        "runbooks/at-mount.yaml",
        "version: 1\nroots: [\"{root}/live\"]\nsteps:\n  - id: go\n    action: remove\n    with: {path: live/tree/sub/mnt}\n",
    );
    let (r, v) = plan_json(&sb, "at-mount");
    assert_eq!(r.code, 3, "{r:?}");
    assert_eq!(
        v["steps"][0]["detail"],
        format!(
            "refusing to act on `{}`: it is a mount point; destructive actions stay on one filesystem",
            sb.p("live/tree/sub/mnt").display()
        )
    );
    assert_eq!(sb.read("live/tree/sub/mnt/other-fs-file"), "on the tmpfs");
    assert_eq!(tree_digest(&sb.p("live")), before);
}

#[test]
fn nothing_in_the_state_dir_is_a_target_of_any_writing_action() {
    let sb = Sandbox::new();
    sb.write("live/data.json", "{}");
    // A first run makes the journal and the lock directory.
    sb.write(
        "runbooks/first.yaml",
        "version: 1\nsteps:\n  - id: ok\n    action: path-check\n    with: {path: live/data.json}\n",
    );
    let r = sb.run(&["run", "first"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(sb.p("state/journal.db").is_file() && sb.p("state/locks").is_dir());
    {
        let db = rusqlite::Connection::open(sb.p("live/src.db")).unwrap();
        db.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
            .unwrap();
    }
    symlink(sb.p("state"), sb.p("state-link")).unwrap();
    // Every writing action, at the journal, the locks, the state dir itself and what
    // holds it; spelt relative to the working directory or through a symlink.
    let steps = [
        ("remove", "{path: state/journal.db}"),
        ("remove", "{path: state/locks}"),
        ("remove", "{path: state-link/journal.db-wal}"),
        ("remove", "{path: \"{root}/state\"}"),
        ("remove", "{path: \"{root}/live/../state/locks\"}"),
        ("move", "{from: state/journal.db, to: live/stolen.db}"),
        (
            "move",
            "{from: live/data.json, to: state-link/locks/data.json}",
        ),
        (
            "copy",
            "{from: live/data.json, to: state/journal.db, overwrite: replace}",
        ),
        ("copy", "{from: live/data.json, to: state-link/new.json}"),
        ("write-file", "{path: state-link/journal.db, content: x}"),
        ("mkdir", "{path: state/locks/sub}"),
        (
            "sqlite-backup",
            "{source: live/src.db, dest: state/journal.db}",
        ),
        (
            "sqlite-backup",
            "{source: live/src.db, dest: state-link/snap.db}",
        ),
        ("chown", "{path: state/journal.db, owner: \"4242:4242\"}"),
        ("chmod", "{path: state-link/locks, mode: \"0777\"}"),
        (
            "chmod",
            "{path: \"{root}\", mode: \"0700\", recursive: true}",
        ),
        ("retention", "{dir: state}"),
    ];
    let mut yaml = String::from("version: 1\nroots: [\"{root}\"]\nsteps:\n");
    for (i, (action, with)) in steps.iter().enumerate() {
        yaml.push_str(&format!(
            "  - id: s{i}\n    action: {action}\n    with: {with}\n"
        ));
    }
    sb.write("runbooks/hostile.yaml", &yaml);
    let state = tree_digest(&sb.p("state"));
    let (r, v) = plan_json(&sb, "hostile");
    assert_eq!(r.code, 3, "{r:?}");
    let state_dir = sb.p("state").display().to_string();
    for (i, (action, _)) in steps.iter().enumerate() {
        let step = &v["steps"][i];
        assert_eq!(step["verdict"], "would-fail", "{action} s{i}: {step}");
        let detail = step["detail"].as_str().unwrap();
        assert!(
            detail.ends_with(&format!(
                "it is inside the runbook state dir `{state_dir}` (the journal and locks belong to the engine)"
            )) || detail.ends_with(&format!("it holds the runbook state dir `{state_dir}`")),
            "{action} s{i}: {detail}"
        );
    }
    assert_eq!(
        tree_digest(&sb.p("state")),
        state,
        "the plan touched the state dir"
    );
    let run = sb.run(&["run", "hostile", "--yes"]);
    assert_eq!(run.code, 3, "{run:?}");
    assert!(sb.p("state/journal.db").is_file() && sb.p("state/locks").is_dir());
    assert_eq!(
        fs::metadata(sb.p("state/journal.db")).unwrap().uid(),
        0,
        "chown reached the journal"
    );

    // The state dir itself given relative, or through a symlink, changes nothing.
    for state_arg in ["state", "state-link"] {
        let mut cmd = sb.cmd(&[
            "--state-dir",
            state_arg,
            "plan",
            "hostile",
            "--format",
            "json",
        ]);
        cmd.env_remove("RUNBOOK_STATE_DIR");
        let r: Run = cmd.output().unwrap().into();
        assert_eq!(r.code, 3, "{state_arg}: {r:?}");
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        for i in 0..steps.len() {
            assert_eq!(v["steps"][i]["verdict"], "would-fail", "{state_arg} s{i}");
            assert!(
                v["steps"][i]["detail"]
                    .as_str()
                    .unwrap()
                    .contains("runbook state dir"),
                "{state_arg} s{i}: {}",
                v["steps"][i]["detail"]
            );
        }
    }
}

#[test]
fn a_runbook_under_a_symlinked_parent_directory_plans_and_runs() {
    let sb = Sandbox::new();
    // `srv` is a link to the real directory, as `/srv` often is on a host.
    sb.write("disk/srv/app/data.json", "{\"ok\": true}");
    sb.write("disk/srv/app/old/file", "old");
    symlink(sb.p("disk/srv"), sb.p("srv")).unwrap();
    symlink(sb.p("disk/srv/app"), sb.p("app-link")).unwrap();
    {
        let db = rusqlite::Connection::open(sb.p("disk/srv/app/live.db")).unwrap();
        db.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
            .unwrap();
    }
    sb.write(
        "runbooks/srv.yaml",
        r#"version: 1
roots: ["{root}/srv/app"]
steps:
  - id: check-dir
    action: path-check
    with: {path: app-link, type: dir}
  - id: note
    action: write-file
    with: {path: app-link/note.txt, content: "hello\n"}
  - id: cache
    action: mkdir
    with: {path: app-link/cache/x}
  - id: copy
    action: copy
    with: {from: app-link/note.txt, to: app-link/cache/x/note.txt}
  - id: json
    action: json-check
    with: {path: srv/app/data.json, expect: [".ok"]}
  - id: snap
    action: sqlite-backup
    with: {source: srv/app/live.db, dest: app-link/snap.db}
  - id: db-check
    action: sqlite-check
    with: {path: app-link/snap.db}
  - id: in-dir
    action: exec
    with: {argv: [ls, note.txt], cwd: app-link}
  - id: modes
    action: chmod
    with: {path: srv/app/cache, mode: "0640", dir_mode: "0750", recursive: true}
  - id: clean
    action: remove
    with: {path: srv/app/old}
"#,
    );
    let before = tree_digest(sb.path());
    let (r, v) = plan_json(&sb, "srv");
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(tree_digest(sb.path()), before, "the plan wrote something");
    let verdicts: Vec<&str> = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["verdict"].as_str().unwrap())
        .collect();
    assert!(!verdicts.contains(&"would-fail"), "{verdicts:?}: {r:?}");
    let run = sb.run(&["run", "srv", "--yes"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(sb.read("disk/srv/app/cache/x/note.txt"), "hello\n");
    assert!(sb.p("disk/srv/app/snap.db").is_file());
    assert!(!sb.p("disk/srv/app/old").exists());
    let mode = |rel: &str| fs::metadata(sb.p(rel)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("disk/srv/app/cache"), 0o750);
    assert_eq!(mode("disk/srv/app/cache/x/note.txt"), 0o640);
    assert!(
        fs::symlink_metadata(sb.p("srv"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

#[test]
fn chmod_recursive_gives_every_directory_dir_mode_the_top_one_too() {
    let sb = Sandbox::new();
    sb.write("tree/f", "f");
    sb.write("tree/sub/g", "g");
    sb.write(
        "runbooks/modes.yaml",
        r#"version: 1
roots: ["{root}"]
steps:
  - id: modes
    action: chmod
    with: {path: tree, mode: "0640", dir_mode: "0750", recursive: true}
"#,
    );
    let r = sb.run(&["run", "modes"]);
    assert_eq!(r.code, 0, "{r:?}");
    let mode = |rel: &str| fs::metadata(sb.p(rel)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(
        [
            mode("tree"),
            mode("tree/sub"),
            mode("tree/f"),
            mode("tree/sub/g")
        ],
        [0o750, 0o750, 0o640, 0o640]
    );
    let (r, v) = plan_json(&sb, "modes");
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(v["steps"][0]["verdict"], "no-change", "{r:?}");
}
