//! Service actions against the real Docker engine on this machine: `compose-stop`,
//! `compose-start` and `docker-exec` act on containers of an image built here
//! `FROM scratch` with the static `runbook-testkit` (no registry is involved); the
//! systemd actions run for real where systemd is PID 1 and are tested through their
//! would-fail path everywhere.
//!
//! Docker is required: without a working `docker info` these tests fail, they never
//! skip.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::support::{Run, Sandbox, docker_ok, free_port, image, tree_digest};

// -------------------------------------------------------------- compose projects

/// A compose project in a temp dir with a unique name; `down` when dropped.
struct Project {
    dir: tempfile::TempDir,
    name: String,
    /// The host port (on 127.0.0.1) published for the `web` service.
    port: u16,
    /// Container ids by service: compose (v1 is Python) is slow to ask each time.
    ids: std::cell::RefCell<std::collections::BTreeMap<String, String>>,
}

/// `web`: health-serve with a healthcheck, its port published on 127.0.0.1.
const WEB: &str = r#"  web:
    image: {image}
    ports: ["127.0.0.1:{port}:8080"]
    healthcheck:
      test: ["CMD", "/runbook-testkit", "health-check", "http://127.0.0.1:8080/health"]
      interval: 1s
      timeout: 2s
      retries: 30
"#;

impl Project {
    /// `services` is the YAML below `services:`; `{image}`, `{port}` are filled in.
    fn new(services: &str) -> Project {
        static N: AtomicUsize = AtomicUsize::new(0);
        let image = image();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("marks")).unwrap();
        let port = free_port();
        let name = format!(
            "rbt{}n{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let text = format!("version: \"2.4\"\nservices:\n{services}")
            .replace("{image}", image)
            .replace("{port}", &port.to_string());
        std::fs::write(dir.path().join("docker-compose.yml"), text).unwrap();
        Project {
            dir,
            name,
            port,
            ids: Default::default(),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn file(&self) -> PathBuf {
        self.path().join("docker-compose.yml")
    }

    fn compose(&self, args: &[&str]) -> Output {
        let tool = runbook::actions::services::compose_command().expect("a compose tool");
        Command::new(&tool[0])
            .args(&tool[1..])
            .arg("-f")
            .arg(self.file())
            .args(["-p", &self.name])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run compose")
    }

    fn compose_ok(&self, args: &[&str]) -> String {
        let out = self.compose(args);
        assert!(
            out.status.success(),
            "compose {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The container id of `service` (which must have exactly one). Cached: the
    /// tests never make compose recreate a container (`snapshot` would show it).
    fn container(&self, service: &str) -> String {
        if let Some(id) = self.ids.borrow().get(service) {
            return id.clone();
        }
        let ids = self.compose_ok(&["ps", "-a", "-q", service]);
        let ids: Vec<&str> = ids.split_whitespace().collect();
        assert_eq!(ids.len(), 1, "containers of {service}: {ids:?}");
        self.ids
            .borrow_mut()
            .insert(service.to_string(), ids[0].to_string());
        ids[0].to_string()
    }

    /// The container's name, as `docker ps` shows it.
    fn container_name(&self, service: &str) -> String {
        docker_ok(&["inspect", "-f", "{{.Name}}", &self.container(service)])
            .trim_start_matches('/')
            .to_string()
    }

    /// `status health started_at finished_at` of the service's container.
    fn state(&self, service: &str) -> String {
        docker_ok(&[
            "inspect",
            "-f",
            "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}-{{end}} {{.State.StartedAt}} {{.State.FinishedAt}}",
            &self.container(service),
        ])
    }

    fn status(&self, service: &str) -> String {
        let state = self.state(service);
        let mut words = state.split_whitespace();
        format!("{} {}", words.next().unwrap(), words.next().unwrap())
    }

    fn wait_status(&self, service: &str, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = self.status(service);
            if now == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{service} is `{now}`, not `{want}`, after 30s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The states of all of the project's containers: equal before and after a step
    /// means nothing was started, stopped or recreated.
    fn snapshot(&self) -> Vec<String> {
        let ids = self.compose_ok(&["ps", "-a", "-q"]);
        let mut out: Vec<String> = ids
            .split_whitespace()
            .map(|id| {
                docker_ok(&[
                    "inspect",
                    "-f",
                    "{{.Name}} {{.State.Status}} {{.State.StartedAt}} {{.State.FinishedAt}} {{.RestartCount}}",
                    id,
                ])
            })
            .collect();
        out.sort();
        out
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let out = self.compose(&["down", "-t", "0", "-v", "--remove-orphans"]);
        if !out.status.success() {
            eprintln!(
                "compose down of {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// `GET /health` on 127.0.0.1:port: the status line and body, or the connect error.
fn get_health(port: u16) -> Result<(String, String), String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    let status = text.lines().next().unwrap_or("").to_string();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    Ok((status, body))
}

// ---------------------------------------------------------------- engine helpers

/// Starts `runbook run NAME` in its own process group (so that a SIGKILL can take its
/// children, such as `docker-compose`, with it, as a power cut would); returns it and
/// the run id from its first line.
fn spawn_run(sb: &Sandbox, name: &str) -> (Child, String) {
    let mut child = sb
        .cmd(&["run", name])
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn runbook");
    let mut first = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut first)
        .unwrap();
    let mut words = first.split_whitespace();
    assert_eq!(words.next(), Some("run"), "first line: {first}");
    (child, words.next().unwrap().to_string())
}

/// SIGKILL to the engine and everything it started, as a power cut would: its own
/// group, and the process groups its steps run in (found by parentage, each stopped
/// first so that none starts another unseen).
fn kill_group(child: &mut Child) {
    let engine = child.id() as i32;
    // SAFETY: plain kill(2) on the group the child leads.
    let rc = unsafe { libc::kill(-engine, libc::SIGSTOP) };
    assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    let mut tree = vec![engine];
    loop {
        let more: Vec<i32> = children_of(&tree)
            .into_iter()
            .filter(|p| !tree.contains(p))
            .collect();
        if more.is_empty() {
            break;
        }
        for p in &more {
            // SAFETY: as above, on a descendant of the engine.
            unsafe { libc::kill(*p, libc::SIGSTOP) };
        }
        tree.extend(more);
    }
    for p in &tree {
        // SAFETY: as above.
        unsafe { libc::kill(*p, libc::SIGKILL) };
    }
    // SAFETY: as above.
    unsafe { libc::kill(-engine, libc::SIGKILL) };
    child.wait().unwrap();
}

/// The processes whose parent is one of `parents` (from /proc).
fn children_of(parents: &[i32]) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                stat.rfind(')')
                    .and_then(|i| stat[i + 2..].split_whitespace().nth(1)?.parse::<i32>().ok())
                    .is_some_and(|ppid| parents.contains(&ppid))
            })
        })
        .collect()
}

fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn run_status(sb: &Sandbox, id: &str) -> String {
    let r = sb.run(&["runs", "--format", "json"]);
    assert_eq!(r.code, 0, "{r:?}");
    let runs: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    runs.as_array()
        .unwrap()
        .iter()
        .find(|run| run["id"] == id)
        .map(|run| run["status"].as_str().unwrap().to_string())
        .unwrap()
}

/// The `outputs:` line `runbook show` prints for `step`, parsed.
fn step_outputs(sb: &Sandbox, id: &str, step: &str) -> serde_json::Value {
    let show = sb.run(&["show", id]);
    assert_eq!(show.code, 0, "{show:?}");
    let mut lines = show.stdout.lines().skip_while(|l| {
        !(l.trim_start().starts_with("succeeded") && l.contains(&format!(" {step} (")))
    });
    lines
        .next()
        .unwrap_or_else(|| panic!("no succeeded {step}: {show:?}"));
    let outputs = lines
        .find_map(|l| l.trim_start().strip_prefix("outputs: "))
        .unwrap_or_else(|| panic!("no outputs for {step}: {show:?}"));
    serde_json::from_str(outputs).unwrap()
}

/// Asserts the run's lines (with `(N.NNs)` durations replaced by `(T)`).
fn assert_lines(r: &Run, expected: &[String]) {
    let re = regex::Regex::new(r"\(\d+\.\d\ds\)|in \d+\.\d\ds|after \d+\.\d\ds").unwrap();
    let got: Vec<String> = r
        .stdout
        .lines()
        .map(|l| {
            re.replace_all(l, |c: &regex::Captures| {
                let m = &c[0];
                if m.starts_with('(') {
                    "(T)".to_string()
                } else if m.starts_with("in") {
                    "in T".to_string()
                } else {
                    "after T".to_string()
                }
            })
            .into_owned()
        })
        .collect();
    assert_eq!(got, expected, "{r:?}");
}

fn compose_step(id: &str, action: &str, project: &Project, services: &str, extra: &str) -> String {
    format!(
        "  - id: {id}\n    action: {action}\n    with: {{project_dir: \"{}\", project: {}, services: {services}{extra}}}\n",
        project.path().display(),
        project.name
    )
}

// ------------------------------------------------------------------------- tests

#[test]
fn compose_plan_judges_each_service_and_starts_or_stops_nothing() {
    let p = Project::new(&format!(
        "{WEB}  idle:\n    image: {{image}}\n  other:\n    image: {{image}}\n"
    ));
    p.compose_ok(&["up", "-d", "web", "idle"]);
    p.compose_ok(&["stop", "idle"]);
    p.wait_status("web", "running healthy");
    let web = p.container_name("web");
    let sb = Sandbox::new();
    sb.write(
        "runbooks/restore.yaml",
        &format!(
            "version: 1\nsteps:\n{}{}{}{}  - id: version\n    action: docker-exec\n    with: {{container: {web}, argv: [/runbook-testkit, version]}}\n",
            compose_step("stop-web", "compose-stop", &p, "[web]", ""),
            compose_step("stop-idle", "compose-stop", &p, "[idle, other]", ""),
            compose_step("start-web", "compose-start", &p, "[web]", ", timeout: 30s"),
            compose_step("start-idle", "compose-start", &p, "[idle]", ""),
        ),
    );
    let before = (tree_digest(sb.path()), tree_digest(p.path()), p.snapshot());
    let r = sb.run(&["plan", "restore"]);
    assert_eq!(r.code, 0, "{r:?}");
    let steps: Vec<&str> = r
        .stdout
        .lines()
        .skip_while(|l| *l != "steps:")
        .skip(1)
        .collect();
    assert_eq!(
        steps,
        [
            "  will change stop-web    compose-stop: stop `web` (healthy)".to_string(),
            "  no change   stop-idle   compose-stop: already stopped: `idle` (exited with code 0), `other` (no container)".to_string(),
            "  will change start-web   compose-start: start `web` (stopped after an earlier step) and wait until ready".to_string(),
            "  will change start-idle  compose-start: start `idle` (stopped after an earlier step) and wait until ready".to_string(),
            format!("  will change version     docker-exec: run /runbook-testkit version in container `{web}`"),
            "5 steps: 4 will change, 1 no change, 0 unknown, 0 skipped, 0 would fail".to_string(),
        ]
    );
    let after = (tree_digest(sb.path()), tree_digest(p.path()), p.snapshot());
    assert_eq!(after, before, "the plan changed a file or a container");
    assert!(!sb.p("state").exists());

    // What compose cannot do is named before anything runs.
    sb.write(
        "runbooks/typo.yaml",
        &format!(
            "version: 1\nsteps:\n{}{}",
            compose_step("stop", "compose-stop", &p, "[web, wbe, db]", ""),
            "  - id: missing-dir\n    action: compose-start\n    with: {project_dir: /nonexistent/app, services: [web]}\n",
        ),
    );
    let r = sb.run(&["run", "typo"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        r.stdout.contains(
            "  would fail  stop         compose-stop: services `wbe`, `db` are not in the compose file (it defines: `web`, `idle`, `other`)\n"
        ) || r.stdout.contains(
            // Compose v1 lists services in dependency order, v2 sorted; both are fine.
            "  would fail  stop         compose-stop: services `wbe`, `db` are not in the compose file (it defines: `idle`, `other`, `web`)\n"
        ),
        "{r:?}"
    );
    assert!(
        r.stdout.contains(
            "  would fail  missing-dir  compose-start: project directory `/nonexistent/app` does not exist\n"
        ),
        "{r:?}"
    );
    assert_eq!(p.snapshot(), before.2, "a refused run changed a container");

    // A compose file that an earlier step writes cannot be asked about yet.
    sb.write(
        "runbooks/fresh.yaml",
        "version: 1\nsteps:\n  - id: compose-file\n    action: write-file\n    with: {path: \"{root}/docker-compose.yml\", content: \"services: {}\"}\n  - id: stop\n    action: compose-stop\n    with: {file: \"{root}/docker-compose.yml\", services: [web]}\n",
    );
    let r = sb.run(&["plan", "fresh"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.contains(
            "  will change stop          compose-stop: stop `web` (the compose file comes from an earlier step, so it is read when this step runs)\n"
        ),
        "{r:?}"
    );
}

#[test]
fn compose_stop_then_start_stops_and_starts_the_container_and_reruns_change_nothing() {
    let p = Project::new(WEB);
    p.compose_ok(&["up", "-d", "web"]);
    p.wait_status("web", "running healthy");
    assert_eq!(
        get_health(p.port).unwrap(),
        ("HTTP/1.1 200 OK".into(), r#"{"status":"ok"}"#.into())
    );
    let sb = Sandbox::new();
    // One runbook names the compose file, the other the project directory.
    sb.write(
        "runbooks/stop.yaml",
        &format!(
            "version: 1\nsteps:\n  - id: stop\n    action: compose-stop\n    with: {{file: \"{}\", project: {}, services: [web], timeout: 30s}}\n",
            p.file().display(),
            p.name
        ),
    );
    sb.write(
        "runbooks/start.yaml",
        &format!(
            "version: 1\nsteps:\n{}",
            compose_step("start", "compose-start", &p, "[web]", ", timeout: 30s")
        ),
    );

    let r = sb.run(&["run", "stop"]);
    assert_eq!(r.code, 0, "{r:?}");
    let id = r.stdout.split_whitespace().nth(1).unwrap().to_string();
    assert_lines(
        &r,
        &[
            format!("run {id} stop"),
            "  ok       stop (T)".into(),
            format!("run {id} succeeded in T"),
        ],
    );
    assert!(
        p.status("web").starts_with("exited "),
        "{}",
        p.status("web")
    );
    assert!(
        get_health(p.port).is_err(),
        "the stopped service still answers"
    );
    assert_eq!(
        step_outputs(&sb, &id, "stop"),
        serde_json::json!({"services": ["web"], "states": {"web": "stopped"}})
    );

    // Stopping a stopped service: the plan says so and the run leaves it alone.
    let stopped = p.snapshot();
    let r = sb.run(&["plan", "stop"]);
    assert!(
        r.stdout.contains(
            "  no change   stop  compose-stop: already stopped: `web` (exited with code 0)\n"
        ),
        "{r:?}"
    );
    assert_eq!(sb.run(&["run", "stop"]).code, 0);
    assert_eq!(
        p.snapshot(),
        stopped,
        "stopping a stopped service changed it"
    );

    let r = sb.run(&["run", "start"]);
    assert_eq!(r.code, 0, "{r:?}");
    let id = r.stdout.split_whitespace().nth(1).unwrap().to_string();
    assert_eq!(
        p.status("web"),
        "running healthy",
        "start returned before healthy"
    );
    assert_eq!(
        get_health(p.port).unwrap(),
        ("HTTP/1.1 200 OK".into(), r#"{"status":"ok"}"#.into())
    );
    assert_eq!(
        step_outputs(&sb, &id, "start"),
        serde_json::json!({"services": ["web"], "states": {"web": "healthy"}})
    );

    // Starting a running service changes nothing (no restart, no recreate).
    let running = p.snapshot();
    let r = sb.run(&["plan", "start"]);
    assert!(
        r.stdout
            .contains("  no change   start  compose-start: already running: `web` (healthy)\n"),
        "{r:?}"
    );
    assert_eq!(sb.run(&["run", "start"]).code, 0);
    assert_eq!(
        p.snapshot(),
        running,
        "starting a running service restarted it"
    );
}

#[test]
fn compose_start_fails_with_the_state_it_saw_when_a_service_dies() {
    let p = Project::new(
        "  broken:\n    image: {image}\n    command: [\"--port\", \"8080\", \"--no-such-flag\"]\n",
    );
    let sb = Sandbox::new();
    sb.write(
        "runbooks/start.yaml",
        &format!(
            "version: 1\nsteps:\n{}",
            compose_step("start", "compose-start", &p, "[broken]", ", timeout: 30s")
        ),
    );
    let r = sb.run(&["plan", "start"]);
    assert!(
        r.stdout.contains(
            "  will change start  compose-start: start `broken` (no container) and wait until ready\n"
        ),
        "{r:?}"
    );
    let started = Instant::now();
    let r = sb.run(&["run", "start"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout.contains(
            "  FAILED   start: not running after `up -d`: `broken` exited with code 1; see `docker logs` of its container\n"
        ),
        "{r:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "waited for the timeout instead of failing at once"
    );
}

#[test]
fn an_interrupted_compose_stop_resumes_to_stopped() {
    // `web` depends on `db`, so compose stops web first and db only once web is down;
    // web takes 3 s to stop and marks the moment it got SIGTERM.
    let p = Project::new(
        "  db:\n    image: {image}\n  web:\n    image: {image}\n    depends_on: [db]\n    volumes: [\"./marks:/marks\"]\n    command: [\"--port\", \"8080\", \"--term-delay-ms\", \"3000\", \"--term-mark\", \"/marks/web.term\"]\n",
    );
    p.compose_ok(&["up", "-d", "web", "db"]);
    p.wait_status("web", "running -");
    p.wait_status("db", "running -");
    let sb = Sandbox::new();
    sb.write(
        "runbooks/stop.yaml",
        &format!(
            "version: 1\nsteps:\n{}",
            compose_step("stop", "compose-stop", &p, "[web, db]", ", timeout: 60s")
        ),
    );
    let (mut child, id) = spawn_run(&sb, "stop");
    let mark = p.path().join("marks/web.term");
    wait_until("web to get SIGTERM", Duration::from_secs(30), || {
        mark.exists()
    });
    kill_group(&mut child);
    // The engine and its compose client are gone before compose reached db.
    assert_eq!(
        p.status("db"),
        "running -",
        "db was stopped before the kill"
    );
    assert_eq!(run_status(&sb, &id), "interrupted");

    let r = sb.run(&["resume", &id]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_lines(
        &r,
        &[
            format!("resume {id} stop"),
            "  ok       stop (T)".into(),
            format!("run {id} succeeded in T"),
        ],
    );
    assert!(p.status("web").starts_with("exited"), "{}", p.status("web"));
    assert!(p.status("db").starts_with("exited"), "{}", p.status("db"));
    assert_eq!(
        step_outputs(&sb, &id, "stop"),
        serde_json::json!({"services": ["web", "db"], "states": {"web": "stopped", "db": "stopped"}})
    );
}

#[test]
fn an_interrupted_compose_start_resumes_to_healthy_without_a_restart() {
    // The first health check runs 2 s after the start: the step is still waiting.
    let p = Project::new(&WEB.replace("interval: 1s", "interval: 2s"));
    p.compose_ok(&["up", "-d", "web"]);
    p.compose_ok(&["stop", "-t", "5", "web"]);
    let sb = Sandbox::new();
    sb.write(
        "runbooks/start.yaml",
        &format!(
            "version: 1\nsteps:\n{}",
            compose_step("start", "compose-start", &p, "[web]", ", timeout: 60s")
        ),
    );
    let (mut child, id) = spawn_run(&sb, "start");
    wait_until("web to run", Duration::from_secs(30), || {
        p.status("web") == "running starting"
    });
    kill_group(&mut child);
    let started_at = p
        .state("web")
        .split_whitespace()
        .nth(2)
        .unwrap()
        .to_string();
    assert_eq!(run_status(&sb, &id), "interrupted");

    let r = sb.run(&["resume", &id]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_lines(
        &r,
        &[
            format!("resume {id} start"),
            "  ok       start (T)".into(),
            format!("run {id} succeeded in T"),
        ],
    );
    let state = p.state("web");
    let words: Vec<&str> = state.split_whitespace().collect();
    assert_eq!(words[..2], ["running", "healthy"], "{state}");
    assert_eq!(words[2], started_at, "resume restarted the container");
    assert_eq!(
        get_health(p.port).unwrap().1,
        r#"{"status":"ok"}"#,
        "the health endpoint"
    );
}

#[test]
fn docker_exec_runs_in_the_container_and_captures_its_output() {
    let p = Project::new("  app:\n    image: {image}\n  gone:\n    image: {image}\n");
    p.compose_ok(&["up", "-d", "app", "gone"]);
    p.compose_ok(&["stop", "-t", "5", "gone"]);
    p.wait_status("app", "running -");
    let app = p.container_name("app");
    let gone = p.container_name("gone");
    let sb = Sandbox::new();
    sb.write(
        "runbooks/backup.yaml",
        &format!(
            r#"version: 1
params:
  token: {{type: string, secret: true, default: hunter2}}
steps:
  - id: version
    action: docker-exec
    with: {{container: {app}, argv: [/runbook-testkit, version]}}
  - id: env
    action: docker-exec
    with:
      container: {app}
      argv: [/runbook-testkit, print-env, GREETING, TOKEN, NOT_PASSED]
      env: {{GREETING: "hello there", TOKEN: "{{{{ token }}}}"}}
      user: "1000"
  - id: refused
    action: docker-exec
    with: {{container: {app}, argv: [/runbook-testkit, health-check, "http://127.0.0.1:9/"], expect_exit: [1]}}
"#
        ),
    );
    let before = (tree_digest(sb.path()), p.snapshot());
    let r = sb.run(&["plan", "backup"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.contains(&format!(
            "  will change version  docker-exec: run /runbook-testkit version in container `{app}`\n"
        )),
        "{r:?}"
    );
    assert_eq!((tree_digest(sb.path()), p.snapshot()), before);

    let r = sb.run(&["run", "backup"]);
    assert_eq!(r.code, 0, "{r:?}");
    let id = r.stdout.split_whitespace().nth(1).unwrap().to_string();
    assert_eq!(
        step_outputs(&sb, &id, "version"),
        serde_json::json!({"exit_code": 0, "stdout": format!("runbook-testkit {}", env!("CARGO_PKG_VERSION")), "stderr": ""})
    );
    // The secret reached the program and is masked in the journal.
    assert_eq!(
        step_outputs(&sb, &id, "env")["stdout"],
        "GREETING=hello there\nTOKEN=********\nNOT_PASSED unset"
    );
    let refused = step_outputs(&sb, &id, "refused");
    assert_eq!(refused["exit_code"], 1);
    assert!(
        refused["stderr"]
            .as_str()
            .unwrap()
            .contains("connect 127.0.0.1:9"),
        "{refused}"
    );

    // A missing or stopped container is refused by the plan.
    sb.write(
        "runbooks/bad.yaml",
        &format!(
            "version: 1\nsteps:\n  - id: missing\n    action: docker-exec\n    with: {{container: rbt-no-such-container, argv: [x]}}\n  - id: stopped\n    action: docker-exec\n    with: {{container: {gone}, argv: [x]}}\n"
        ),
    );
    let r = sb.run(&["plan", "bad"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        r.stdout.contains(
            "  would fail  missing  docker-exec: container `rbt-no-such-container` does not exist (`docker ps -a` lists containers)\n"
        ),
        "{r:?}"
    );
    assert!(
        r.stdout.contains(&format!(
            "  would fail  stopped  docker-exec: container `{gone}` is not running (exited with code 0); start it first (compose-start)\n"
        )),
        "{r:?}"
    );
}

#[test]
fn an_interrupted_docker_exec_waits_for_the_operator_then_retries() {
    let p = Project::new("  app:\n    image: {image}\n    volumes: [\"./marks:/marks\"]\n");
    p.compose_ok(&["up", "-d", "app"]);
    p.wait_status("app", "running -");
    let app = p.container_name("app");
    let sb = Sandbox::new();
    sb.write(
        "runbooks/backup.yaml",
        &format!(
            "version: 1\nsteps:\n  - id: backup\n    action: docker-exec\n    with: {{container: {app}, argv: [/runbook-testkit, wait-file, /marks/go]}}\n"
        ),
    );
    let (mut child, id) = spawn_run(&sb, "backup");
    let waiting = p.path().join("marks/go.waiting");
    wait_until(
        "the program in the container",
        Duration::from_secs(30),
        || waiting.exists(),
    );
    kill_group(&mut child);

    let r = sb.run(&["resume", &id]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        r.stdout.lines().last().unwrap().ends_with(&format!(
            ": step `backup` needs checking: it was interrupted and `docker-exec` is not idempotent, so running it again could repeat its effect. Check whether it took effect (arguments: {{\"container\":\"{app}\",\"argv\":[\"/runbook-testkit\",\"wait-file\",\"/marks/go\"]}}), then run `runbook resume {id} --retry-step backup`"
        )),
        "{r:?}"
    );
    // The operator lets the first attempt finish, then retries.
    std::fs::remove_file(&waiting).unwrap();
    std::fs::write(p.path().join("marks/go"), "").unwrap();
    let r = sb.run(&["resume", &id, "--retry-step", "backup"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(step_outputs(&sb, &id, "backup")["stdout"], "released");
    assert!(waiting.exists(), "the retry did not run in the container");
}

// ---------------------------------------------------------------------- systemd

const UNIT: &str = "runbook-no-such-unit.service";

fn systemd_runbook(sb: &Sandbox) {
    sb.write(
        "runbooks/svc.yaml",
        &format!(
            "version: 1\nsteps:\n  - id: stop\n    action: systemd-stop\n    with: {{unit: {UNIT}}}\n  - id: start\n    action: systemd-start\n    with: {{unit: {UNIT}, timeout: 10s}}\n"
        ),
    );
}

#[test]
fn systemd_actions_say_why_they_would_fail_and_run_refuses() {
    let sb = systemd_runbook_sandbox();
    let before = tree_digest(sb.path());
    let booted = Path::new("/run/systemd/system").is_dir();
    let (stop, start) = if booted {
        let why = format!(
            "unit `{UNIT}` is not known to systemd (`systemctl list-units --all` lists them)"
        );
        (why.clone(), why)
    } else {
        eprintln!("systemd is not PID 1 here: testing the would-fail path only");
        let why = |alt: &str| {
            format!(
                "systemd is not running on this host (PID 1 is not systemd, so systemctl cannot act); use {alt} for a Docker Compose service"
            )
        };
        (why("compose-stop"), why("compose-start"))
    };
    let r = sb.run(&["run", "svc"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        r.stdout
            .contains(&format!("  would fail  stop   systemd-stop: {stop}\n")),
        "{r:?}"
    );
    assert!(
        r.stdout
            .contains(&format!("  would fail  start  systemd-start: {start}\n")),
        "{r:?}"
    );

    // A host without systemctl at all.
    let empty = tempfile::tempdir().unwrap();
    let r: Run = sb
        .cmd(&["plan", "svc"])
        .env("PATH", empty.path())
        .output()
        .unwrap()
        .into();
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        r.stdout.contains(
            "  would fail  stop   systemd-stop: systemctl not found: this host has no systemd; use compose-stop for a Docker Compose service\n"
        ),
        "{r:?}"
    );
    assert!(
        r.stdout.contains(
            "  would fail  start  systemd-start: systemctl not found: this host has no systemd; use compose-start for a Docker Compose service\n"
        ),
        "{r:?}"
    );
    assert_eq!(
        tree_digest(sb.path()),
        before,
        "a refused run wrote something"
    );
}

fn systemd_runbook_sandbox() -> Sandbox {
    let sb = Sandbox::new();
    systemd_runbook(&sb);
    sb
}

/// Needs a host where systemd is PID 1 and the tests run as root: it installs a
/// runtime unit in /run/systemd/system. `.ci/run` runs it there (`--ignored`).
#[test]
#[ignore = "needs a host where systemd is PID 1, run as root; .ci/run runs it with --ignored there"]
fn systemd_stop_and_start_a_real_unit() {
    assert!(
        Path::new("/run/systemd/system").is_dir(),
        "systemd is not PID 1 on this host: this test cannot run here"
    );
    let unit = format!("runbook-test-{}.service", std::process::id());
    let path = PathBuf::from("/run/systemd/system").join(&unit);
    std::fs::write(&path, "[Service]\nExecStart=/bin/sleep infinity\n")
        .expect("write a runtime unit (root needed)");
    struct Cleanup(PathBuf, String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = Command::new("systemctl").args(["stop", &self.1]).status();
            let _ = std::fs::remove_file(&self.0);
            let _ = Command::new("systemctl").arg("daemon-reload").status();
        }
    }
    let _cleanup = Cleanup(path, unit.clone());
    let systemctl = |args: &[&str]| {
        let out = Command::new("systemctl").args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    systemctl(&["daemon-reload"]);
    systemctl(&["start", &unit]);
    assert_eq!(systemctl(&["is-active", &unit]), "active");

    let sb = Sandbox::new();
    sb.write(
        "runbooks/svc.yaml",
        &format!(
            "version: 1\nsteps:\n  - id: stop\n    action: systemd-stop\n    with: {{unit: {unit}}}\n  - id: start\n    action: systemd-start\n    with: {{unit: {unit}, timeout: 30s}}\n"
        ),
    );
    let r = sb.run(&["plan", "svc"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.contains(&format!(
            "  will change stop   systemd-stop: stop unit `{unit}` (active)\n"
        )),
        "{r:?}"
    );
    assert!(r.stdout.contains(&format!("  will change start  systemd-start: start unit `{unit}` (inactive after an earlier step)\n")), "{r:?}");
    assert_eq!(
        systemctl(&["is-active", &unit]),
        "active",
        "the plan stopped it"
    );

    sb.write(
        "runbooks/stop.yaml",
        &format!(
            "version: 1\nsteps:\n  - id: stop\n    action: systemd-stop\n    with: {{unit: {unit}}}\n"
        ),
    );
    let r = sb.run(&["run", "stop"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(systemctl(&["is-active", &unit]), "inactive");
    let r = sb.run(&["plan", "stop"]);
    assert!(
        r.stdout.contains(&format!(
            "  no change   stop  systemd-stop: unit `{unit}` is already inactive\n"
        )),
        "{r:?}"
    );
    let r = sb.run(&["run", "svc"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(systemctl(&["is-active", &unit]), "active");
}
