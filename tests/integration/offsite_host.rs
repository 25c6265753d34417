//! `runbook-testkit offsite-host`, the off-site host of the off-site tests: a real sshd
//! in its own network namespace, its host key verified, its link cut and restored, its
//! bytes counted, and nothing of it left after teardown (also after a crash).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::{OffsiteHost, ip_ok};

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Nothing of a host named so exists: namespace, either veth end, a route to its /30.
fn assert_gone(netns: &str, veth: &str, host: &str) {
    let namespaces = ip_ok(&["netns", "list"]);
    assert!(
        !namespaces.split_whitespace().any(|w| w == netns),
        "{netns} is still listed: {namespaces}"
    );
    let links = ip_ok(&["-o", "link", "show"]);
    let ns_side = veth.replacen("rbkh-", "rbkn-", 1);
    assert!(
        !links.contains(&format!(" {veth}")) && !links.contains(&format!(" {ns_side}")),
        "{veth} is still there: {links}"
    );
    // The /30's network address: the host is its .2.
    let octets: Vec<u8> = host.split('.').map(|o| o.parse().unwrap()).collect();
    let net = format!(
        "{}.{}.{}.{}/30",
        octets[0],
        octets[1],
        octets[2],
        octets[3] - 2
    );
    let routes = ip_ok(&["-4", "route", "show", "table", "all"]);
    assert!(!routes.contains(&net), "a route to {net} is left: {routes}");
}

#[test]
fn offsite_host_takes_a_real_ssh_login_in_its_own_namespace() {
    let h = OffsiteHost::start();
    assert!(h.host.starts_with("10.233."), "{}", h.host);
    assert_eq!((h.port, h.user.as_str()), (22, "root"));
    assert_eq!(h.netns, h.veth.replacen("rbkh-", "rbk-", 1));
    // This side of the /30 is .1, on the veth the host.json names.
    let mine = ip_ok(&["-4", "-o", "addr", "show", "dev", &h.veth]);
    let last: u8 = h.host.rsplit('.').next().unwrap().parse().unwrap();
    let prefix = h.host.rsplit_once('.').unwrap().0;
    assert!(
        mine.contains(&format!("inet {prefix}.{}/30", last - 1)),
        "{mine}"
    );

    // The remote command runs in the host's namespace, not in this one.
    let remote = ok(&h
        .ssh(5)
        .args(["readlink", "/proc/self/ns/net"])
        .output()
        .unwrap());
    let here = std::fs::read_link("/proc/self/ns/net").unwrap();
    let netns_inode = std::fs::metadata(Path::new("/run/netns").join(&h.netns))
        .unwrap()
        .ino();
    assert_eq!(remote.trim(), format!("net:[{netns_inode}]"));
    assert_ne!(Path::new(remote.trim()), here);

    // It shares this filesystem: what the remote writes in repo_dir is here to read.
    let probe = h.repo_dir.join("probe");
    ok(&h
        .ssh(5)
        .arg(format!("echo written remotely > {}", probe.display()))
        .output()
        .unwrap());
    assert_eq!(
        std::fs::read_to_string(&probe).unwrap(),
        "written remotely\n"
    );

    // The sftp subsystem works (restic's sftp backend uses it).
    let local = h.dir.path().join("local.txt");
    std::fs::write(&local, "via sftp\n").unwrap();
    let batch = h.dir.path().join("batch");
    std::fs::write(
        &batch,
        format!(
            "put {} {}\n",
            local.display(),
            h.repo_dir.join("sftp.txt").display()
        ),
    )
    .unwrap();
    let sftp = Command::new("sftp")
        .args(["-F", "/dev/null", "-b"])
        .arg(&batch)
        .arg("-i")
        .arg(&h.ssh_key)
        .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", h.known_hosts.display()))
        .args(["-o", "GlobalKnownHostsFile=/dev/null"])
        .arg(format!("{}@{}", h.user, h.host))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    ok(&sftp);
    assert_eq!(
        std::fs::read_to_string(h.repo_dir.join("sftp.txt")).unwrap(),
        "via sftp\n"
    );

    let vars = h.vars_yaml();
    assert!(
        vars.contains(&format!("offsite_host: {}\n", h.host)),
        "{vars}"
    );
    assert!(
        vars.contains(&format!(
            "offsite_known_hosts: {}\n",
            h.known_hosts.display()
        )),
        "{vars}"
    );
}

#[test]
fn a_host_key_that_is_not_in_known_hosts_is_refused() {
    let h = OffsiteHost::start();
    let marker = h.repo_dir.join("must-not-exist");
    let touch = format!("touch {}", marker.display());

    // Another key for the same address: ssh refuses, the command never runs.
    let other = h.dir.path().join("other_key");
    ok(&Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&other)
        .stdin(Stdio::null())
        .output()
        .unwrap());
    let other_pub = std::fs::read_to_string(other.with_extension("pub")).unwrap();
    let words: Vec<&str> = other_pub.split_whitespace().collect();
    std::fs::write(
        &h.known_hosts,
        format!("{} {} {}\n", h.host, words[0], words[1]),
    )
    .unwrap();
    let changed = h.ssh(5).arg(&touch).output().unwrap();
    assert_eq!(changed.status.code(), Some(255), "{}", stderr(&changed));
    assert!(
        stderr(&changed).contains("REMOTE HOST IDENTIFICATION HAS CHANGED"),
        "{}",
        stderr(&changed)
    );

    // No entry at all: refused too (never accepted blindly).
    std::fs::write(&h.known_hosts, "").unwrap();
    let unknown = h.ssh(5).arg(&touch).output().unwrap();
    assert_eq!(unknown.status.code(), Some(255), "{}", stderr(&unknown));
    assert!(
        stderr(&unknown).contains("Host key verification failed"),
        "{}",
        stderr(&unknown)
    );
    assert!(!marker.exists(), "the command ran on an unverified host");
    // And nothing was added to the file.
    assert_eq!(std::fs::read_to_string(&h.known_hosts).unwrap(), "");
}

#[test]
fn a_cut_link_fails_connections_within_the_connect_timeout_and_comes_back() {
    let h = OffsiteHost::start();
    ok(&h.ssh(5).arg("true").output().unwrap());

    // A session open when the link goes: ssh's keepalives notice it.
    let mut open = h
        .ssh_with(5, &["ServerAliveInterval=1", "ServerAliveCountMax=2"])
        .args(["sleep", "60"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    h.link_down();
    let cut = Instant::now();

    let started = Instant::now();
    let refused = h.ssh(5).arg("true").output().unwrap();
    let took = started.elapsed();
    assert_eq!(refused.status.code(), Some(255), "{}", stderr(&refused));
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // While the link is down the host's address is unreachable, not routed out by the
    // default route.
    let route = Command::new("ip")
        .args(["-4", "route", "get", &h.host])
        .output()
        .unwrap();
    assert!(
        !route.status.success() && stderr(&route).contains("No route to host"),
        "{}{}",
        String::from_utf8_lossy(&route.stdout),
        stderr(&route)
    );

    let status = loop {
        if let Some(status) = open.try_wait().unwrap() {
            break status;
        }
        assert!(
            cut.elapsed() < Duration::from_secs(15),
            "the open session did not notice the cut link"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    let mut said = String::new();
    open.stderr
        .take()
        .unwrap()
        .read_to_string(&mut said)
        .unwrap();
    assert!(said.contains("not responding"), "{said}");

    h.link_up();
    ok(&h.ssh(5).arg("true").output().unwrap());
}

#[test]
fn bytes_crossed_counts_what_goes_over_the_link() {
    let h = OffsiteHost::start();
    ok(&h.ssh(5).arg("true").output().unwrap());
    let mut payload = vec![0u8; 2 << 20];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut payload)
        .unwrap();
    let (to_host, both) = (h.bytes_to_host(), h.bytes_crossed());
    let mut sink = h
        .ssh(5)
        .arg(format!("cat > {}", h.repo_dir.join("blob").display()))
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    sink.stdin.take().unwrap().write_all(&payload).unwrap();
    assert!(sink.wait().unwrap().success());
    assert_eq!(std::fs::read(h.repo_dir.join("blob")).unwrap(), payload);
    let sent = h.bytes_to_host() - to_host;
    let crossed = h.bytes_crossed() - both;
    let n = payload.len() as u64;
    // Random bytes do not compress: the payload plus ssh's framing and handshake.
    assert!(
        sent >= n && sent < n + n / 10 + 65536,
        "sent {sent} for {n}"
    );
    assert!(
        crossed > sent && crossed < sent + n / 10,
        "crossed {crossed}"
    );
}

#[test]
fn dropping_the_host_removes_namespace_veth_route_and_sessions() {
    let h = OffsiteHost::start();
    let (netns, veth, host) = (h.netns.clone(), h.veth.clone(), h.host.clone());
    let dir = h.dir.path().to_path_buf();
    let mut session = h
        .ssh(5)
        .args(["sleep", "60"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(!ip_ok(&["netns", "pids", &netns]).trim().is_empty());
    drop(h);
    assert_gone(&netns, &veth, &host);
    assert!(!dir.exists());
    // Its session was ended, not left running in a namespace nobody can see.
    let deadline = Instant::now() + Duration::from_secs(10);
    while session.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the session outlived the host");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn down_removes_what_a_killed_testkit_left() {
    let mut h = OffsiteHost::start();
    let (netns, veth, host) = (h.netns.clone(), h.veth.clone(), h.host.clone());
    h.process().kill().unwrap();
    h.process().wait().unwrap();
    // sshd went with it (parent-death signal); the namespace and the veth stayed.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ip_ok(&["netns", "pids", &netns]).trim().is_empty() {
        assert!(Instant::now() < deadline, "sshd outlived the testkit");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(ip_ok(&["netns", "list"]).contains(&netns));
    assert!(h.dir.path().join("teardown.json").exists());

    let down = Command::new(env!("CARGO_BIN_EXE_runbook-testkit"))
        .args(["offsite-host", "down", "--dir"])
        .arg(h.dir.path())
        .output()
        .unwrap();
    let said = ok(&down);
    assert_eq!(
        said,
        format!("offsite-host down: {netns} and {veth} are gone (host was {host})\n")
    );
    assert_gone(&netns, &veth, &host);
    assert!(!h.dir.path().join("teardown.json").exists());
    assert!(!h.dir.path().join("host.json").exists());
    // A second time there is nothing left, and that is not an error.
    let again = Command::new(env!("CARGO_BIN_EXE_runbook-testkit"))
        .args(["offsite-host", "down", "--dir"])
        .arg(h.dir.path())
        .output()
        .unwrap();
    assert!(ok(&again).contains("nothing to tear down"));
}

#[test]
fn sigterm_tears_the_host_down_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let name = format!("s{}", std::process::id());
    let mut child = Command::new(env!("CARGO_BIN_EXE_runbook-testkit"))
        .args(["offsite-host", "--name", &name, "--dir"])
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let doc: serde_json::Value = serde_json::from_str(&first).unwrap();
    let host = doc["host"].as_str().unwrap().to_string();
    assert_eq!(doc["netns"], format!("rbk-{name}"));
    // SAFETY: kill has no memory preconditions; the pid is our own child's.
    assert_eq!(
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("SIGTERM: tearing down rbk-{name}")),
        "{}",
        stderr(&out)
    );
    assert_gone(&format!("rbk-{name}"), &format!("rbkh-{name}"), &host);
    assert!(!dir.path().join("host.json").exists());
}

#[test]
fn hosts_started_together_get_their_own_names_and_subnets() {
    let hosts: Vec<OffsiteHost> = std::thread::scope(|s| {
        let started: Vec<_> = (0..3).map(|_| s.spawn(OffsiteHost::start)).collect();
        started.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let mut addrs: Vec<&str> = hosts.iter().map(|h| h.host.as_str()).collect();
    let mut names: Vec<&str> = hosts.iter().map(|h| h.netns.as_str()).collect();
    addrs.sort_unstable();
    addrs.dedup();
    names.sort_unstable();
    names.dedup();
    assert_eq!((addrs.len(), names.len()), (3, 3), "{addrs:?} {names:?}");
    for h in &hosts {
        // Each address leads to its own namespace.
        let remote_ns = ok(&h
            .ssh(5)
            .args(["readlink", "/proc/self/ns/net"])
            .output()
            .unwrap());
        let inode = std::fs::metadata(Path::new("/run/netns").join(&h.netns))
            .unwrap()
            .ino();
        assert_eq!(remote_ns.trim(), format!("net:[{inode}]"));
    }
}
