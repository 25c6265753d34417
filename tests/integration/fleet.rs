//! `runbook fleet`: what it refuses before any host is contacted, then runs against
//! three real SSH hosts (`OffsiteHost`: Debian's sshd, each in a network namespace of
//! its own behind a veth pair, with its own data directory), the static engine
//! installed on them by the fleet code itself.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value as Json;

use crate::support::{OffsiteHost, Run, Sandbox, static_runbook, tree_digest};

const RUNBOOK: &str = "version: 1
description: two appends
params:
  out: {type: string, required: true}
steps:
  - id: one
    action: exec
    with: {argv: [sh, -c, 'echo one >> \"$0\"', \"{{ out }}\"]}
";

fn sandbox(inventory: &str) -> Sandbox {
    let sb = Sandbox::new();
    sb.write("runbooks/t/count.yaml", RUNBOOK);
    sb.write("key", "not a key\n");
    sb.write("known_hosts", "\n");
    sb.write("hosts.yaml", inventory);
    sb
}

/// One host at 127.0.0.1:9 (discard), where nothing listens: ssh fails at once.
const REFUSING_HOST: &str = "hosts:\n  a:\n    address: 127.0.0.1\n    port: 9\n    ssh_key: key\n    known_hosts: known_hosts\n";

/// `fleet COMMAND t/count --hosts hosts.yaml EXTRA...` in the sandbox.
fn fleet_on(sb: &Sandbox, command: &str, extra: &[&str]) -> Run {
    sb.run(
        &[
            &["fleet", command, "t/count", "--hosts", "hosts.yaml"],
            extra,
        ]
        .concat(),
    )
}

/// `fleet run` with `--engine ENGINE`.
fn run_with_engine(sb: &Sandbox, engine: &str) -> Run {
    fleet_on(sb, "run", &["--set", "out=/tmp/x", "--engine", engine])
}

#[test]
fn fleet_schema_file_matches_the_code() {
    let sb = Sandbox::new();
    let r = sb.run(&["fleet", "schema"]);
    assert_eq!(r.code, 0);
    let file = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/schemas/hosts.schema.json"
    ))
    .unwrap();
    assert!(
        r.stdout == file,
        "schemas/hosts.schema.json is stale: run `cargo run -- fleet schema > schemas/hosts.schema.json`"
    );
}

#[test]
fn an_address_that_ssh_would_read_as_an_option_is_refused_at_its_line() {
    let sb = sandbox(
        "hosts:\n  a:\n    address: -oProxyCommand=touch${IFS}/tmp/pwned\n    ssh_key: key\n    known_hosts: known_hosts\n",
    );
    let r = fleet_on(&sb, "run", &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("hosts.yaml:3:14")
            && r.stderr.contains("hosts.a.address")
            && r.stderr.contains("is not a host name or IP address"),
        "{}",
        r.stderr
    );
    assert!(
        !sb.p("state/fleet").exists(),
        "a refused fleet run wrote a record"
    );
}

#[test]
fn an_unknown_limit_and_an_unknown_group_member_are_named() {
    let inv = "hosts:\n  web1:\n    address: 127.0.0.1\n    ssh_key: key\n    known_hosts: known_hosts\ngroups:\n  web: [web1, web2]\n";
    let sb = sandbox(inv);
    let r = fleet_on(&sb, "run", &[]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("hosts.yaml:7:15") && r.stderr.contains("no host named `web2`"),
        "{}",
        r.stderr
    );
    sb.write("hosts.yaml", &inv.replace(", web2", ""));
    let r = fleet_on(&sb, "plan", &["--limit", "wbe"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("--limit: no host or group named `wbe`")
            && r.stderr.contains("did you mean `web"),
        "{}",
        r.stderr
    );
    // A window of 0 would run nothing and report nothing: refused.
    let r = fleet_on(&sb, "run", &["--parallel", "0"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("give 1 or more"), "{}", r.stderr);
}

#[test]
fn a_fleet_run_id_that_is_a_path_is_refused_and_nothing_outside_the_state_dir_is_read() {
    let sb = sandbox("hosts: {}\n");
    // A well-formed record outside the state dir: neither read nor locked.
    sb.write(
        "elsewhere/x.jsonl",
        "{\"event\":\"fleet-started\",\"format\":\"runbook-fleet/1\"}\n",
    );
    for args in [
        ["show", "../elsewhere/x"],
        ["resume", "../../elsewhere/x"],
        ["show", "/tmp/x"],
    ] {
        let r = sb.run(&[&["fleet"], &args[..]].concat());
        assert_eq!(r.code, 2, "{r:?}");
        assert!(
            r.stderr
                .contains(&format!("`{}` is not a fleet run id", args[1])),
            "{r:?}"
        );
    }
    let left: Vec<_> = std::fs::read_dir(sb.p("elsewhere")).unwrap().collect();
    assert_eq!(left.len(), 1, "something was written beside the record");
    let r = sb.run(&["fleet", "show", "fleet-20991231T000000Z-abcdef"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr
            .contains("no fleet run `fleet-20991231T000000Z-abcdef`"),
        "{r:?}"
    );
}

#[test]
fn a_plan_whose_ssh_fails_before_reading_its_values_reports_the_host_instead_of_dying() {
    // More than a pipe holds (64 KiB): the write of the host's values to its ssh is
    // still going when ssh gives up, and fails with EPIPE (not SIGPIPE).
    let sb = sandbox(REFUSING_HOST);
    sb.write("big.yaml", &format!("out: /tmp/{}\n", "x".repeat(200_000)));
    std::fs::copy(static_runbook(), sb.p("engine")).unwrap();
    let r = fleet_on(&sb, "plan", &["--vars", "big.yaml", "--engine", "engine"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.contains("unreachable"), "{r:?}");
}

#[test]
fn an_engine_checked_before_is_not_hashed_again_until_its_file_changes() {
    // The host refuses the connection: unreachable, exit 1, after the engine passed.
    let sb = sandbox(REFUSING_HOST);
    std::fs::copy(static_runbook(), sb.p("engine")).unwrap();
    let run = || run_with_engine(&sb, "engine");
    let r = run();
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.contains("unreachable"), "{r:?}");
    let checked = sb.read("state/fleet/checked-engines.json");
    assert!(checked.contains("/engine|"), "{checked}");
    // The next run takes the sha256 from there (a planted one shows it was not hashed).
    let mut doc: Json = serde_json::from_str(&checked).unwrap();
    for entry in doc.as_object_mut().unwrap().values_mut() {
        entry["sha256"] = Json::String("f".repeat(64));
    }
    sb.write("state/fleet/checked-engines.json", &doc.to_string());
    assert_eq!(run().code, 1);
    let records: Vec<String> = std::fs::read_dir(sb.p("state/fleet"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    assert_eq!(records.len(), 2);
    assert_eq!(
        records
            .iter()
            .filter(|r| r.contains(&format!("\"engine_sha256\":\"{}\"", "f".repeat(64))))
            .count(),
        1,
        "{records:?}"
    );
    // The same file, rewritten in place (same inode) with a dynamically linked build:
    // its ctime moved, so it is checked again and refused.
    std::fs::write(
        sb.p("engine"),
        std::fs::read(env!("CARGO_BIN_EXE_runbook")).unwrap(),
    )
    .unwrap();
    let r = run();
    assert_eq!(r.code, 3, "{r:?}");
    assert!(r.stderr.contains("is dynamically linked"), "{r:?}");
}

#[test]
fn a_dynamically_linked_engine_is_refused_before_any_host_is_contacted() {
    // The host would refuse the connection: the engine's refusal must come first.
    let sb = sandbox(REFUSING_HOST);
    let r = run_with_engine(&sb, env!("CARGO_BIN_EXE_runbook"));
    assert_eq!(r.code, 3, "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("is dynamically linked") && r.stderr.contains("crt-static"),
        "{}",
        r.stderr
    );
    assert!(!sb.p("state/fleet").exists());
    let r = fleet_on(&sb, "run", &["--set", "outt=/tmp/x"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr
            .contains("declares no param `outt`; did you mean `out`?"),
        "{}",
        r.stderr
    );
}

// ------------------------------------------------------------ against real hosts

/// Counts its side effects: steps `one`, `two` and `three` each append their name to
/// `out` on the host. `gate` waits for the file `gate` to appear and fails unless it
/// holds `go`, so a test can hold every host inside the run, or fail one. `three`
/// gets the secret `token` in its environment and leaves only its sha256 behind.
const COUNTING: &str = r#"version: 1
description: three counted appends around a gate
params:
  out: {type: path, required: true}
  gate: {type: path, required: true}
  token: {type: string, secret: true, required: true}
steps:
  - id: one
    action: exec
    with: {argv: [sh, -c, 'echo one >> "$0"', "{{ out }}"], writes: ["{{ out }}"]}
  - id: two
    action: exec
    with: {argv: [sh, -c, 'echo two >> "$0"', "{{ out }}"], writes: ["{{ out }}"]}
  - id: gate
    action: exec
    idempotent: true
    with:
      argv: [sh, -c, 'while [ ! -e "$0" ]; do sleep 0.05; done; [ "$(cat "$0")" = go ]', "{{ gate }}"]
  - id: three
    action: exec
    with:
      argv: [sh, -c, 'echo three >> "$0"; printf %s "$TOKEN" | sha256sum > "$0.token"', "{{ out }}"]
      env: {TOKEN: "{{ token }}"}
      writes: ["{{ out }}", "{{ out }}.token"]
"#;

const SECRET: &str = "fleet-s3cret-7Qx9";

/// A controller sandbox and real hosts named `a`, `b`, `c`..., each with its fleet
/// `dir` and its files (`out`, `gate`) in the host's own directory.
struct Fleet {
    sb: Sandbox,
    hosts: BTreeMap<String, OffsiteHost>,
    /// The search path the fleet commands get (`--path`): the sandbox's `runbooks/`.
    runbooks: PathBuf,
}

impl Fleet {
    /// Starts the hosts at once (each start waits for a real ssh login) and writes
    /// `hosts.yaml`; `vars(name, host)` gives each host's `vars` as a JSON object.
    fn start(names: &[&str], vars: impl Fn(&str, &OffsiteHost) -> Json) -> Fleet {
        let started: Vec<OffsiteHost> = std::thread::scope(|s| {
            let handles: Vec<_> = names.iter().map(|_| s.spawn(OffsiteHost::start)).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let hosts: BTreeMap<String, OffsiteHost> =
            names.iter().map(|n| n.to_string()).zip(started).collect();
        let sb = Sandbox::new();
        let mut inventory = String::from("hosts:\n");
        for (name, h) in &hosts {
            std::fs::create_dir_all(h.dir.path().join("files")).unwrap();
            inventory += &format!(
                "  {name}:\n    address: {}\n    port: {}\n    user: {}\n    ssh_key: {}\n    known_hosts: {}\n    dir: {}\n    vars: {}\n",
                h.host,
                h.port,
                h.user,
                h.ssh_key.display(),
                h.known_hosts.display(),
                h.dir.path().join("fleet").display(),
                vars(name, h)
            );
        }
        inventory += &format!("groups:\n  all: [{}]\n", names.join(", "));
        sb.write("hosts.yaml", &inventory);
        sb.write("secrets.yaml", &format!("token: {SECRET}\n"));
        let runbooks = sb.p("runbooks");
        Fleet {
            sb,
            hosts,
            runbooks,
        }
    }

    /// Hosts for [`COUNTING`] (`runbooks/t/count.yaml`).
    fn counting(names: &[&str]) -> Fleet {
        let fleet = Fleet::start(names, |_, h| {
            let files = h.dir.path().join("files");
            serde_json::json!({
                "out": files.join("out"),
                "gate": files.join("gate"),
            })
        });
        fleet.sb.write("runbooks/t/count.yaml", COUNTING);
        fleet
    }

    fn host(&self, name: &str) -> &OffsiteHost {
        &self.hosts[name]
    }

    /// A file in host `name`'s own directory.
    fn file(&self, name: &str, rel: &str) -> PathBuf {
        self.host(name).dir.path().join("files").join(rel)
    }

    /// The lines the counted steps appended on host `name`.
    fn count(&self, name: &str) -> String {
        std::fs::read_to_string(self.file(name, "out")).unwrap_or_default()
    }

    fn open_gate(&self, name: &str, word: &str) {
        std::fs::write(self.file(name, "gate"), word).unwrap();
    }

    /// `runbook [--path runbooks] fleet ARGS` with the static engine.
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = self.sb.cmd(&["--path"]);
        c.arg(&self.runbooks)
            .arg("fleet")
            .args(args)
            .env("RUNBOOK_FLEET_ENGINE", static_runbook());
        c
    }

    fn fleet(&self, args: &[&str]) -> Run {
        self.cmd(args).output().expect("run runbook fleet").into()
    }

    /// `runbook fleet ARGS` on a terminal (script(1)); what it showed, escapes removed.
    fn on_terminal(&self, args: &str) -> String {
        let line = format!(
            "{} --path {} fleet {args}",
            env!("CARGO_BIN_EXE_runbook"),
            self.runbooks.display()
        );
        let out = Command::new("script")
            .args(["-qec", &line, "/dev/null"])
            .current_dir(self.sb.path())
            .env("RUNBOOK_STATE_DIR", self.sb.p("state"))
            .env("RUNBOOK_FLEET_ENGINE", static_runbook())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        let escapes = regex::Regex::new(r"\x1b\[[0-9;?]*[A-Za-z]").unwrap();
        escapes.replace_all(&text, "").replace('\r', "\n")
    }

    fn show(&self, id: &str) -> Json {
        let r = self.fleet(&["show", id, "--format", "json"]);
        assert_eq!(r.code, 0, "{r:?}");
        serde_json::from_str(&r.stdout).unwrap()
    }

    /// `fleet show`'s hosts as `name -> (status, run id, failed step)`.
    fn statuses(&self, id: &str) -> BTreeMap<String, (String, Option<String>, Option<String>)> {
        let s = |v: &Json| v.as_str().map(str::to_string);
        self.show(id)["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| {
                (
                    s(&h["host"]).unwrap(),
                    (
                        s(&h["status"]).unwrap(),
                        s(&h["run_id"]),
                        s(&h["failed_step"]),
                    ),
                )
            })
            .collect()
    }

    /// The only fleet run's id.
    fn only_run(&self) -> String {
        let r = self.fleet(&["runs", "--format", "json"]);
        assert_eq!(r.code, 0, "{r:?}");
        let runs: Json = serde_json::from_str(&r.stdout).unwrap();
        assert_eq!(runs.as_array().unwrap().len(), 1, "{runs}");
        for key in ["id", "runbook", "status", "started_at"] {
            assert!(runs[0][key].is_string(), "no `{key}`: {runs}");
        }
        runs[0]["id"].as_str().unwrap().to_string()
    }

    /// Waits (bounded) until `cond` holds.
    fn wait_for(&self, what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + limit;
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until every host's run is held at the gate (`one` and `two` done).
    fn wait_at_gates(&self) {
        for name in self.hosts.keys() {
            self.wait_for(
                &format!("host {name} to reach the gate"),
                Duration::from_secs(60),
                || self.count(name) == "one\ntwo\n",
            );
        }
    }

    /// Starts `fleet run t/count` on every host at once (the secret from a vars file)
    /// and waits until each host's run is held at its gate.
    fn run_to_the_gates(&self, extra: &[&str]) -> std::process::Child {
        let child = self
            .cmd(&["run", "t/count", "--hosts", "hosts.yaml", "--parallel", "3"])
            .args(["--vars", "secrets.yaml"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        self.wait_at_gates();
        child
    }

    /// The run's journal on host `name`, read there by the engine installed there.
    fn host_run(&self, name: &str, run_id: &str) -> Json {
        let dir = self.host(name).dir.path().join("fleet");
        let engine = std::fs::read_dir(dir.join("bin"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let out = Command::new(engine)
            .args(["show", run_id, "--format", "json"])
            .env("RUNBOOK_STATE_DIR", dir.join("state"))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let r: Run = out.into();
        assert_eq!(r.code, 0, "{r:?}");
        serde_json::from_str(&r.stdout).unwrap()
    }
}

fn status(
    s: &str,
    run_id: Option<&str>,
    failed: Option<&str>,
) -> (String, Option<String>, Option<String>) {
    (
        s.into(),
        run_id.map(str::to_string),
        failed.map(str::to_string),
    )
}

/// Every file below `root` that holds `needle`.
fn files_holding(root: &Path, needle: &str) -> Vec<PathBuf> {
    walkdir::WalkDir::new(root)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .filter(|e| {
            std::fs::read(e.path())
                .map(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes()))
                .unwrap_or(false)
        })
        .map(|e| e.path().to_path_buf())
        .collect()
}

/// What `ps` shows of every process's argv on this machine (the hosts share its PID
/// namespace: only their network is their own).
fn ps_args() -> String {
    let out = Command::new("ps")
        .args(["-eww", "-o", "args="])
        .stdin(Stdio::null())
        .output()
        .expect("run ps");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn fleet_backup_of_three_sandboxes_plans_without_writing_then_runs_with_a_journal_on_each_host() {
    let sandboxes: BTreeMap<String, tempfile::TempDir> = ["a", "b", "c"]
        .iter()
        .map(|n| {
            let dir = tempfile::tempdir().unwrap();
            let out = Command::new(env!("CARGO_BIN_EXE_runbook-testkit"))
                .args(["atocore-sandbox"])
                .arg(dir.path())
                .args(["--port", "0", "--documents", "20"])
                .stdin(Stdio::null())
                .output()
                .unwrap();
            assert!(out.status.success(), "{:?}", Run::from(out));
            (n.to_string(), dir)
        })
        .collect();
    let mut fleet = Fleet::start(&["a", "b", "c"], |name, _| {
        let text = std::fs::read_to_string(sandboxes[name].path().join("sandbox.yaml")).unwrap();
        serde_yaml::from_str::<Json>(&text).unwrap()
    });
    // The bundled AtoCore runbooks.
    fleet.runbooks = concat!(env!("CARGO_MANIFEST_DIR"), "/runbooks").into();
    let target = ["atocore/backup", "--hosts", "hosts.yaml"];

    // A plan before anything is installed installs nothing and says what to do.
    let r = fleet.fleet(&[&["plan"], &target[..]].concat());
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        r.stdout.contains("fleet install") || r.stderr.contains("fleet install"),
        "{r:?}"
    );
    for name in ["a", "b", "c"] {
        assert!(
            !fleet.host(name).dir.path().join("fleet").exists(),
            "plan installed on {name}"
        );
    }

    let r = fleet.fleet(&[&["install"], &target[..]].concat());
    assert_eq!(r.code, 0, "{r:?}");

    // The plan is read-only on every host: its fleet dir and its AtoCore tree.
    let trees = || -> Vec<BTreeMap<PathBuf, String>> {
        ["a", "b", "c"]
            .iter()
            .flat_map(|n| {
                // (The host's own dir also holds sshd's log, which every login writes.)
                [
                    tree_digest(&fleet.host(n).dir.path().join("fleet")),
                    tree_digest(sandboxes[*n].path()),
                ]
            })
            .collect()
    };
    let before = trees();
    let r = fleet.fleet(&[&["plan"], &target[..]].concat());
    assert_eq!(r.code, 0, "{r:?}");
    for name in ["a", "b", "c"] {
        assert!(
            r.stdout.contains(name),
            "host {name} missing from the plan:\n{}",
            r.stdout
        );
    }
    assert!(before == trees(), "fleet plan wrote on a host");

    let r = fleet.fleet(
        &[
            &["run"],
            &target[..],
            &["--parallel", "3", "--format", "json"],
        ]
        .concat(),
    );
    assert_eq!(r.code, 0, "{r:?}");
    let last: Json = serde_json::from_str(r.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last["event"], "fleet-finished", "{r:?}");
    assert_eq!(last["status"], "succeeded");
    // Every host's events came tagged with the host, its own run id on it.
    for name in ["a", "b", "c"] {
        let started: Vec<Json> = r
            .stdout
            .lines()
            .map(|l| serde_json::from_str::<Json>(l).unwrap())
            .filter(|e| e["host"] == name && e["event"] == "run-started")
            .collect();
        assert_eq!(started.len(), 1, "host {name}: {r:?}");
    }
    let id = last["id"].as_str().unwrap();
    for (name, (st, run_id, failed)) in fleet.statuses(id) {
        assert_eq!((st.as_str(), &failed), ("succeeded", &None), "host {name}");
        let run_id = run_id.unwrap();
        // The journal is on the host: its engine there knows the run ...
        let there = fleet.host_run(&name, &run_id);
        assert_eq!(there["status"], "succeeded", "{there}");
        // ... and the snapshot is in that host's sandbox.
        let stamp = there["vars"]["stamp"]
            .as_str()
            .unwrap_or_else(|| panic!("{there}"));
        let snapshot = sandboxes[&name]
            .path()
            .join("srv/storage/atocore/backups/snapshots")
            .join(stamp);
        assert!(
            snapshot.join("db/atocore.db").is_file(),
            "{}",
            snapshot.display()
        );
    }
    // The controller ran nothing itself: its own journal has no runs.
    let r = fleet.sb.run(&["runs", "--format", "json"]);
    assert_eq!(r.stdout.trim(), "[]", "{r:?}");

    // A host whose database is gone: the fleet plan fails naming host and step.
    std::fs::remove_file(
        sandboxes["b"]
            .path()
            .join("srv/storage/atocore/data/db/atocore.db"),
    )
    .unwrap();
    let r = fleet.fleet(&[&["plan"], &target[..]].concat());
    assert_eq!(r.code, 3, "{r:?}");
    let text = format!("{}{}", r.stdout, r.stderr);
    assert!(
        text.contains("b") && text.contains("`db`") && text.contains("does not exist"),
        "{r:?}"
    );
}

#[test]
fn a_host_cut_off_mid_run_is_resumed_alone_and_its_finished_steps_do_not_run_again() {
    let fleet = Fleet::counting(&["a", "b", "c"]);
    let run = fleet.run_to_the_gates(&["--format", "json"]);

    // Every host's engine is running now, the secret in its memory: no argv shows it.
    let ps = ps_args();
    assert!(
        ps.contains("--expect-digest"),
        "no host engine in ps:\n{ps}"
    );
    assert!(!ps.contains(SECRET), "the secret shows in ps:\n{ps}");

    fleet.host("b").link_down();
    fleet.open_gate("a", "go");
    fleet.open_gate("c", "go");
    let r: Run = run.wait_with_output().unwrap().into();
    assert_eq!(r.code, 1, "{r:?}");
    let id = fleet.only_run();
    let before = fleet.statuses(&id);
    let b_run = before["b"].1.clone().expect("b has a run id");
    assert_eq!(before["a"].0, "succeeded", "{before:?}");
    assert_eq!(before["c"].0, "succeeded", "{before:?}");
    assert!(
        ["interrupted", "unreachable"].contains(&before["b"].0.as_str()),
        "{before:?}"
    );

    // The secret needed again: resume refuses without it, before contacting a host.
    fleet.host("b").link_up();
    fleet.open_gate("b", "go");
    let r = fleet.fleet(&["resume", &id]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("token"), "{r:?}");

    // On a terminal (script(1) gives it one): a live line per host, then the table.
    let screen = fleet.on_terminal(&format!("resume {id} --vars secrets.yaml"));
    assert!(
        screen.contains("1 of 3 host(s) to continue")
            && screen.contains("a    succeeded before (run ")
            && screen.contains("c    succeeded before (run ")
            && screen.contains("b    succeeded in ")
            && screen.contains("HOST  STATUS       RUN ID THERE"),
        "{screen}"
    );
    let after = fleet.statuses(&id);
    for name in ["a", "b", "c"] {
        assert_eq!(after[name].0, "succeeded", "{after:?}");
        // One run per host: b's run was continued there, not started again.
        assert_eq!(after[name].1, before[name].1, "{after:?}");
        assert_eq!(fleet.count(name), "one\ntwo\nthree\n", "host {name}");
    }
    assert_eq!(fleet.host_run("b", &b_run)["status"], "succeeded");

    // The secret reached step `three` on every host, and is stored nowhere.
    let digest = runbook::actions::files::hex(&<sha2::Sha256 as sha2::Digest>::digest(SECRET));
    for name in ["a", "b", "c"] {
        let token = std::fs::read_to_string(fleet.file(name, "out.token")).unwrap();
        assert!(token.starts_with(&digest), "host {name}: {token}");
        let leaks = files_holding(&fleet.host(name).dir.path().join("fleet"), SECRET);
        assert!(
            leaks.is_empty(),
            "the secret is stored on host {name}: {leaks:?}"
        );
    }
    let leaks = files_holding(&fleet.sb.p("state"), SECRET);
    assert!(
        leaks.is_empty(),
        "the secret is in the fleet record: {leaks:?}"
    );
}

#[test]
fn a_killed_controller_is_resumed_and_no_step_runs_twice_on_any_host() {
    let fleet = Fleet::counting(&["a", "b", "c"]);
    let mut run = fleet.run_to_the_gates(&[]);
    run.kill().unwrap();
    run.wait().unwrap();
    let id = fleet.only_run();
    let before = fleet.statuses(&id);
    for name in ["a", "b", "c"] {
        // No controller holds the record any more: nothing reads as running.
        assert_eq!(before[name].0, "interrupted", "{before:?}");
        assert!(before[name].1.is_some(), "{before:?}");
        fleet.open_gate(name, "go");
    }
    // Another controller, given only the record file (its own state dir otherwise
    // empty), resumes every host where its run is.
    let record = format!("fleet/{id}.jsonl");
    fleet.sb.write(
        &format!("other-state/{record}"),
        &fleet.sb.read(&format!("state/{record}")),
    );
    let r: Run = fleet
        .cmd(&["resume", &id, "--vars", "secrets.yaml"])
        .env("RUNBOOK_STATE_DIR", fleet.sb.p("other-state"))
        .output()
        .unwrap()
        .into();
    assert_eq!(r.code, 0, "{r:?}");
    std::fs::copy(
        fleet.sb.p(&format!("other-state/{record}")),
        fleet.sb.p(&format!("state/{record}")),
    )
    .unwrap();
    let after = fleet.statuses(&id);
    for name in ["a", "b", "c"] {
        assert_eq!(after[name].0, "succeeded", "{after:?}");
        assert_eq!(after[name].1, before[name].1, "{after:?}");
        assert_eq!(fleet.count(name), "one\ntwo\nthree\n", "host {name}");
    }
}

#[test]
fn a_controller_killed_at_any_point_of_install_and_run_is_resumed_to_one_run_of_each_step() {
    let fleet = Fleet::counting(&["a", "b", "c"]);
    // From the first connection through the upload of the engine (24 MB) to the runs.
    for delay_ms in [30, 250, 700, 1500, 3000] {
        for name in ["a", "b", "c"] {
            let _ = std::fs::remove_dir_all(fleet.host(name).dir.path().join("fleet"));
            let _ = std::fs::remove_file(fleet.file(name, "out"));
            fleet.open_gate(name, "go");
        }
        let _ = std::fs::remove_dir_all(fleet.sb.p("state"));
        let mut run = fleet
            .cmd(&["run", "t/count", "--hosts", "hosts.yaml", "--parallel", "3"])
            .args(["--vars", "secrets.yaml"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        run.kill().unwrap();
        run.wait().unwrap();
        let r = fleet.fleet(&["runs", "--format", "json"]);
        if r.stdout.trim() == "[]" {
            // Killed before its record: no host was contacted yet.
            for name in ["a", "b", "c"] {
                assert!(!fleet.host(name).dir.path().join("fleet").exists());
            }
            continue;
        }
        let id = fleet.only_run();
        // Where the kill landed, for the log: installed or not, steps done.
        let installed: Vec<bool> = ["a", "b", "c"]
            .iter()
            .map(|n| fleet.host(n).dir.path().join("fleet/runbooks").exists())
            .collect();
        eprintln!(
            "killed after {delay_ms} ms: runbook files there {installed:?}, lines {:?}",
            ["a", "b", "c"].map(|n| fleet.count(n).lines().count())
        );
        let r = fleet.fleet(&["resume", &id, "--vars", "secrets.yaml"]);
        assert_eq!(r.code, 0, "killed after {delay_ms} ms: {r:?}");
        for name in ["a", "b", "c"] {
            assert_eq!(
                fleet.count(name),
                "one\ntwo\nthree\n",
                "host {name}, killed after {delay_ms} ms"
            );
        }
    }
}

#[test]
fn max_fail_1_with_two_failing_hosts_starts_no_more_and_resume_finishes_the_rest() {
    let fleet = Fleet::counting(&["a", "b", "c"]);
    fleet.open_gate("a", "fail");
    fleet.open_gate("b", "fail");
    fleet.open_gate("c", "go");
    let r = fleet.fleet(&[
        "run",
        "t/count",
        "--hosts",
        "hosts.yaml",
        "--parallel",
        "2",
        "--max-fail",
        "1",
        "--vars",
        "secrets.yaml",
        "--format",
        "junit",
    ]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout.contains("<testcase") && r.stdout.contains("gate"),
        "{r:?}"
    );
    let id = fleet.only_run();
    let first = fleet.statuses(&id);
    assert_eq!(first["a"].0, "failed");
    assert_eq!(first["a"].2.as_deref(), Some("gate"), "{first:?}");
    assert_eq!(first["b"].0, "failed");
    assert_eq!(first["c"], status("not-started", None, None), "{first:?}");
    assert_eq!(fleet.count("a"), "one\ntwo\n");
    assert_eq!(fleet.count("c"), "", "a host past the limit was started");

    fleet.open_gate("a", "go");
    fleet.open_gate("b", "go");
    // The hosts' runs use the files this fleet run sent: changed ones are refused,
    // with the diff, before any host is contacted.
    fleet
        .sb
        .write("runbooks/t/count.yaml", &format!("{COUNTING}# edited\n"));
    let r = fleet.fleet(&["resume", &id, "--vars", "secrets.yaml"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        r.stderr.contains("the runbook files changed") && r.stderr.contains("+# edited"),
        "{r:?}"
    );
    assert_eq!(fleet.count("a"), "one\ntwo\n");
    fleet.sb.write("runbooks/t/count.yaml", COUNTING);
    let r = fleet.fleet(&["resume", &id, "--vars", "secrets.yaml"]);
    assert_eq!(r.code, 0, "{r:?}");
    let after = fleet.statuses(&id);
    for name in ["a", "b", "c"] {
        assert_eq!(after[name].0, "succeeded", "{after:?}");
        assert_eq!(fleet.count(name), "one\ntwo\nthree\n", "host {name}");
    }
    assert_eq!(
        after["a"].1, first["a"].1,
        "a's failed run was resumed, not replaced"
    );

    // An unreachable host is a failure of its own kind, never a success.
    fleet.host("c").link_down();
    let on_c = |command: &str| {
        fleet.fleet(&[
            command,
            "t/count",
            "--hosts",
            "hosts.yaml",
            "--limit",
            "c",
            "--vars",
            "secrets.yaml",
        ])
    };
    let (r, plan) = (on_c("run"), on_c("plan"));
    fleet.host("c").link_up();
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.contains("unreachable"), "{r:?}");
    assert_eq!(plan.code, 1, "{plan:?}");
    assert!(plan.stdout.contains("unreachable"), "{plan:?}");
}
