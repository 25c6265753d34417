//! Adversarial cases: secrets (see mod.rs), and the values a run freezes: secrets asked
//! for again on resume and rollback, secrecy that follows the value through calls,
//! the encoded forms of a secret, unset optional params, bools, a second rollback, and
//! relative paths resumed from another directory.

use std::path::Path;

use crate::support::{HttpServer, Run, Sandbox};

fn run_id(run: &Run) -> String {
    run.stdout
        .lines()
        .find_map(|l| l.strip_prefix("run "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no run id in {run:?}"))
        .to_string()
}

fn show(sb: &Sandbox, id: &str) -> serde_json::Value {
    let r = sb.run(&["show", id, "--format", "json"]);
    assert_eq!(r.code, 0, "{r:?}");
    serde_json::from_str(&r.stdout).unwrap()
}

/// Every file below `dir` (the state dir: journal.db, its -wal and -shm, locks).
fn files_below(dir: &Path) -> Vec<(String, Vec<u8>)> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().is_file())
        .map(|e| {
            (
                e.path().display().to_string(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// Fails naming the artifact and the form when any form occurs in any artifact.
fn assert_absent(artifacts: &[(String, Vec<u8>)], forms: &[(String, String)]) {
    for (name, bytes) in artifacts {
        for (what, form) in forms {
            assert!(
                !form.is_empty() && !bytes.windows(form.len()).any(|w| w == form.as_bytes()),
                "{what} `{form}` found in {name}:\n{}",
                String::from_utf8_lossy(bytes)
            );
        }
    }
}

fn outputs_of(runs: &[(&str, &Run)]) -> Vec<(String, Vec<u8>)> {
    runs.iter()
        .flat_map(|(name, r)| {
            [
                (format!("{name} stdout"), r.stdout.clone().into_bytes()),
                (format!("{name} stderr"), r.stderr.clone().into_bytes()),
            ]
        })
        .collect()
}

// ------------------------------------------------ class 8: secrets given again

#[test]
fn every_secret_given_at_run_time_is_asked_for_again_by_resume_and_rollback_whatever_its_declaration()
 {
    let sb = Sandbox::new();
    sb.write(
        "runbooks/vault.yaml",
        r#"version: 1
params:
  token: {type: string, secret: true, default: the-default-token}
  key: {type: string, secret: true}
  spare: {type: string, secret: true, default: spare-default}
steps:
  - id: make
    action: mkdir
    with: {path: "{root}/out"}
  - id: first
    action: write-file
    with: {path: "{root}/out/first", content: "{{ token }} {{ key }}\n"}
  - id: second
    action: write-file
    with: {path: "{root}/out/second", content: "{{ token }} {{ key }} {{ spare }}\n"}
rollback:
  - id: undo
    action: write-file
    with: {path: "{root}/out/undo", content: "{{ token }} {{ key }}\n"}
"#,
    );
    sb.write("secrets.yaml", "key: Vars-Key-2b\n");
    let killed = sb
        .cmd(&[
            "run",
            "vault",
            "--set",
            "token=Given-Token-1a",
            "--vars",
            "secrets.yaml",
        ])
        .env("RUNBOOK_FAILPOINT", "before:second")
        .output()
        .unwrap();
    assert_eq!(killed.status.code(), None, "not killed");
    let id = run_id(&Run::from(killed));
    assert_eq!(sb.read("out/first"), "Given-Token-1a Vars-Key-2b\n");
    // The journal keeps the names of the secrets it was given, never their values.
    let record = show(&sb, &id);
    assert_eq!(record["secrets_given"], serde_json::json!(["token", "key"]));

    let none = sb.run(&["resume", &id]);
    assert_eq!(none.code, 2, "{none:?}");
    assert_eq!(
        none.stderr,
        format!(
            "error: secret param `token` is not stored in the journal: give it again with --set token=... or --vars FILE\n\
             secret param `key` is not stored in the journal: give it again with --set key=... or --vars FILE\n\
             (run {id} was given these 2 secrets; nothing was run)\n"
        )
    );
    // The one with a default is asked for too: its default is not what the run used.
    let one = sb.run(&["resume", &id, "--vars", "secrets.yaml"]);
    assert_eq!(one.code, 2, "{one:?}");
    assert!(
        one.stderr.contains("secret param `token` is not stored"),
        "{one:?}"
    );
    assert!(!one.stderr.contains("`key`"), "{one:?}");
    assert!(!sb.p("out/second").exists(), "a refused resume ran a step");

    let both = sb.run(&[
        "resume",
        &id,
        "--set",
        "token=Given-Token-1a",
        "--vars",
        "secrets.yaml",
    ]);
    assert_eq!(both.code, 0, "{both:?}");
    // `spare` was not given: its default is what the run used, and what resume uses.
    assert_eq!(
        sb.read("out/second"),
        "Given-Token-1a Vars-Key-2b spare-default\n"
    );

    let refused = sb.run(&["rollback", &id, "--vars", "secrets.yaml"]);
    assert_eq!(refused.code, 2, "{refused:?}");
    assert!(
        refused
            .stderr
            .contains("secret param `token` is not stored in the journal: give it again with --set token=... or --vars FILE"),
        "{refused:?}"
    );
    assert!(!sb.p("out/undo").exists());
    let rollback = sb.run(&[
        "rollback",
        &id,
        "--set",
        "token=Given-Token-1a",
        "--set",
        "key=Vars-Key-2b",
    ]);
    assert_eq!(rollback.code, 0, "{rollback:?}");
    assert_eq!(sb.read("out/undo"), "Given-Token-1a Vars-Key-2b\n");

    let mut artifacts = files_below(&sb.p("state"));
    artifacts.extend(outputs_of(&[
        ("resume", &both),
        ("rollback", &rollback),
        ("show", &sb.run(&["show", &id, "--format", "json"])),
    ]));
    assert_absent(
        &artifacts,
        &[
            ("secret".into(), "Given-Token-1a".into()),
            ("secret".into(), "Vars-Key-2b".into()),
        ],
    );
}

// ------------------------------------------------ class 20: a second rollback

#[test]
fn a_run_already_rolled_back_is_not_rolled_back_again_unless_told_to() {
    let sb = Sandbox::new();
    sb.write(
        "runbooks/undoable.yaml",
        r#"version: 1
steps:
  - id: work
    action: exec
    with: {argv: [sh, -c, "echo work >> log"]}
rollback:
  - id: undo
    action: exec
    with: {argv: [sh, -c, "echo undo >> log"]}
"#,
    );
    let run = sb.run(&["run", "undoable"]);
    assert_eq!(run.code, 0, "{run:?}");
    let id = run_id(&run);
    let first = sb.run(&["rollback", &id]);
    assert_eq!(first.code, 0, "{first:?}");
    assert_eq!(sb.read("log"), "work\nundo\n");
    let at = show(&sb, &id)["finished_at"].as_str().unwrap().to_string();

    let second = sb.run(&["rollback", &id]);
    assert_eq!(second.code, 3, "{second:?}");
    assert_eq!(
        second.stderr,
        format!(
            "error: run {id} was already rolled back at {at}; nothing was run. To run its rollback section again anyway: runbook rollback {id} --again\n"
        )
    );
    assert_eq!(sb.read("log"), "work\nundo\n", "the refused rollback ran");

    let again = sb.run(&["rollback", &id, "--again"]);
    assert_eq!(again.code, 0, "{again:?}");
    assert_eq!(sb.read("log"), "work\nundo\nundo\n");
}

// ------------------------------------------------ class 9: secrecy follows the value

#[test]
fn a_secret_passed_to_called_runbooks_is_masked_there_and_below_whatever_their_params_say() {
    const SECRET: &str = "Hunter2-sEcReT-xyz";
    let sb = Sandbox::new();
    sb.write(
        "runbooks/parent.yaml",
        r#"version: 1
params:
  token: {type: string, secret: true, required: true}
  dir: {type: path, required: true}
steps:
  - id: call
    action: runbook
    with: {name: child, params: {password: "{{ token }}", shout: "{{ token | upper }}", dir: "{{ dir }}"}}
outputs:
  said: "{{ steps.call.outputs.said }}"
rollback:
  - id: undo
    action: runbook
    with: {name: undo, params: {pw: "{{ token }}", dir: "{{ dir }}"}}
"#,
    );
    sb.write(
        "runbooks/child.yaml",
        r#"version: 1
params:
  password: {type: string, required: true}
  shout: {type: string, required: true}
  dir: {type: path, required: true}
vars:
  line: "pw={{ password }}"
  loud: "{{ shout }}"
steps:
  - id: say
    action: exec
    with: {argv: [sh, -c, 'echo "$0 $1"', "{{ line }}", "{{ loud }}"]}
  - id: keep
    action: write-file
    with: {path: "{{ dir }}/kept", content: "{{ password }}"}
  - id: deeper
    action: runbook
    with: {name: grandchild, params: {copy: "{{ password }}", dir: "{{ dir }}"}}
outputs:
  said: "{{ steps.say.outputs.stdout }}"
"#,
    );
    sb.write(
        "runbooks/grandchild.yaml",
        r#"version: 1
params:
  copy: {type: string, required: true}
  dir: {type: path, required: true}
vars:
  shown: "copy={{ copy }}"
steps:
  - id: gate
    action: exec
    with: {argv: [sh, -c, 'if [ -e "$1/fail" ]; then echo "denied $0" >&2; exit 3; fi', "{{ shown }}", "{{ dir }}"]}
"#,
    );
    sb.write(
        "runbooks/undo.yaml",
        r#"version: 1
params:
  pw: {type: string, required: true}
  dir: {type: path, required: true}
steps:
  - id: forget
    action: exec
    with: {argv: [sh, -c, 'echo "forgetting $0"; echo undone > "$1/undone"', "{{ pw }}", "{{ dir }}"]}
"#,
    );
    std::fs::create_dir(sb.p("work")).unwrap();
    sb.write("work/fail", "");
    let set = format!("token={SECRET}");
    let dir = format!("dir={}", sb.p("work").display());
    let args = ["--set", set.as_str(), "--set", dir.as_str()];
    let with = |cmd: &[&str]| -> Vec<String> {
        cmd.iter()
            .chain(args.iter())
            .map(|s| s.to_string())
            .collect()
    };
    let plan = sb.run(
        &with(&["plan", "parent", "--format", "json", "-vv"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_eq!(plan.code, 0, "{plan:?}");
    let plan_doc: serde_json::Value = serde_json::from_str(&plan.stdout).unwrap();
    let say = &plan_doc["steps"][0]["steps"][0];
    // The secret is masked where it shows; what a template made of it is masked whole.
    assert_eq!(say["args"]["argv"][3], "pw=********", "{say}");
    assert_eq!(say["args"]["argv"][4], "********", "{say}");
    let plan_text = sb.run(
        &with(&["plan", "parent"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let failed = sb.run(
        &with(&["run", "parent", "--no-rollback", "-vv"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_eq!(failed.code, 1, "{failed:?}");
    assert!(
        failed.stdout.contains("FAILED   call/deeper/gate: "),
        "{failed:?}"
    );
    assert!(failed.stdout.contains("denied copy=********"), "{failed:?}");
    // The real value reached the step that needed it.
    assert_eq!(sb.read("work/kept"), SECRET);
    let id = run_id(&failed);

    std::fs::remove_file(sb.p("work/fail")).unwrap();
    let resume = sb.run(&["resume", &id, "--set", &set, "--format", "json"]);
    assert_eq!(resume.code, 0, "{resume:?}");
    // The grandchild's var was not frozen (it held the secret): rendered again, with
    // the secret given again, it is what the step needed.
    let record = show(&sb, &id);
    assert_eq!(record["status"], "succeeded");
    let rollback = sb.run(&["rollback", &id, "--set", &set, "-vv"]);
    assert_eq!(rollback.code, 0, "{rollback:?}");
    let forgot = show(&sb, &id)["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["key"] == "undo/forget")
        .cloned()
        .unwrap();
    assert_eq!(
        forgot["outputs"]["stdout"], "forgetting ********",
        "{forgot}"
    );
    assert_eq!(sb.read("work/undone"), "undone\n");

    let show_json = sb.run(&["show", &id, "--format", "json"]);
    let show_text = sb.run(&["show", &id]);
    let mut artifacts = files_below(&sb.p("state"));
    artifacts.extend(outputs_of(&[
        ("plan json", &plan),
        ("plan", &plan_text),
        ("run -vv", &failed),
        ("resume json", &resume),
        ("rollback -vv", &rollback),
        ("show json", &show_json),
        ("show", &show_text),
    ]));
    assert_absent(
        &artifacts,
        &[
            ("the secret".into(), SECRET.into()),
            ("the secret made upper case".into(), SECRET.to_uppercase()),
        ],
    );
}

// ------------------------------------------------ class 10: encoded forms

/// Standard base64 with padding (independent of the engine's).
fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                char::from(A[((n >> (18 - 6 * i)) & 0x3f) as usize])
            } else {
                '='
            });
        }
    }
    out
}

/// Every byte that is not unreserved as `%XX` (`upper` hex or not), a space as `+`
/// when `plus`.
fn percent(s: &str, upper: bool, plus: bool) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            b' ' if plus => "+".into(),
            _ if upper => format!("%{b:02X}"),
            _ => format!("%{b:02x}"),
        })
        .collect()
}

/// The forms a secret takes on its way out, computed here independently.
fn encoded_forms(secret: &str) -> Vec<(String, String)> {
    let once = serde_json::to_string(secret).unwrap();
    let once = once[1..once.len() - 1].to_string();
    let twice = serde_json::to_string(&once).unwrap();
    let twice = twice[1..twice.len() - 1].to_string();
    vec![
        ("raw".into(), secret.into()),
        ("percent-encoded".into(), percent(secret, true, false)),
        (
            "percent-encoded, lower hex".into(),
            percent(secret, false, false),
        ),
        ("form-encoded".into(), percent(secret, true, true)),
        ("JSON-escaped".into(), once),
        ("JSON-escaped twice".into(), twice),
    ]
}

#[test]
fn a_secret_is_masked_in_its_url_json_and_base64_forms_in_everything_a_run_writes() {
    // Goes into URLs: percent-encoded there (a space, a quote, a plus, a non-ASCII
    // letter); no tab, backslash or slash, which a URL parser drops, rewrites or reads
    // as the end of the user info.
    const TOKEN: &str = "Tok en\"+\u{f6}-42QZ";
    // Goes into JSON bodies: a quote, a backslash and control characters.
    const BODY: &str = "B\\ody\"\ttab\nline-77";
    let server = HttpServer::start(&[
        "--route", "GET", "/echo", "200", "@echo", "--route", "POST", "/submit", "200", "@echo",
        "--route", "POST", "/reject", "200", "@echo",
    ]);
    let sb = Sandbox::new();
    let port = server.port;
    sb.write(
        "runbooks/enc.yaml",
        &r#"version: 1
params:
  token: {type: string, secret: true, required: true}
  body: {type: string, secret: true, required: true}
  reject: {type: bool, default: false}
steps:
  - id: query
    action: http
    with: {url: "http://127.0.0.1:PORT/echo?token={{ token }}&n=1"}
  - id: basic
    action: http
    with: {url: "http://operator:{{ token }}@127.0.0.1:PORT/echo"}
  - id: submit
    action: http
    with:
      method: POST
      url: "http://127.0.0.1:PORT/submit"
      json: {secret: "{{ body }}", token: "{{ token }}"}
      outputs: {sent: .body}
  - id: reject
    action: http
    when: reject
    with:
      method: POST
      url: "http://operator:{{ token }}@127.0.0.1:PORT/reject"
      json: {secret: "{{ body }}"}
      expect: {status: 201}
  - id: missing
    action: http
    with: {url: "http://127.0.0.1:PORT/missing/{{ token }}"}
"#
        .replace("PORT", &port.to_string()),
    );
    let sets = [format!("token={TOKEN}"), format!("body={BODY}")];
    let base: Vec<&str> = vec!["--set", &sets[0], "--set", &sets[1]];
    let cmd = |extra: &[&str]| -> Vec<String> {
        extra
            .iter()
            .chain(base.iter())
            .map(|s| s.to_string())
            .collect()
    };
    let run = |extra: &[&str]| -> Run {
        let args = cmd(extra);
        sb.run(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let plan = run(&["plan", "enc", "--format", "json", "-vv"]);
    assert_eq!(plan.code, 0, "{plan:?}");
    // The last step fails (404): the run stops there, after three that succeeded.
    let failing = run(&["run", "enc", "-vv"]);
    assert_eq!(failing.code, 1, "{failing:?}");
    assert!(
        failing
            .stdout
            .contains("FAILED   missing: GET http://127.0.0.1:"),
        "{failing:?}"
    );
    let failing_json = run(&["run", "enc", "--format", "json", "--set", "reject=true"]);
    assert_eq!(failing_json.code, 1, "{failing_json:?}");
    assert!(
        failing_json
            .stdout
            .contains("expected status 201, got 200 OK: {"),
        "{failing_json:?}"
    );

    // What went over the wire: each of these is a form the secret took.
    let requests = server.requests();
    let mut forms = encoded_forms(TOKEN);
    forms.extend(encoded_forms(BODY));
    let basic = base64(format!("operator:{TOKEN}").as_bytes());
    let mut wire_auth = false;
    for r in &requests {
        let line = format!(
            "{} {}",
            r["path"].as_str().unwrap(),
            r["query"].as_str().unwrap_or_default()
        );
        if let (Some(from), Some(to)) = (line.find("Tok"), line.find("42QZ")) {
            // The secret as the URL parser encoded it.
            forms.push(("as sent in the URL".into(), line[from..to + 4].to_string()));
        }
        if let Some(auth) = r["headers"]["authorization"].as_str() {
            assert_eq!(
                auth,
                format!("Basic {basic}"),
                "the secret reached the server"
            );
            wire_auth = true;
        }
        if let Some(body) = r["body"].as_str().filter(|b| !b.is_empty()) {
            assert!(body.contains(&encoded_forms(BODY)[4].1), "{body}");
        }
    }
    assert!(wire_auth, "no basic-auth request: {requests:?}");
    forms.push(("base64 of user:secret".into(), basic.clone()));
    // The part of it that only the secret's bytes decide ("operator:" is 9 bytes, so
    // the secret starts on a 3-byte boundary: character 12 on).
    let secret_chars = (TOKEN.len() * 8) / 6;
    forms.push((
        "base64 of the secret".into(),
        basic[12..12 + secret_chars].to_string(),
    ));

    let id = run_id(&failing);
    let id_json = failing_json
        .stdout
        .lines()
        .next()
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .and_then(|v| v["run_id"].as_str().map(str::to_string))
        .unwrap();
    let record = show(&sb, &id);
    // The secret was masked, not dropped: the outputs still say what they held.
    let sent = record["steps"][2]["outputs"]["sent"].as_str().unwrap();
    assert_eq!(sent, r#"{"secret":"********","token":"********"}"#);
    let auth = record["steps"][1]["outputs"]["body"]["headers"]["authorization"]
        .as_str()
        .unwrap();
    assert!(
        auth.starts_with("Basic ") && auth.contains("********"),
        "{auth}"
    );
    let mut artifacts = files_below(&sb.p("state"));
    artifacts.extend(outputs_of(&[
        ("plan json", &plan),
        ("run -vv", &failing),
        ("run json", &failing_json),
        ("show json", &sb.run(&["show", &id, "--format", "json"])),
        (
            "show json 2",
            &sb.run(&["show", &id_json, "--format", "json"]),
        ),
        ("show", &sb.run(&["show", &id])),
        ("runs json", &sb.run(&["runs", "--format", "json"])),
    ]));
    assert_absent(&artifacts, &forms);
}

/// A secret too short to have a base64 fragment of its own (4 bytes) is still masked
/// in the basic-auth header the echo server sends back: the whole base64 word goes.
#[test]
fn a_four_byte_secret_is_masked_in_its_basic_auth_header_too() {
    const PW: &str = "pw12";
    let server = HttpServer::start(&["--route", "GET", "/echo", "200", "@echo"]);
    let sb = Sandbox::new();
    sb.write(
        "runbooks/short.yaml",
        &format!(
            "version: 1\nparams:\n  pw: {{type: string, secret: true, required: true}}\nsteps:\n  - id: basic\n    action: http\n    with: {{url: \"http://operator:{{{{ pw }}}}@127.0.0.1:{}/echo\"}}\n",
            server.port
        ),
    );
    let set = format!("pw={PW}");
    let r = sb.run(&["run", "short", "--set", &set, "-vv"]);
    assert_eq!(r.code, 0, "{r:?}");
    let json = sb.run(&["run", "short", "--set", &set, "--format", "json"]);
    assert_eq!(json.code, 0, "{json:?}");
    let basic = base64(format!("operator:{PW}").as_bytes());
    let wire = server.requests();
    assert_eq!(
        wire[0]["headers"]["authorization"],
        format!("Basic {basic}"),
        "not the header the server saw"
    );
    let id = run_id(&r);
    let record = show(&sb, &id);
    let auth = record["steps"][0]["outputs"]["body"]["headers"]["authorization"]
        .as_str()
        .unwrap();
    assert_eq!(auth, "Basic ********");
    let mut artifacts = files_below(&sb.p("state"));
    artifacts.extend(outputs_of(&[
        ("run -vv", &r),
        ("run json", &json),
        ("show json", &sb.run(&["show", &id, "--format", "json"])),
    ]));
    assert_absent(
        &artifacts,
        &[
            ("the secret".to_string(), PW.to_string()),
            ("base64 of user:secret".to_string(), basic),
        ],
    );
}

// ------------------------------------------------ class 14: unset optional params

#[test]
fn an_unset_optional_param_is_undefined_never_the_text_none() {
    let sb = Sandbox::new();
    sb.write(
        "runbooks/opt.yaml",
        r#"version: 1
params:
  opt: {type: string}
  dir: {type: path, required: true}
vars:
  label: "{{ opt if opt is defined else 'none-given' }}"
steps:
  - id: guarded
    action: write-file
    when: opt is defined
    with: {path: "{{ dir }}/opt-{{ opt }}.txt", content: x}
  - id: label
    action: write-file
    with: {path: "{{ dir }}/label-{{ label }}.txt", content: x}
outputs:
  given: "{{ opt is defined }}"
"#,
    );
    std::fs::create_dir(sb.p("work")).unwrap();
    let plan = sb.run(&["plan", "opt", "--set", "dir=work"]);
    assert_eq!(plan.code, 0, "{plan:?}");
    assert!(
        plan.stdout
            .contains("  skipped     guarded  write-file: when `opt is defined` is false\n"),
        "{plan:?}"
    );
    let run = sb.run(&["run", "opt", "--set", "dir=work", "--format", "json"]);
    assert_eq!(run.code, 0, "{run:?}");
    let names: Vec<String> = std::fs::read_dir(sb.p("work"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["label-none-given.txt"]);
    assert!(
        run.stdout.contains(r#""outputs":{"given":false}"#),
        "{run:?}"
    );
    let given = sb.run(&["run", "opt", "--set", "dir=work", "--set", "opt=x"]);
    assert_eq!(given.code, 0, "{given:?}");
    assert!(sb.p("work/opt-x.txt").exists());

    // Used without a guard: a clear error in the plan and the run, naming the param.
    let told = "param `opt` is not set (it is optional and has no default): give it with --set opt=VALUE or in a --vars FILE, or test it with `opt is defined`";
    sb.write(
        "runbooks/bare.yaml",
        "version: 1\nparams:\n  opt: {type: string}\nsteps:\n  - id: use\n    action: write-file\n    with: {path: \"opt-{{ opt }}.txt\", content: x}\n",
    );
    for cmd in ["plan", "run"] {
        let r = sb.run(&[cmd, "bare"]);
        assert_eq!(r.code, 3, "{r:?}");
        assert!(r.stdout.contains(told) || r.stderr.contains(told), "{r:?}");
    }
    // In a var, a `when`, an output, and a called runbook's param.
    sb.write(
        "runbooks/in-var.yaml",
        "version: 1\nparams:\n  opt: {type: string}\nvars:\n  v: \"{{ opt }}-x\"\nsteps:\n  - id: a\n    action: assert\n    with: {that: \"true\"}\n",
    );
    let r = sb.run(&["plan", "in-var"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert_eq!(r.stderr, format!("error: var `v`: {told}\n"));
    sb.write(
        "runbooks/in-when.yaml",
        "version: 1\nparams:\n  opt: {type: string}\nsteps:\n  - id: a\n    action: assert\n    when: opt == 'x'\n    with: {that: \"true\"}\n",
    );
    let r = sb.run(&["run", "in-when"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(r.stderr.contains(&format!("`when`: {told}")), "{r:?}");
    sb.write(
        "runbooks/in-output.yaml",
        "version: 1\nparams:\n  opt: {type: string}\nsteps:\n  - id: a\n    action: assert\n    with: {that: \"true\"}\noutputs:\n  o: \"{{ opt }}\"\n",
    );
    let r = sb.run(&["run", "in-output"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.contains(&format!("output `o`: {told}")), "{r:?}");
    sb.write(
        "runbooks/callee.yaml",
        "version: 1\nparams:\n  x: {type: string}\nsteps:\n  - id: use\n    action: assert\n    with: {that: \"x == 'y'\"}\n",
    );
    sb.write(
        "runbooks/caller.yaml",
        "version: 1\nsteps:\n  - id: call\n    action: runbook\n    with: {name: callee}\n",
    );
    let r = sb.run(&["plan", "caller"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        r.stdout.contains("param `x` is not set (it is optional and has no default): give it in the call's `params` or in a --vars FILE, or test it with `x is defined`"),
        "{r:?}"
    );
}

// ------------------------------------------------ class 20: bools

#[test]
fn bool_params_render_as_true_and_false_as_the_runbook_writes_them() {
    let sb = Sandbox::new();
    sb.write(
        "runbooks/flags.yaml",
        r#"version: 1
params:
  enabled: {type: bool, default: false}
  verbose: {type: bool, default: true}
steps:
  - id: write
    action: write-file
    with: {path: "flags-{{ enabled }}.txt", content: "{{ enabled }} {{ verbose }} {{ not enabled }} {{ enabled | string }} {{ [enabled, verbose] | tojson }}\n"}
"#,
    );
    sb.write("deploy.yaml", "verbose: false\n");
    let r = sb.run(&[
        "run",
        "flags",
        "--set",
        "enabled=true",
        "--vars",
        "deploy.yaml",
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        sb.read("flags-true.txt"),
        "true false false true [true, false]\n"
    );
}

// ------------------------------------------------ class 5: relative paths

#[test]
fn a_run_with_relative_paths_resumed_from_another_directory_acts_where_it_began() {
    let sb = Sandbox::new();
    let a = sb.p("a");
    let b = sb.p("b");
    std::fs::create_dir_all(a.join("scratch/junk")).unwrap();
    std::fs::create_dir_all(b.join("scratch/junk")).unwrap();
    sb.write(
        "a/runbooks/rel.yaml",
        r#"version: 1
params:
  out: {type: path, required: true}
  logs: {type: path, default: logs}
roots: ["{{ out }}", "scratch"]
steps:
  - id: make
    action: mkdir
    with: {path: "{{ out }}"}
  - id: first
    action: write-file
    with: {path: "{{ out }}/first.txt", content: one}
  - id: literal
    action: write-file
    with: {path: literal.txt, content: lit}
  - id: clean
    action: remove
    with: {path: scratch/junk}
  - id: logs
    action: mkdir
    with: {path: "{{ logs }}"}
  - id: second
    action: write-file
    with: {path: "{{ out }}/second.txt", content: two}
"#,
    );
    sb.write("a/deploy.yaml", "out: data\n");
    let plan = sb
        .cmd(&["plan", "rel", "--vars", "deploy.yaml", "--format", "json"])
        .current_dir(&a)
        .output()
        .unwrap();
    let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    let a_text = a.display().to_string();
    assert_eq!(plan["params"]["out"], format!("{a_text}/data"));
    assert_eq!(plan["params"]["logs"], format!("{a_text}/logs"));
    assert_eq!(
        plan["roots"],
        serde_json::json!([format!("{a_text}/data"), format!("{a_text}/scratch")])
    );
    let killed = sb
        .cmd(&["run", "rel", "--vars", "deploy.yaml"])
        .current_dir(&a)
        .env("RUNBOOK_FAILPOINT", "before:literal")
        .output()
        .unwrap();
    assert_eq!(killed.status.code(), None, "not killed");
    let id = run_id(&Run::from(killed));
    assert_eq!(sb.read("a/data/first.txt"), "one");
    let before_b = crate::support::tree_digest(&b);

    let resume = sb.cmd(&["resume", &id]).current_dir(&b).output().unwrap();
    let resume = Run::from(resume);
    assert_eq!(resume.code, 0, "{resume:?}");
    assert!(
        resume.stderr.contains(&format!(
            "note: working in {a_text}, where run {id} was started"
        )),
        "{resume:?}"
    );
    assert_eq!(sb.read("a/literal.txt"), "lit");
    assert_eq!(sb.read("a/data/second.txt"), "two");
    assert!(a.join("logs").is_dir());
    assert!(!a.join("scratch/junk").exists());
    assert_eq!(
        crate::support::tree_digest(&b),
        before_b,
        "the resume wrote below the directory it was typed in"
    );
    let record = show(&sb, &id);
    assert_eq!(record["cwd"], a_text);
    assert_eq!(record["params"]["out"], format!("{a_text}/data"));
}
