//! `offsite-host`: a real off-site host for the off-site tests, the benchmarks and the
//! drill: Debian's OpenSSH server (`/usr/sbin/sshd`) in a network namespace of its own,
//! reached from this namespace over a veth pair with a private /30, with host keys, a
//! client key and a known_hosts file made for it. Needs root (CAP_NET_ADMIN).
//!
//! ```text
//! runbook-testkit offsite-host --dir D [--name N] [--until-stdin-closes]
//! runbook-testkit offsite-host down --dir D
//! ```
//!
//! - N (default: 8 hex digits of the hash of D's path; 1 to 10 of `a-z0-9`) names the
//!   namespace `rbk-N` and the veth pair `rbkh-N` (this side) / `rbkn-N` (the host's
//!   side). The /30 comes from 10.233.0.0/16, picked from the hash of N and moved on past
//!   any /30 that an address or route of this namespace already covers (under a lock,
//!   so hosts started at the same time differ): this side is `.1`, the host `.2`.
//!   Nothing routes anywhere else: the namespace has no default route, and an
//!   `unreachable` route for the /30 (metric 4000) stops traffic for the host from taking
//!   this namespace's default route while the link is down.
//! - Below D it writes `host_ed25519_key{,.pub}` (the host key), `client_key{,.pub}` (the
//!   key to log in with), `authorized_keys`, `known_hosts` (the host key for the
//!   address: clients verify it), `sshd_config`, `sshd.log` (sshd's own log), `repo/`
//!   (an empty dir for the repository, kept if it exists: the host shares this
//!   filesystem, so tests can look at it directly) and `teardown.json` (what `down`
//!   removes; written before anything is created).
//! - Once a real `ssh ... true` login (BatchMode, the known_hosts, the client key)
//!   succeeds, it writes `D/host.json` and prints the same JSON on one line on stdout:
//!   `{"host": "10.233.x.y", "port": 22, "user": "root", "ssh_key": "D/client_key",
//!   "known_hosts": "D/known_hosts", "repo_dir": "D/repo", "netns": "rbk-N",
//!   "veth": "rbkh-N"}`.
//! - Then it waits. SIGTERM or SIGINT (or, with `--until-stdin-closes`, the end of its
//!   stdin) stops sshd and every process left in the namespace, deletes the veth pair,
//!   the namespace and the route, removes `host.json` and `teardown.json`, and exits 0.
//!   sshd also gets SIGTERM if this process dies.
//! - Cutting the link: `ip link set rbkh-N down` (connections fail at once with "No route
//!   to host"; open ones stop being answered), `ip link set rbkh-N up` restores it.
//!   Bytes that crossed it: `/sys/class/net/rbkh-N/statistics/{tx,rx}_bytes` (IPv6 is
//!   off on both ends, so nothing but the traffic of the test crosses).
//! - `down --dir D`: for a host whose test crashed. It stops the `offsite-host` process
//!   named in `teardown.json` if it still runs, then removes whatever is left; with
//!   nothing left it says so and exits 0.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value as Json, json};
use sha2::{Digest, Sha256};

use crate::atocore_standin::install_stop_handler;

const NAME: &str = "offsite-host";
/// 10.233.0.0/16, where the /30s come from.
const POOL: u32 = 0x0AE9_0000;
const POOL_SLOTS: u32 = 1 << 14;
/// Held while a /30 is picked and its addresses and route are added.
const POOL_LOCK: &str = "/run/lock/runbook-offsite-host.lock";
/// Above the kernel's connected route (metric 0), so it only answers while that is gone.
const UNREACHABLE_METRIC: &str = "4000";
const SSHD: &str = "/usr/sbin/sshd";
const SFTP_SERVER: &str = "/usr/lib/openssh/sftp-server";
/// How long sshd may take to accept the first login (a loaded machine is slow).
const READY_WITHIN: Duration = Duration::from_secs(30);

struct Options {
    dir: PathBuf,
    name: Option<String>,
    until_stdin_closes: bool,
}

pub fn main(args: &[String]) -> Result<(), String> {
    if args.first().is_some_and(|a| a == "down") {
        let dir = parse_down(&args[1..])?;
        return down(&dir);
    }
    up(&parse(args)?)
}

const USAGE: &str =
    "usage: offsite-host --dir D [--name N] [--until-stdin-closes] | offsite-host down --dir D";

fn parse(args: &[String]) -> Result<Options, String> {
    let mut opts = Options {
        dir: PathBuf::new(),
        name: None,
        until_stdin_closes: false,
    };
    let mut dir = None;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--dir" => dir = Some(PathBuf::from(rest.next().ok_or("--dir needs a value")?)),
            "--name" => opts.name = Some(rest.next().ok_or("--name needs a value")?.clone()),
            "--until-stdin-closes" => opts.until_stdin_closes = true,
            other => return Err(format!("unknown argument `{other}`; {USAGE}")),
        }
    }
    opts.dir = dir.ok_or(USAGE)?;
    Ok(opts)
}

fn parse_down(args: &[String]) -> Result<PathBuf, String> {
    match args {
        [flag, dir] if flag == "--dir" => Ok(PathBuf::from(dir)),
        _ => Err(USAGE.to_string()),
    }
}

/// The names of one host's namespace and veth ends, and its /30.
struct Host {
    name: String,
    netns: String,
    veth: String,
    veth_ns: String,
    /// The /30's network address; `None` until one is picked.
    subnet: Option<u32>,
}

impl Host {
    fn new(name: &str) -> Host {
        Host {
            name: name.to_string(),
            netns: format!("rbk-{name}"),
            veth: format!("rbkh-{name}"),
            veth_ns: format!("rbkn-{name}"),
            subnet: None,
        }
    }

    fn from_teardown(doc: &Json) -> Result<Host, String> {
        let name = doc["name"].as_str().ok_or("teardown.json has no `name`")?;
        let mut host = Host::new(name);
        host.subnet = doc["subnet"].as_str().map(parse_ipv4).transpose()?;
        Ok(host)
    }

    fn address(&self) -> Option<String> {
        self.subnet.map(|s| ipv4(s + 2))
    }
}

fn check_name(name: &str) -> Result<(), String> {
    // "rbkh-" + 10 characters is 15, the longest interface name Linux takes.
    let ok = (1..=10).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "--name `{name}`: 1 to 10 characters of a-z and 0-9 (it names the interfaces rbkh-N and rbkn-N)"
        ))
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn default_name(dir: &Path) -> String {
    let digest = sha256(dir.as_os_str().as_encoded_bytes());
    digest[..4].iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------
// Bringing the host up

fn up(opts: &Options) -> Result<(), String> {
    // First: a signal during the setup must still tear down what was made so far.
    let stop = install_stop_handler()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("needs root: it makes a network namespace and a veth pair".into());
    }
    for program in [SSHD, SFTP_SERVER] {
        if !Path::new(program).exists() {
            return Err(format!(
                "{program} is missing: install Debian's openssh-server (apt-get install openssh-server)"
            ));
        }
    }
    fs::create_dir_all(&opts.dir).map_err(|e| format!("{}: {e}", opts.dir.display()))?;
    let dir = opts
        .dir
        .canonicalize()
        .map_err(|e| format!("{}: {e}", opts.dir.display()))?;
    let name = match &opts.name {
        Some(n) => n.clone(),
        None => default_name(&dir),
    };
    check_name(&name)?;
    let mut host = Host::new(&name);
    if netns_exists(&host.netns) {
        return Err(format!(
            "network namespace {} exists already (a host named {name} runs, or one crashed: \
             `runbook-testkit offsite-host down --dir D` or `ip netns del {}`)",
            host.netns, host.netns
        ));
    }
    if dir.join("teardown.json").exists() {
        return Err(format!(
            "{} exists: a host made in this dir was not torn down; run `runbook-testkit offsite-host down --dir {}` first",
            dir.join("teardown.json").display(),
            dir.display()
        ));
    }
    let mut sshd = None;
    let result = bring_up(&dir, &mut host, &mut sshd, &stop).map(|()| {
        let why = wait(&stop, opts.until_stdin_closes, &mut sshd);
        eprintln!("{NAME}: {why}: tearing down {}", host.netns);
    });
    let torn = teardown(&dir, &host, sshd);
    match (result, torn) {
        (Ok(()), Ok(())) => Ok(()),
        (Ok(()), Err(t)) => Err(format!("teardown: {t}")),
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(t)) => Err(format!("{e}; teardown: {t}")),
    }
}

/// Makes everything; returns once a login succeeded and host.json is written.
fn bring_up(
    dir: &Path,
    host: &mut Host,
    sshd: &mut Option<Child>,
    stop: &File,
) -> Result<(), String> {
    let lock = lock_pool()?;
    let subnet = pick_subnet(&host.name)?;
    host.subnet = Some(subnet);
    let addr = ipv4(subnet + 2);
    let root_addr = ipv4(subnet + 1);
    let cidr = format!("{}/30", ipv4(subnet));
    // Before anything exists, so that `down` finds it after any crash from here on.
    write_json(
        &dir.join("teardown.json"),
        &json!({
            "name": host.name,
            "netns": host.netns,
            "veth": host.veth,
            "veth_ns": host.veth_ns,
            "subnet": cidr,
            "pid": std::process::id(),
        }),
    )?;
    ip(&["netns", "add", &host.netns])?;
    ip(&[
        "link",
        "add",
        &host.veth,
        "type",
        "veth",
        "peer",
        "name",
        &host.veth_ns,
        "netns",
        &host.netns,
    ])?;
    // No IPv6 link-local addresses: no router solicitations or MLD reports, so the
    // veth's byte counters hold only the traffic of whoever uses the host. A kernel
    // without IPv6 has none to begin with.
    let _ = ip(&["link", "set", &host.veth, "addrgenmode", "none"]);
    let _ = ip(&[
        "-n",
        &host.netns,
        "link",
        "set",
        &host.veth_ns,
        "addrgenmode",
        "none",
    ]);
    ip(&["addr", "add", &format!("{root_addr}/30"), "dev", &host.veth])?;
    ip(&[
        "route",
        "add",
        "unreachable",
        &cidr,
        "metric",
        UNREACHABLE_METRIC,
    ])?;
    drop(lock);
    ip(&["link", "set", &host.veth, "up"])?;
    ip(&[
        "-n",
        &host.netns,
        "addr",
        "add",
        &format!("{addr}/30"),
        "dev",
        &host.veth_ns,
    ])?;
    ip(&["-n", &host.netns, "link", "set", "lo", "up"])?;
    ip(&["-n", &host.netns, "link", "set", &host.veth_ns, "up"])?;
    stopped(stop)?;

    let host_key = dir.join("host_ed25519_key");
    let client_key = dir.join("client_key");
    keygen(
        &host_key,
        &format!("runbook offsite-host {} host", host.name),
    )?;
    keygen(
        &client_key,
        &format!("runbook offsite-host {} client", host.name),
    )?;
    let client_pub = read(&client_key.with_extension("pub"))?;
    let authorized = dir.join("authorized_keys");
    write_file(&authorized, client_pub.as_bytes(), 0o600)?;
    let host_pub = read(&host_key.with_extension("pub"))?;
    let mut words = host_pub.split_whitespace();
    let (Some(kind), Some(key)) = (words.next(), words.next()) else {
        return Err(format!("{}: not a public key", host_key.display()));
    };
    let known_hosts = dir.join("known_hosts");
    write_file(
        &known_hosts,
        format!("{addr} {kind} {key}\n").as_bytes(),
        0o644,
    )?;
    let repo = dir.join("repo");
    fs::create_dir_all(&repo).map_err(|e| format!("{}: {e}", repo.display()))?;

    let config = dir.join("sshd_config");
    write_file(
        &config,
        sshd_config(dir, &addr, &host_key, &authorized).as_bytes(),
        0o644,
    )?;
    // sshd's privilege separation directory; Debian's package makes it only at boot.
    fs::create_dir_all("/run/sshd").map_err(|e| format!("/run/sshd: {e}"))?;
    fs::set_permissions("/run/sshd", fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("/run/sshd: {e}"))?;
    let config_s = config.display().to_string();
    let checked = Command::new(SSHD)
        .args(["-t", "-f", &config_s])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{SSHD}: {e}"))?;
    if !checked.status.success() {
        return Err(format!(
            "sshd -t rejects {config_s}: {}",
            String::from_utf8_lossy(&checked.stderr).trim()
        ));
    }
    let log_path = dir.join("sshd.log");
    let log = File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        &host.netns,
        SSHD,
        "-D",
        "-e",
        "-f",
        &config_s,
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(log);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    // `ip netns exec` execs sshd in the same process, so the setting reaches sshd: it
    // stops if this process dies without tearing down.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    *sshd = Some(
        cmd.spawn()
            .map_err(|e| format!("ip netns exec {SSHD}: {e}"))?,
    );

    let doc = json!({
        "host": addr,
        "port": 22,
        "user": "root",
        "ssh_key": client_key.display().to_string(),
        "known_hosts": known_hosts.display().to_string(),
        "repo_dir": repo.display().to_string(),
        "netns": host.netns,
        "veth": host.veth,
    });
    let started = Instant::now();
    loop {
        stopped(stop)?;
        if let Some(status) = sshd.as_mut().and_then(|c| c.try_wait().ok()).flatten() {
            return Err(format!(
                "sshd exited ({status}) before accepting a login; its log ({}):\n{}",
                log_path.display(),
                read(&log_path).unwrap_or_default().trim()
            ));
        }
        let login = Command::new("ssh")
            .args(ssh_args(&doc, "2"))
            .arg("true")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("ssh: {e} (install Debian's openssh-client)"))?;
        if login.status.success() {
            break;
        }
        if started.elapsed() > READY_WITHIN {
            return Err(format!(
                "sshd did not accept a login within {}s; ssh said: {}; sshd's log ({}):\n{}",
                READY_WITHIN.as_secs(),
                String::from_utf8_lossy(&login.stderr).trim(),
                log_path.display(),
                read(&log_path).unwrap_or_default().trim()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    write_json(&dir.join("host.json"), &doc)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{doc}")
        .and_then(|()| out.flush())
        .map_err(|e| format!("stdout: {e}"))?;
    eprintln!(
        "{NAME}: sshd of {} listens on {addr}:22 (this side {root_addr}, link {})",
        host.netns, host.veth
    );
    Ok(())
}

/// The client's argv after `ssh`, up to the remote command: the same options the
/// engine's off-site transport uses (host key verified, no prompts, this key only).
fn ssh_args(doc: &Json, connect_timeout: &str) -> Vec<String> {
    let s = |k: &str| doc[k].as_str().unwrap_or_default().to_string();
    let mut argv = vec!["-F".to_string(), "/dev/null".to_string()];
    argv.extend(["-i".to_string(), s("ssh_key")]);
    argv.extend(["-p".to_string(), doc["port"].to_string()]);
    for opt in [
        "BatchMode=yes".to_string(),
        "IdentitiesOnly=yes".to_string(),
        "StrictHostKeyChecking=yes".to_string(),
        format!("UserKnownHostsFile={}", s("known_hosts")),
        "GlobalKnownHostsFile=/dev/null".to_string(),
        format!("ConnectTimeout={connect_timeout}"),
    ] {
        argv.extend(["-o".to_string(), opt]);
    }
    argv.push(format!("{}@{}", s("user"), s("host")));
    argv.push("--".to_string());
    argv
}

fn sshd_config(dir: &Path, addr: &str, host_key: &Path, authorized: &Path) -> String {
    format!(
        "# Written by runbook-testkit offsite-host; sshd runs in its own network namespace.\n\
         ListenAddress {addr}:22\n\
         HostKey {host_key}\n\
         PidFile {pid}\n\
         AuthorizedKeysFile {authorized}\n\
         AuthenticationMethods publickey\n\
         PubkeyAuthentication yes\n\
         PasswordAuthentication no\n\
         KbdInteractiveAuthentication no\n\
         PermitRootLogin prohibit-password\n\
         AllowUsers root\n\
         # Without PAM: the test machine's PAM stack is not what is under test.\n\
         UsePAM no\n\
         # The files live in a temp dir below the world-writable /tmp.\n\
         StrictModes no\n\
         X11Forwarding no\n\
         AllowTcpForwarding no\n\
         PermitTunnel no\n\
         PrintMotd no\n\
         PrintLastLog no\n\
         # Sessions of a client that vanished (a cut link) end instead of lingering.\n\
         ClientAliveInterval 5\n\
         ClientAliveCountMax 3\n\
         # Tests and benchmarks open many connections at once.\n\
         MaxStartups 100:30:200\n\
         MaxSessions 50\n\
         Subsystem sftp {SFTP_SERVER}\n",
        host_key = host_key.display(),
        pid = dir.join("sshd.pid").display(),
        authorized = authorized.display(),
    )
}

fn keygen(path: &Path, comment: &str) -> Result<(), String> {
    // ssh-keygen asks before overwriting; a dir used before gets new keys.
    for old in [path.to_path_buf(), path.with_extension("pub")] {
        match fs::remove_file(&old) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", old.display())),
        }
    }
    let path_s = path.display().to_string();
    run(
        "ssh-keygen",
        &[
            "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", &path_s,
        ],
    )
    .map(drop)
}

/// Waits for the reason to stop; says which.
fn wait(stop: &File, until_stdin_closes: bool, sshd: &mut Option<Child>) -> String {
    let mut sshd_gone = false;
    loop {
        let mut fds = vec![libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        if until_stdin_closes {
            fds.push(libc::pollfd {
                fd: libc::STDIN_FILENO,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // SAFETY: fds is a valid array of fds.len() pollfd structs.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
        if n > 0 {
            if fds[0].revents != 0 {
                let mut signal = [0u8; 1];
                return match (&*stop).read(&mut signal) {
                    Ok(1) if i32::from(signal[0]) == libc::SIGINT => "SIGINT".into(),
                    Ok(1) => "SIGTERM".into(),
                    _ => "signal pipe closed".into(),
                };
            }
            if fds.len() > 1 && fds[1].revents != 0 {
                let mut buf = [0u8; 4096];
                match std::io::stdin().lock().read(&mut buf) {
                    Ok(0) | Err(_) => return "stdin closed".into(),
                    Ok(_) => {}
                }
            }
        }
        if !sshd_gone && let Some(status) = sshd.as_mut().and_then(|c| c.try_wait().ok()).flatten()
        {
            // Kept up: whoever stopped it (a test cutting the service) decides.
            eprintln!(
                "{NAME}: sshd exited ({status}); the namespace stays until this process is stopped"
            );
            sshd_gone = true;
        }
    }
}

/// Fails when a stop signal arrived (during the setup).
fn stopped(stop: &File) -> Result<(), String> {
    let mut fds = [libc::pollfd {
        fd: stop.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: fds is a valid array of one pollfd.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
    if n > 0 {
        Err("stopped by a signal before the host was up".into())
    } else {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------
// Tearing down (also for `down`): every step checks first, so it can run twice.

fn teardown(dir: &Path, host: &Host, sshd: Option<Child>) -> Result<(), String> {
    let mut errors = Vec::new();
    if let Some(mut child) = sshd {
        if child.try_wait().ok().flatten().is_none() {
            signal(child.id(), libc::SIGTERM);
            let until = Instant::now() + Duration::from_secs(3);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
        }
        let _ = child.wait();
    }
    if netns_exists(&host.netns) {
        // The sessions sshd forked outlive it; nothing may stay in the namespace.
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            let pids = netns_pids(&host.netns);
            if pids.is_empty() {
                break;
            }
            if Instant::now() > until {
                errors.push(format!(
                    "processes {pids:?} stay in {} after SIGKILL",
                    host.netns
                ));
                break;
            }
            for pid in pids {
                signal(pid, libc::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // Deleting one end deletes the pair.
    if Path::new("/sys/class/net").join(&host.veth).exists()
        && let Err(e) = ip(&["link", "del", &host.veth])
    {
        errors.push(e);
    }
    if netns_exists(&host.netns)
        && let Err(e) = ip(&["netns", "del", &host.netns])
    {
        errors.push(e);
    }
    if let Some(subnet) = host.subnet {
        let cidr = format!("{}/30", ipv4(subnet));
        let listed = run("ip", &["-4", "route", "show", "exact", &cidr]).unwrap_or_default();
        if listed.lines().any(|l| l.starts_with("unreachable"))
            && let Err(e) = ip(&[
                "route",
                "del",
                "unreachable",
                &cidr,
                "metric",
                UNREACHABLE_METRIC,
            ])
        {
            errors.push(e);
        }
    }
    if errors.is_empty() {
        for file in ["host.json", "teardown.json"] {
            let _ = fs::remove_file(dir.join(file));
        }
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

fn down(dir: &Path) -> Result<(), String> {
    let path = dir.join("teardown.json");
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!(
                "{NAME} down: nothing to tear down ({} is absent)",
                path.display()
            );
            return Ok(());
        }
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let doc: Json = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let host = Host::from_teardown(&doc)?;
    // The process that made it tears down best (it also reaps sshd); give it the chance.
    if let Some(pid) = doc["pid"].as_u64().and_then(|p| u32::try_from(p).ok())
        && is_offsite_host(pid)
    {
        signal(pid, libc::SIGTERM);
        let until = Instant::now() + Duration::from_secs(10);
        while is_offsite_host(pid) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    teardown(dir, &host, None)?;
    println!(
        "{NAME} down: {} and {} are gone{}",
        host.netns,
        host.veth,
        host.address()
            .map(|a| format!(" (host was {a})"))
            .unwrap_or_default()
    );
    Ok(())
}

/// Whether `pid` is (still) a `runbook-testkit offsite-host` process, not a reused pid.
fn is_offsite_host(pid: u32) -> bool {
    fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
        let mut args = cmdline.split(|b| *b == 0);
        args.next().is_some_and(|a| a.ends_with(b"runbook-testkit"))
            && args.next() == Some(NAME.as_bytes())
    })
}

fn signal(pid: u32, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill has no memory preconditions; a gone pid gives ESRCH.
        unsafe { libc::kill(pid, signal) };
    }
}

fn netns_exists(netns: &str) -> bool {
    Path::new("/run/netns").join(netns).exists()
}

fn netns_pids(netns: &str) -> Vec<u32> {
    run("ip", &["netns", "pids", netns])
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

// ---------------------------------------------------------------------------------
// Picking a free /30

fn lock_pool() -> Result<File, String> {
    let _ = fs::create_dir_all("/run/lock");
    let file = File::options()
        .create(true)
        .append(true)
        .open(POOL_LOCK)
        .map_err(|e| format!("{POOL_LOCK}: {e}"))?;
    // SAFETY: a valid open fd; the lock goes with the File.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(format!(
            "flock {POOL_LOCK}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(file)
}

/// The /30 for `name`: the one its hash points at, or the next that no address or route
/// of this namespace touches.
fn pick_subnet(name: &str) -> Result<u32, String> {
    let used = used_prefixes()?;
    let digest = sha256(name.as_bytes());
    let start = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) % POOL_SLOTS;
    (0..POOL_SLOTS)
        .map(|k| POOL + ((start + k) % POOL_SLOTS) * 4)
        .find(|&net| !used.iter().any(|&(n, len)| overlaps(net, 30, n, len)))
        .ok_or_else(|| "no free /30 left in 10.233.0.0/16".to_string())
}

/// Every IPv4 prefix an address or a route of this namespace covers (default excepted).
fn used_prefixes() -> Result<Vec<(u32, u32)>, String> {
    let mut used = Vec::new();
    for line in run("ip", &["-4", "-o", "addr", "show"])?.lines() {
        let mut words = line.split_whitespace();
        if words.any(|w| w == "inet")
            && let Some(prefix) = words.next().and_then(parse_prefix)
        {
            used.push(prefix);
        }
    }
    for line in run("ip", &["-4", "route", "show", "table", "all"])?.lines() {
        let mut words = line.split_whitespace();
        let mut first = words.next().unwrap_or_default();
        if matches!(
            first,
            "unicast"
                | "unreachable"
                | "blackhole"
                | "prohibit"
                | "throw"
                | "local"
                | "broadcast"
                | "multicast"
                | "anycast"
                | "nat"
        ) {
            first = words.next().unwrap_or_default();
        }
        if let Some(prefix) = parse_prefix(first) {
            used.push(prefix);
        }
    }
    Ok(used)
}

/// `a.b.c.d/len` or `a.b.c.d` (a /32); `None` for anything else (`default`).
fn parse_prefix(word: &str) -> Option<(u32, u32)> {
    let (addr, len) = match word.split_once('/') {
        Some((a, l)) => (a, l.parse().ok()?),
        None => (word, 32),
    };
    let addr = parse_ipv4(addr).ok()?;
    (len <= 32).then_some((addr, len))
}

fn overlaps(a: u32, a_len: u32, b: u32, b_len: u32) -> bool {
    let len = a_len.min(b_len);
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    a & mask == b & mask
}

fn parse_ipv4(text: &str) -> Result<u32, String> {
    let text = text.split('/').next().unwrap_or(text);
    text.parse::<std::net::Ipv4Addr>()
        .map(u32::from)
        .map_err(|e| format!("`{text}`: {e}"))
}

fn ipv4(addr: u32) -> String {
    std::net::Ipv4Addr::from(addr).to_string()
}

// ---------------------------------------------------------------------------------

fn ip(args: &[&str]) -> Result<String, String> {
    run("ip", args)
}

/// Runs a program (argv, no shell); its stdout, or an error with its stderr.
fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn read(path: &Path) -> Result<String, String> {
    fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    fs::write(path, bytes)
        .and_then(|()| fs::set_permissions(path, fs::Permissions::from_mode(mode)))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Written whole under a temp name, then renamed: a reader never sees half of it.
fn write_json(path: &Path, doc: &Json) -> Result<(), String> {
    let tmp = path.with_extension("json.tmp");
    let mut text = serde_json::to_string_pretty(doc).map_err(|e| e.to_string())?;
    text.push('\n');
    write_file(&tmp, text.as_bytes(), 0o644)?;
    fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}
