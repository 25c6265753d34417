//! `http` against `runbook-testkit http-serve` on 127.0.0.1: expectations and named
//! outputs, secret headers, until_healthy, the dry-run (and `--probe`), SIGKILL + resume.

use std::io::{BufRead, BufReader};
use std::process::Child;

use crate::support::{HttpServer, Sandbox, tree_digest};

fn with_base(sb: &Sandbox, server: &HttpServer, text: &str) {
    sb.write(
        "runbooks/svc.yaml",
        &text.replace("{base}", &server.url("")),
    );
}

fn show_json(sb: &Sandbox, id: &str) -> serde_json::Value {
    let show = sb.run(&["show", id, "--format", "json"]);
    assert_eq!(show.code, 0, "{show:?}");
    serde_json::from_str(&show.stdout).unwrap()
}

#[test]
fn get_checks_status_and_jq_and_its_named_outputs_feed_a_later_step() {
    let server = HttpServer::start(&[
        "--route",
        "GET",
        "/projects",
        "200",
        r#"{"projects": [{"id": "p05-interferometer"}, {"id": "p06-polisher"}]}"#,
    ]);
    let sb = Sandbox::new();
    with_base(
        &sb,
        &server,
        r#"version: 1
steps:
  - id: projects
    action: http
    with:
      url: "{base}/projects"
      expect: {status: 200, jq: [".projects | length > 0"]}
      outputs: {count: ".projects | length", first: ".projects[0].id"}
  - id: record
    action: write-file
    with:
      path: "{root}/seen.txt"
      content: "{{ steps.projects.outputs.count }} {{ steps.projects.outputs.first }} {{ steps.projects.outputs.status }}"
"#,
    );
    let r = sb.run(&["run", "svc"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(sb.read("seen.txt"), "2 p05-interferometer 200");
    assert_eq!(server.request_lines(), ["GET /projects"]);
    let step = &show_json(&sb, &sb.last_run_id())["steps"][0];
    assert_eq!(step["outputs"]["status"], 200);
    assert_eq!(step["outputs"]["count"], 2);
    assert_eq!(step["outputs"]["body"]["projects"][1]["id"], "p06-polisher");
    assert!(step["outputs"]["duration"].as_f64().unwrap() >= 0.0);
}

#[test]
fn a_failing_expectation_says_what_was_expected_and_what_came() {
    let server = HttpServer::start(&["--route", "GET", "/stats", "200", r#"{"chunks": 3}"#]);
    let sb = Sandbox::new();
    with_base(
        &sb,
        &server,
        r#"version: 1
steps:
  - id: stats
    action: http
    with: {url: "{base}/stats", expect: {jq: [".chunks > 100"]}}
"#,
    );
    let r = sb.run(&["run", "svc"]);
    assert_eq!(r.code, 1, "{r:?}");
    let url = server.url("/stats");
    assert_eq!(
        r.stdout.lines().nth(1).unwrap(),
        format!(
            "  FAILED   stats: GET {url}: `.chunks > 100` does not hold: expected true, got false"
        )
    );
    with_base(
        &sb,
        &server,
        "version: 1\nsteps:\n  - id: gone\n    action: http\n    with: {url: \"{base}/gone\"}\n",
    );
    let r = sb.run(&["run", "svc"]);
    assert_eq!(r.code, 1, "{r:?}");
    let url = server.url("/gone");
    assert_eq!(
        r.stdout.lines().nth(1).unwrap(),
        format!(
            "  FAILED   gone: GET {url}: expected status 2xx, got 404 Not Found: {{\"error\":\"not found\",\"path\":\"/gone\"}}"
        )
    );
}

#[test]
fn a_post_sends_its_json_body_and_secret_token_and_the_token_is_never_shown_or_stored() {
    const SECRET: &str = "tok-9f8e7d6c5b4a-SECRET";
    let server = HttpServer::start(&["--route", "POST", "/admin/backup", "200", "@echo"]);
    let sb = Sandbox::new();
    with_base(
        &sb,
        &server,
        r#"version: 1
params:
  token: {type: string, secret: true, required: true}
  include_chroma: {type: bool, default: false}
steps:
  - id: backup
    action: http
    with:
      method: POST
      url: "{base}/admin/backup"
      headers: {Authorization: "Bearer {{ token }}"}
      json_text: '{"include_chroma": {{ include_chroma | tojson }}}'
      expect: {jq: [".json.include_chroma == false"]}
      outputs: {auth: .headers.authorization}
  - id: sent
    action: assert
    with: {that: "steps.backup.outputs.auth == 'Bearer ' ~ token", message: "the server did not get the token"}
"#,
    );
    let set = format!("token={SECRET}");
    let plan = sb.run(&["plan", "svc", "--set", &set, "--format", "json", "-vv"]);
    assert_eq!(plan.code, 0, "{plan:?}");
    let plan_doc: serde_json::Value = serde_json::from_str(&plan.stdout).unwrap();
    assert_eq!(
        plan_doc["steps"][0]["args"]["headers"]["Authorization"],
        "Bearer ********"
    );
    assert_eq!(
        plan_doc["steps"][0]["detail"],
        format!(
            "would POST {} with a 24-byte JSON body",
            server.url("/admin/backup")
        )
    );
    let run = sb.run(&["run", "svc", "--set", &set, "-vv"]);
    assert_eq!(run.code, 0, "{run:?}");
    // The server got the real token and the typed body.
    let got = server.requests();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["method"], "POST");
    assert_eq!(
        got[0]["headers"]["authorization"],
        format!("Bearer {SECRET}")
    );
    assert_eq!(got[0]["headers"]["content-type"], "application/json");
    assert_eq!(got[0]["body"], r#"{"include_chroma":false}"#);
    let id = sb.last_run_id();
    let show = sb.run(&["show", &id, "--format", "json"]);
    let record: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    assert_eq!(record["steps"][0]["outputs"]["auth"], "Bearer ********");
    let mut seen = String::new();
    for r in [&plan, &run, &show] {
        seen.push_str(&r.stdout);
        seen.push_str(&r.stderr);
    }
    assert!(seen.contains("Bearer ********"));
    assert!(!seen.contains(SECRET), "secret in output:\n{seen}");
    for entry in walkdir::WalkDir::new(sb.p("state")) {
        let entry = entry.unwrap();
        if entry.file_type().is_file() {
            let bytes = std::fs::read(entry.path()).unwrap();
            assert!(
                !bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
                "secret in {}",
                entry.path().display()
            );
        }
    }
}

#[test]
fn until_healthy_waits_for_a_starting_service_and_says_how_long_it_waited() {
    let server = HttpServer::start(&[
        "--route",
        "GET",
        "/health",
        "200",
        r#"{"status": "ok"}"#,
        "--fail-first",
        "3",
    ]);
    let sb = Sandbox::new();
    let runbook = r#"version: 1
steps:
  - id: health
    action: http
    with:
      url: "{base}/health"
      expect: {jq: ['.status == "ok"']}
      retry: {until_healthy: WINDOW, every: 100ms}
"#;
    with_base(&sb, &server, &runbook.replace("WINDOW", "20s"));
    let r = sb.run(&["run", "svc"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(server.request_lines().len(), 4, "3 refusals, then healthy");
    let step = &show_json(&sb, &sb.last_run_id())["steps"][0];
    assert_eq!(step["outputs"]["status"], 200);
    assert!(step["outputs"]["duration"].as_f64().unwrap() >= 0.3);

    // Too short a window: it gives up and says how long it waited.
    let down = HttpServer::start(&[
        "--route",
        "GET",
        "/health",
        "200",
        r#"{"status": "ok"}"#,
        "--fail-first",
        "1000",
    ]);
    with_base(&sb, &down, &runbook.replace("WINDOW", "500ms"));
    let started = std::time::Instant::now();
    let r = sb.run(&["run", "svc"]);
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert_eq!(r.code, 1, "{r:?}");
    let line = r.stdout.lines().nth(1).unwrap();
    let prefix = format!(
        "  FAILED   health: GET {}: not healthy after waiting ",
        down.url("/health")
    );
    assert!(line.starts_with(&prefix), "{r:?}");
    let waited = line[prefix.len()..].split_whitespace().next().unwrap();
    let waited = humantime::parse_duration(waited).unwrap();
    assert!(
        waited >= std::time::Duration::from_millis(350)
            && waited <= std::time::Duration::from_millis(1500),
        "{r:?}"
    );
    let tries = down.request_lines().len();
    assert!((4..=6).contains(&tries), "{tries} tries: {r:?}");
    assert!(
        line.ends_with(&format!(
            " ({tries} tries, every 100ms; until_healthy is 500ms); last answer: expected status 2xx, got 503 Service Unavailable: {{\"status\":\"starting\"}}"
        )),
        "{r:?}"
    );
}

const GET_AND_POST: &str = r#"version: 1
steps:
  - id: health
    action: http
    with: {url: "{base}/health", expect: {status: 200}}
  - id: backup
    action: http
    with: {method: POST, url: "{base}/admin/backup", json: {include_chroma: false}}
  - id: note
    action: write-file
    with: {path: "{root}/note.txt", content: "{{ steps.backup.outputs.status }}"}
"#;

#[test]
fn the_dry_run_sends_nothing_and_writes_nothing_and_probe_sends_only_the_get() {
    let server = HttpServer::start(&[
        "--route",
        "GET",
        "/health",
        "200",
        r#"{"status": "ok"}"#,
        "--route",
        "POST",
        "/admin/backup",
        "200",
        r#"{"backup_root": "/b"}"#,
    ]);
    let sb = Sandbox::new();
    with_base(&sb, &server, GET_AND_POST);
    let before = tree_digest(sb.path());
    let plan = sb.run(&["plan", "svc"]);
    assert_eq!(plan.code, 0, "{plan:?}");
    let (health, backup) = (server.url("/health"), server.url("/admin/backup"));
    let steps: Vec<&str> = plan.stdout.lines().skip_while(|l| *l != "steps:").collect();
    assert_eq!(
        steps,
        [
            "steps:".to_string(),
            format!("  no change   health  http: will GET {health}"),
            format!("  will change backup  http: would POST {backup} with a 24-byte JSON body"),
            "  unknown     note    write-file: unknown until backup runs".to_string(),
            "3 steps: 1 will change, 1 no change, 1 unknown, 0 skipped, 0 would fail".to_string(),
        ]
    );
    let dry = sb.run(&["run", "svc", "--dry-run"]);
    assert_eq!((dry.code, &dry.stdout), (0, &plan.stdout));
    assert!(server.requests().is_empty(), "the dry-run sent a request");
    assert_eq!(
        tree_digest(sb.path()),
        before,
        "the dry-run wrote something"
    );

    for args in [
        &["plan", "svc", "--probe"][..],
        &["run", "svc", "--dry-run", "--probe"][..],
    ] {
        let probed = sb.run(args);
        assert_eq!(probed.code, 0, "{probed:?}");
        assert!(
            probed.stdout.contains(&format!(
                "  no change   health  http: probed GET {health}: 200, expectations hold\n"
            )),
            "{probed:?}"
        );
        assert!(
            probed.stdout.contains(&format!(
                "  will change backup  http: would POST {backup} with a 24-byte JSON body\n"
            )),
            "{probed:?}"
        );
    }
    assert_eq!(server.request_lines(), ["GET /health", "GET /health"]);
    assert_eq!(tree_digest(sb.path()), before, "the probe wrote something");

    // A probe that fails is a `would fail`; --probe is refused on a real run.
    with_base(&sb, &server, &GET_AND_POST.replace("/health", "/down"));
    let before = tree_digest(sb.path());
    let probed = sb.run(&["plan", "svc", "--probe"]);
    assert_eq!(probed.code, 3, "{probed:?}");
    assert!(
        probed.stdout.contains(&format!(
            "  would fail  health  http: probed GET {}: expected status 200, got 404 Not Found: {{\"error\":\"not found\",\"path\":\"/down\"}}\n",
            server.url("/down")
        )),
        "{probed:?}"
    );
    let refused = sb.run(&["run", "svc", "--probe"]);
    assert_eq!(refused.code, 2, "{refused:?}");
    assert_eq!(
        refused.stderr,
        "error: --probe applies only to `runbook plan` and `runbook run --dry-run`\n"
    );
    assert_eq!(server.request_lines().len(), 3);
    assert_eq!(tree_digest(sb.path()), before);
}

/// Starts `runbook run svc`; returns the child and the run id.
fn start(sb: &Sandbox) -> (Child, String) {
    let mut child = sb.spawn(&["run", "svc"]);
    let mut first = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut first)
        .unwrap();
    let id = first.split_whitespace().nth(1).unwrap().to_string();
    (child, id)
}

#[test]
fn sigkill_during_a_slow_post_asks_the_operator_and_a_slow_get_is_simply_rerun() {
    let server = HttpServer::start(&[
        "--route",
        "POST",
        "/admin/backup",
        "200",
        r#"{"backup_root": "/b"}"#,
        "--delay",
        "1500ms",
        "--route",
        "GET",
        "/stats",
        "200",
        r#"{"chunks": 7}"#,
        "--delay",
        "1500ms",
    ]);
    let sb = Sandbox::new();
    with_base(
        &sb,
        &server,
        r#"version: 1
steps:
  - id: backup
    action: http
    with: {method: POST, url: "{base}/admin/backup", json: {include_chroma: false}}
"#,
    );
    let (mut child, id) = start(&sb);
    sb.wait_for("the POST to arrive", || !server.requests().is_empty());
    child.kill().unwrap(); // SIGKILL, while the server is still answering
    child.wait().unwrap();
    let r = sb.run(&["resume", &id]);
    assert_eq!(r.code, 3, "{r:?}");
    let url = server.url("/admin/backup");
    let last = r.stdout.lines().last().unwrap();
    assert!(
        last.starts_with(&format!("run {id} failed after ")),
        "{r:?}"
    );
    assert!(
        last.contains(&format!(
            ": step `backup` needs checking: it was interrupted and `POST {url}` is not idempotent, so running it again could repeat its effect."
        )),
        "{r:?}"
    );
    assert!(
        last.ends_with(&format!(
            "then run `runbook resume {id} --retry-step backup`"
        )),
        "{r:?}"
    );
    assert_eq!(
        server.request_lines(),
        ["POST /admin/backup"],
        "resume re-sent the POST"
    );
    let r = sb.run(&["resume", &id, "--retry-step", "backup"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        server.request_lines(),
        ["POST /admin/backup", "POST /admin/backup"]
    );

    // A read-only GET interrupted the same way is sent again without asking.
    with_base(
        &sb,
        &server,
        r#"version: 1
steps:
  - id: stats
    action: http
    with: {url: "{base}/stats", outputs: {chunks: .chunks}}
"#,
    );
    let (mut child, id) = start(&sb);
    sb.wait_for("the GET to arrive", || server.requests().len() == 3);
    child.kill().unwrap();
    child.wait().unwrap();
    let r = sb.run(&["resume", &id]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout
            .lines()
            .nth(1)
            .unwrap()
            .starts_with("  ok       stats ("),
        "{r:?}"
    );
    assert_eq!(server.request_lines()[2..], ["GET /stats", "GET /stats"]);
    assert_eq!(show_json(&sb, &id)["steps"][0]["outputs"]["chunks"], 7);
}

/// `http-check`: a read-only GET or HEAD with `http`'s expectations and outputs; the
/// plan (with `--probe`) sends it, a method that changes things is refused by
/// `validate`, and a check killed mid-request is sent again by resume.
#[test]
fn http_check_reads_probes_and_is_resent_by_resume_and_refuses_other_methods() {
    let server = HttpServer::start(&[
        "--route",
        "GET",
        "/stats",
        "200",
        r#"{"documents": 60, "chunks": 7}"#,
        "--delay",
        "1500ms",
        "--route",
        "HEAD",
        "/health",
        "200",
        r#"{"status": "ok"}"#,
    ]);
    let sb = Sandbox::new();
    with_base(
        &sb,
        &server,
        r#"version: 1
steps:
  - id: stats
    action: http-check
    with:
      url: "{base}/stats"
      expect: {status: 200, jq: [".documents >= 10"]}
      outputs: {documents: .documents}
  - id: health
    action: http-check
    with: {method: HEAD, url: "{base}/health"}
  - id: after
    action: assert
    with: {that: "steps.stats.outputs.documents == 60"}
"#,
    );
    let (stats, health) = (server.url("/stats"), server.url("/health"));
    let plan = sb.run(&["plan", "svc"]);
    assert_eq!(plan.code, 0, "{plan:?}");
    assert!(
        plan.stdout.contains(&format!(
            "  no change   stats   http-check: will GET {stats}\n"
        )),
        "{plan:?}"
    );
    assert!(server.requests().is_empty(), "the plan sent a request");
    let probed = sb.run(&["plan", "svc", "--probe"]);
    assert_eq!(probed.code, 0, "{probed:?}");
    assert!(
        probed.stdout.contains(&format!(
            "  no change   stats   http-check: probed GET {stats}: 200, expectations hold\n"
        )) && probed.stdout.contains(&format!(
            "  no change   health  http-check: probed HEAD {health}: 200, expectations hold\n"
        )),
        "{probed:?}"
    );
    assert_eq!(server.request_lines(), ["GET /stats", "HEAD /health"]);

    // Killed while the (slow) GET is answered: resume sends it again, asking no one.
    let (mut child, id) = start(&sb);
    sb.wait_for("the GET to arrive", || server.requests().len() == 3);
    child.kill().unwrap();
    child.wait().unwrap();
    let r = sb.run(&["resume", &id]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        server.request_lines(),
        [
            "GET /stats",
            "HEAD /health",
            "GET /stats",
            "GET /stats",
            "HEAD /health"
        ]
    );
    assert_eq!(show_json(&sb, &id)["steps"][0]["outputs"]["documents"], 60);

    // A check never changes anything: a POST is refused before anything runs.
    sb.write(
        "runbooks/post.yaml",
        "version: 1\nsteps:\n  - id: c\n    action: http-check\n    with: {method: POST, url: \"http://127.0.0.1:1/x\"}\n",
    );
    let r = sb.run(&["validate", "post"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.contains("runbooks/post.yaml:5:20: error: ")
            && r.stderr.contains("unknown variant `POST`, expected one of `GET`, `get`, `HEAD`, `head` (step `c`, field `steps[0].with.method`)"),
        "{r:?}"
    );
}
