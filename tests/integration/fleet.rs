//! `runbook fleet`: what it refuses before any host is contacted. (Runs against real
//! SSH hosts are not in the suite yet; see the README's fleet section.)

use crate::support::Sandbox;

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
    let r = sb.run(&["fleet", "run", "t/count", "--hosts", "hosts.yaml"]);
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
    let r = sb.run(&["fleet", "run", "t/count", "--hosts", "hosts.yaml"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("hosts.yaml:7:15") && r.stderr.contains("no host named `web2`"),
        "{}",
        r.stderr
    );
    sb.write("hosts.yaml", &inv.replace(", web2", ""));
    let r = sb.run(&[
        "fleet",
        "plan",
        "t/count",
        "--hosts",
        "hosts.yaml",
        "--limit",
        "wbe",
    ]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("--limit: no host or group named `wbe`")
            && r.stderr.contains("did you mean `web"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_dynamically_linked_engine_is_refused_before_any_host_is_contacted() {
    // 127.0.0.1:9 (discard) would fail to connect: the refusal must come first.
    let sb = sandbox(
        "hosts:\n  a:\n    address: 127.0.0.1\n    port: 9\n    ssh_key: key\n    known_hosts: known_hosts\n",
    );
    let r = sb.run(&[
        "fleet",
        "run",
        "t/count",
        "--hosts",
        "hosts.yaml",
        "--set",
        "out=/tmp/x",
        "--engine",
        env!("CARGO_BIN_EXE_runbook"),
    ]);
    assert_eq!(r.code, 3, "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("is dynamically linked") && r.stderr.contains("crt-static"),
        "{}",
        r.stderr
    );
    assert!(!sb.p("state/fleet").exists());
    let r = sb.run(&[
        "fleet",
        "run",
        "t/count",
        "--hosts",
        "hosts.yaml",
        "--set",
        "outt=/tmp/x",
    ]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr
            .contains("declares no param `outt`; did you mean `out`?"),
        "{}",
        r.stderr
    );
}
