//! A temp dir with `runbooks/` and a state dir, and the real binary run inside it.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Instant, SystemTime};

use sha2::{Digest, Sha256};

pub struct Sandbox {
    pub dir: tempfile::TempDir,
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

impl Sandbox {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("runbooks")).unwrap();
        Sandbox { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Writes a file below the sandbox (parents created); `{root}` in the text becomes
    /// the sandbox's absolute path.
    pub fn write(&self, rel: &str, text: &str) -> PathBuf {
        let path = self.p(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(
            &path,
            text.replace("{root}", &self.path().display().to_string()),
        )
        .unwrap();
        path
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.p(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_runbook"));
        c.args(args)
            .current_dir(self.path())
            .env("RUNBOOK_STATE_DIR", self.p("state"))
            .env_remove("RUNBOOK_PATH")
            .stdin(Stdio::null());
        // Requests to the test server on 127.0.0.1 must not go through a proxy.
        for var in ["http_proxy", "https_proxy", "all_proxy"] {
            c.env_remove(var).env_remove(var.to_ascii_uppercase());
        }
        c
    }

    pub fn run(&self, args: &[&str]) -> Run {
        self.cmd(args).output().expect("run runbook").into()
    }

    /// The id of the newest run in this sandbox's journal.
    pub fn last_run_id(&self) -> String {
        let r = self.run(&["runs", "--format", "json"]);
        let runs: serde_json::Value = serde_json::from_str(&r.stdout).expect("runs json");
        runs[0]["id"].as_str().expect("a run").to_string()
    }

    /// Waits until no process holds run lock `name` (util-linux `flock`), e.g. until
    /// the leftovers of a killed engine's step have ended.
    pub fn wait_lock_free(&self, name: &str) {
        let lock = self.p(&format!("state/locks/{name}.lock"));
        self.wait_for(&format!("lock `{name}` to be free"), || {
            !lock.exists()
                || Command::new("flock")
                    .args(["--nonblock", "--shared"])
                    .arg(&lock)
                    .arg("true")
                    .status()
                    .expect("run flock")
                    .success()
        });
    }

    pub fn spawn(&self, args: &[&str]) -> Child {
        self.cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn runbook")
    }

    /// The sandbox's text with its absolute path replaced by `{root}`.
    pub fn redact(&self, text: &str) -> String {
        text.replace(&self.path().display().to_string(), "{root}")
    }

    /// Waits (bounded) until `cond` holds.
    pub fn wait_for(&self, what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !cond() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// A digest of everything below `root`: names, types, modes, owners, sizes, mtimes and
/// contents. Equal digests mean nothing was written.
pub fn tree_digest(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    for entry in walkdir::WalkDir::new(root).sort_by_file_name() {
        let entry = entry.unwrap();
        let m = entry.path().symlink_metadata().unwrap();
        let mut h = Sha256::new();
        h.update(format!(
            "{:o} {}:{} {} {}",
            m.mode(),
            m.uid(),
            m.gid(),
            m.len(),
            m.mtime_nsec() + m.mtime() * 1_000_000_000
        ));
        if m.is_file() {
            h.update(std::fs::read(entry.path()).unwrap());
        }
        let rel = entry.path().strip_prefix(root).unwrap().to_path_buf();
        out.insert(rel, runbook::actions::files::hex(&h.finalize()));
    }
    out
}

/// Kills the process a pidfile records (checked by its start time) when dropped, so a
/// failing test leaves no service running.
pub struct ServiceGuard(pub PathBuf);

impl Drop for ServiceGuard {
    fn drop(&mut self) {
        if let Some(pid) = runbook::actions::daemon::running(&self.0) {
            // SAFETY: kill(2) on the pid the pidfile records, checked to be that process.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Names, types, modes, owners, sizes and contents below each of `dirs` of `root`, keyed
/// by the path from `root`; times are left out, so two sandboxes built at different
/// instants (an interrupted and resumed run, an uninterrupted one) compare equal when
/// they hold the same. SQLite files (`.db`) are compared by the rows of their table `t`.
pub fn end_state(root: &Path, dirs: &[&str]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for dir in dirs {
        for entry in walkdir::WalkDir::new(root.join(dir)).sort_by_file_name() {
            let entry = entry.unwrap();
            let m = entry.path().symlink_metadata().unwrap();
            let rel = entry
                .path()
                .strip_prefix(root)
                .unwrap()
                .display()
                .to_string();
            let content = if rel.ends_with(".db") {
                let conn = rusqlite::Connection::open_with_flags(
                    entry.path(),
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                )
                .unwrap();
                let rows: Vec<String> = conn
                    .prepare("SELECT id || ':' || v FROM t ORDER BY id")
                    .unwrap()
                    .query_map([], |r| r.get(0))
                    .unwrap()
                    .map(Result::unwrap)
                    .collect();
                rows.join(",")
            } else if m.is_file() {
                runbook::actions::files::hex(&Sha256::digest(std::fs::read(entry.path()).unwrap()))
            } else if m.file_type().is_symlink() {
                std::fs::read_link(entry.path())
                    .unwrap()
                    .display()
                    .to_string()
            } else {
                String::new()
            };
            let size = if m.is_dir() { 0 } else { m.len() };
            out.insert(
                rel,
                format!("{:o} {}:{} {size} {content}", m.mode(), m.uid(), m.gid()),
            );
        }
    }
    out
}

/// `runbook-testkit http-serve` on 127.0.0.1, killed when dropped (and exiting by itself
/// after two minutes in any case).
pub struct HttpServer {
    child: Child,
    pub port: u16,
}

/// Starts a testkit server whose first line on stdout is `listening on 127.0.0.1:PORT`;
/// returns it and the port.
pub fn spawn_listening(mut cmd: Command) -> (std::process::Child, u16) {
    use std::io::{BufRead, BufReader};
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn a runbook-testkit server");
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let port = first
        .trim()
        .strip_prefix("listening on 127.0.0.1:")
        .unwrap_or_else(|| panic!("the server said: {first:?}"))
        .parse()
        .unwrap();
    (child, port)
}

impl HttpServer {
    /// Starts the server with these route arguments (`--route GET /health 200 '{}'` ...).
    pub fn start(routes: &[&str]) -> HttpServer {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_runbook-testkit"));
        cmd.args(["http-serve", "--port", "0", "--exit-after", "120s"])
            .args(routes)
            .stderr(Stdio::inherit());
        let (child, port) = spawn_listening(cmd);
        HttpServer { child, port }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The requests the server received so far (`GET /__requests`), oldest first.
    pub fn requests(&self) -> Vec<serde_json::Value> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            stream,
            "GET /__requests HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 "), "{answer}");
        serde_json::from_str::<serde_json::Value>(body)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }

    /// `METHOD PATH` of each request received so far.
    pub fn request_lines(&self) -> Vec<String> {
        self.requests()
            .iter()
            .map(|r| {
                format!(
                    "{} {}",
                    r["method"].as_str().unwrap(),
                    r["path"].as_str().unwrap()
                )
            })
            .collect()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------ docker and the image
// (the service tests and the AtoCore compose test build and use the same image)

pub fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `docker`: {e}; Docker is required for these tests"))
}

/// Runs docker; its stdout, trimmed. Panics with its stderr when it fails.
pub fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Fails the test (never skips it) when the Docker engine does not answer.
pub fn require_docker() {
    static CHECK: OnceLock<Result<(), String>> = OnceLock::new();
    let result = CHECK.get_or_init(|| {
        match Command::new("docker")
            .args(["info", "--format", "{{.ServerVersion}}"])
            .stdin(Stdio::null())
            .output()
        {
            Ok(o) if o.status.success() => Ok(()),
            Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().to_string()),
            Err(e) => Err(format!("cannot run `docker`: {e}")),
        }
    });
    if let Err(e) = result {
        panic!(
            "Docker is required for the service tests: `docker info` failed: {e}. Start the Docker engine (these tests do not skip)."
        );
    }
}

fn newest_mtime(paths: &[PathBuf]) -> SystemTime {
    let mut newest = SystemTime::UNIX_EPOCH;
    for root in paths {
        for entry in walkdir::WalkDir::new(root).into_iter().flatten() {
            if let Some(m) = entry.metadata().ok().and_then(|m| m.modified().ok()) {
                newest = newest.max(m);
            }
        }
    }
    newest
}

/// The testkit built static (`crt-static`, rusqlite bundled) so that it runs in a
/// `FROM scratch` image. Reused while it is newer than the testkit's sources and the
/// manifest (the testkit does not use the `runbook` library).
pub fn static_testkit() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| static_build("runbook-testkit", &["testkit"]))
        .clone()
}

/// The engine built static, as `runbook fleet` installs it on a host (it refuses a
/// dynamically linked one). Reused while it is newer than `src/` and the manifest.
pub fn static_runbook() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| static_build("runbook", &["src"]))
        .clone()
}

/// `cargo build --release --target x86_64-unknown-linux-gnu --bin NAME` with
/// `crt-static`, into this build's target dir (where `.ci/run` built it before the
/// tests), unless the binary there is newer than `sources` and the manifest.
fn static_build(name: &str, sources: &[&str]) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // target/debug/runbook-testkit -> target
    let target_dir = Path::new(env!("CARGO_BIN_EXE_runbook-testkit"))
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .to_path_buf();
    let triple = "x86_64-unknown-linux-gnu";
    let bin = target_dir.join(triple).join("release").join(name);
    let mut inputs: Vec<PathBuf> = sources.iter().map(|s| root.join(s)).collect();
    inputs.extend([root.join("Cargo.toml"), root.join("Cargo.lock")]);
    let built = std::fs::metadata(&bin).and_then(|m| m.modified()).ok();
    if built.is_some_and(|b| b >= newest_mtime(&inputs)) {
        return bin;
    }
    let started = Instant::now();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["build", "--release", "--locked", "--target", triple])
        .args(["--bin", name, "--target-dir"])
        .arg(&target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .current_dir(root)
        .stdin(Stdio::null())
        .output()
        .expect("run cargo");
    assert!(
        out.status.success(),
        "building the static {name} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Cargo may find it fresh without relinking; mark it as checked now.
    std::fs::File::options()
        .append(true)
        .open(&bin)
        .and_then(|f| f.set_modified(SystemTime::now()))
        .unwrap();
    eprintln!(
        "built the static {name} in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    bin
}

/// `runbook-test/health:<hash of the binary>`, built from a temp context with
/// `FROM scratch`; nothing is pulled. The tag names the content, so tests of other
/// checkouts running at the same time never see each other's image.
pub fn image() -> &'static str {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(|| {
        require_docker();
        let bin = static_testkit();
        let bytes = std::fs::read(&bin).unwrap();
        let hash = runbook::actions::files::hex(&Sha256::digest(&bytes));
        let tag = format!("runbook-test/health:{}", &hash[..12]);
        if docker(&["image", "inspect", &tag]).status.success() {
            return tag;
        }
        let ctx = tempfile::tempdir().unwrap();
        std::fs::write(ctx.path().join("runbook-testkit"), &bytes).unwrap();
        std::fs::set_permissions(
            ctx.path().join("runbook-testkit"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        std::fs::write(
            ctx.path().join("Dockerfile"),
            "FROM scratch\nCOPY runbook-testkit /runbook-testkit\nENTRYPOINT [\"/runbook-testkit\", \"health-serve\"]\nCMD [\"--port\", \"8080\"]\n",
        )
        .unwrap();
        docker_ok(&["build", "-q", "-t", &tag, &ctx.path().display().to_string()]);
        tag
    })
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ------------------------------------------------------------ the off-site host

/// A real off-site host: `runbook-testkit offsite-host` (Debian's sshd in a network
/// namespace of its own, behind a veth pair), with its key, known_hosts and repository
/// dir. Dropping it tears it down (the testkit process, then `offsite-host down` as a
/// backstop for what a crash left).
pub struct OffsiteHost {
    child: Option<Child>,
    /// Holds the keys, known_hosts, `repo/` and sshd's log; removed after teardown.
    pub dir: tempfile::TempDir,
    pub host: String,
    pub port: u16,
    pub user: String,
    pub ssh_key: PathBuf,
    pub known_hosts: PathBuf,
    pub repo_dir: PathBuf,
    pub netns: String,
    pub veth: String,
}

impl OffsiteHost {
    /// Starts one and waits until it accepts a real ssh login. Hosts started by tests
    /// running at the same time get their own names and /30s.
    pub fn start() -> OffsiteHost {
        use std::io::{BufRead, BufReader};
        use std::sync::atomic::{AtomicU32, Ordering};
        static COUNT: AtomicU32 = AtomicU32::new(0);
        // "t" + pid + a counter, in base 36: at most 10 characters (interface names).
        let name = loop {
            let n = COUNT.fetch_add(1, Ordering::SeqCst);
            let name = format!("t{}{}", base36(std::process::id()), base36(n));
            // A namespace of that name left by a crashed run with the same pid.
            if !Path::new("/run/netns").join(format!("rbk-{name}")).exists() {
                break name;
            }
        };
        let dir = tempfile::tempdir().expect("tempdir");
        // Its own messages go to a file beside sshd's log, not into the test output.
        let log_path = dir.path().join("offsite-host.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_runbook-testkit"))
            .args([
                "offsite-host",
                "--until-stdin-closes",
                "--name",
                &name,
                "--dir",
            ])
            .arg(dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn runbook-testkit offsite-host");
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        let doc: serde_json::Value = match serde_json::from_str(&first) {
            Ok(doc) => doc,
            Err(_) => {
                let status = child.wait().unwrap();
                panic!(
                    "runbook-testkit offsite-host did not start ({status}): {}\n\
                     The off-site tests need root, iproute2 and Debian's openssh-server (they do not skip).",
                    std::fs::read_to_string(&log_path)
                        .unwrap_or_default()
                        .trim()
                );
            }
        };
        let s = |k: &str| doc[k].as_str().unwrap().to_string();
        let host = OffsiteHost {
            child: Some(child),
            host: s("host"),
            port: u16::try_from(doc["port"].as_u64().unwrap()).unwrap(),
            user: s("user"),
            ssh_key: s("ssh_key").into(),
            known_hosts: s("known_hosts").into(),
            repo_dir: s("repo_dir").into(),
            netns: s("netns"),
            veth: s("veth"),
            dir,
        };
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(
                &std::fs::read_to_string(host.dir.path().join("host.json")).unwrap()
            )
            .unwrap(),
            doc,
            "host.json and the line on stdout differ"
        );
        host
    }

    /// The `offsite_*` vars of the AtoCore runbooks for this host, as YAML lines.
    pub fn vars_yaml(&self) -> String {
        format!(
            "offsite_host: {}\noffsite_port: {}\noffsite_user: {}\noffsite_dir: {}\noffsite_ssh_key: {}\noffsite_known_hosts: {}\n",
            self.host,
            self.port,
            self.user,
            self.repo_dir.display(),
            self.ssh_key.display(),
            self.known_hosts.display()
        )
    }

    /// `ssh` with the options the engine uses (key, known_hosts verified, BatchMode),
    /// up to and including `--`; append the remote command.
    pub fn ssh(&self, connect_timeout_s: u32) -> Command {
        self.ssh_with(connect_timeout_s, &[])
    }

    /// [`Self::ssh`] with more `-o` options (`"ServerAliveInterval=1"`).
    pub fn ssh_with(&self, connect_timeout_s: u32, options: &[&str]) -> Command {
        let mut c = Command::new("ssh");
        c.args(["-F", "/dev/null", "-i"])
            .arg(&self.ssh_key)
            .args(["-p", &self.port.to_string()]);
        for opt in [
            "BatchMode=yes".to_string(),
            "IdentitiesOnly=yes".to_string(),
            "StrictHostKeyChecking=yes".to_string(),
            format!("UserKnownHostsFile={}", self.known_hosts.display()),
            "GlobalKnownHostsFile=/dev/null".to_string(),
            format!("ConnectTimeout={connect_timeout_s}"),
        ] {
            c.args(["-o", &opt]);
        }
        for opt in options {
            c.args(["-o", opt]);
        }
        c.arg(format!("{}@{}", self.user, self.host))
            .arg("--")
            .stdin(Stdio::null());
        c
    }

    /// Cuts the link (this side of the veth down): new connections fail at once, open
    /// ones get no answers. Nothing goes out another way meanwhile.
    pub fn link_down(&self) {
        ip_ok(&["link", "set", &self.veth, "down"]);
    }

    pub fn link_up(&self) {
        ip_ok(&["link", "set", &self.veth, "up"]);
    }

    /// Bytes that crossed the link so far, both directions (the veth's counters).
    pub fn bytes_crossed(&self) -> u64 {
        self.bytes_to_host() + self.veth_counter("rx_bytes")
    }

    /// Bytes sent from this side to the host so far.
    pub fn bytes_to_host(&self) -> u64 {
        self.veth_counter("tx_bytes")
    }

    fn veth_counter(&self, name: &str) -> u64 {
        let path = format!("/sys/class/net/{}/statistics/{name}", self.veth);
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .trim()
            .parse()
            .unwrap()
    }

    /// The testkit process (for tests of what happens when it dies).
    pub fn process(&mut self) -> &mut Child {
        self.child.as_mut().unwrap()
    }
}

impl Drop for OffsiteHost {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Its stdin closing is its signal to tear down.
            drop(child.stdin.take());
            let deadline = Instant::now() + std::time::Duration::from_secs(15);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Removes whatever the process left (it was killed, or its teardown failed).
        let _ = Command::new(env!("CARGO_BIN_EXE_runbook-testkit"))
            .args(["offsite-host", "down", "--dir"])
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status();
    }
}

fn base36(mut n: u32) -> String {
    let digits = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(digits[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap()
}

/// Runs `ip` (iproute2); its stdout. Panics with its stderr when it fails.
pub fn ip_ok(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
