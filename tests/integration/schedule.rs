//! The shipped schedule (`schedule/systemd/*`, `schedule/crontab`): the units pass
//! `systemd-analyze verify` (a parser check where it is not installed), the timers'
//! calendars parse, the crontab lines are five valid cron fields and a command, and —
//! the point — every scheduled command, run through the built binary as `plan` against
//! a real AtoCore sandbox, names a real runbook with valid params and plans clean.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value as Json, json};

use crate::support::{Run, ServiceGuard, free_port};

const RUNBOOK: &str = env!("CARGO_BIN_EXE_runbook");
const TESTKIT: &str = env!("CARGO_BIN_EXE_runbook-testkit");
const RUNBOOKS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/runbooks");
const SCHEDULE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/schedule");

/// Where the units and crontab say things are installed.
const INSTALLED_BIN: &str = "/usr/local/bin/runbook";
const INSTALLED_RUNBOOKS: &str = "/usr/local/share/runbook/runbooks";
const STATE_DIR: &str = "/var/lib/runbook";
const DEPLOYMENT_VARS: &str = "/etc/runbook/atocore.yaml";

/// Each scheduled job: its unit stem, the runbook command after `runbook`, the timer's
/// calendar (normalized) and the crontab schedule.
const JOBS: &[(&str, &str, &str, &str)] = &[
    (
        "atocore-backup-daily",
        "run atocore/backup --vars /etc/runbook/atocore.yaml --yes --format json",
        "*-*-* 03:00:00",
        "0 3 * * *",
    ),
    (
        "atocore-backup-weekly",
        "run atocore/backup --set include_chroma=true --vars /etc/runbook/atocore.yaml --yes --format json",
        "Sun *-*-* 03:30:00",
        "30 3 * * 0",
    ),
    (
        "atocore-offsite",
        "run atocore/offsite --set stamp=latest --vars /etc/runbook/atocore.yaml --yes --format json",
        "*-*-* 03:45:00",
        "45 3 * * *",
    ),
    (
        "atocore-retention",
        "run atocore/retention --vars /etc/runbook/atocore.yaml --yes --format json",
        "*-*-* 04:00:00",
        "0 4 * * *",
    ),
    (
        "atocore-offsite-check",
        "run atocore/offsite-check --vars /etc/runbook/atocore.yaml --yes --format json",
        "Sun *-*-* 04:30:00",
        "30 4 * * 0",
    ),
    (
        "atocore-drill",
        "run atocore/drill --set stamp=latest --vars /etc/runbook/atocore.yaml --yes --format json",
        "*-01,04,07,10-01 05:00:00",
        "0 5 1 1,4,7,10 *",
    ),
];

const FAILED_TEMPLATE: &str = "runbook-failed@.service";

// ------------------------------------------------------------------ unit files

/// A unit file: `(section, key, value)` in file order (keys repeat, e.g. `After=`).
struct Unit {
    entries: Vec<(String, String, String)>,
}

impl Unit {
    fn read(path: &Path) -> Unit {
        let text = std::fs::read_to_string(path).unwrap();
        let mut section = String::new();
        let mut entries = Vec::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.to_string();
                continue;
            }
            assert!(
                !line.ends_with('\\'),
                "{}: no continuation lines",
                path.display()
            );
            let (key, value) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("{}: not key=value: {line}", path.display()));
            assert!(
                !section.is_empty(),
                "{}: {line} before a section",
                path.display()
            );
            entries.push((section.clone(), key.trim().into(), value.trim().into()));
        }
        Unit { entries }
    }

    fn all(&self, section: &str, key: &str) -> Vec<&str> {
        self.entries
            .iter()
            .filter(|(s, k, _)| s == section && k == key)
            .map(|(_, _, v)| v.as_str())
            .collect()
    }

    /// The one value of `key`.
    fn one(&self, section: &str, key: &str) -> &str {
        match self.all(section, key).as_slice() {
            [v] => v,
            other => panic!("[{section}] {key}: {other:?}"),
        }
    }
}

fn unit_files() -> BTreeMap<String, PathBuf> {
    std::fs::read_dir(Path::new(SCHEDULE).join("systemd"))
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            (
                path.file_name().unwrap().to_str().unwrap().to_string(),
                path,
            )
        })
        .collect()
}

/// A command line of a unit or the crontab as argv: plain words, nothing a shell would
/// interpret (so the same words run with or without one).
fn argv(command: &str) -> Vec<String> {
    for c in [
        '\'', '"', '|', ';', '&', '$', '<', '>', '`', '\\', '%', '*', '(', ')',
    ] {
        assert!(!command.contains(c), "{c:?} in {command:?}: not plain argv");
    }
    command.split_whitespace().map(String::from).collect()
}

fn systemd_analyze(args: &[&str]) -> Option<Output> {
    Command::new("systemd-analyze")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn the_units_are_the_jobs_the_procedure_schedules_and_report_failure() {
    let files = unit_files();
    let mut expected: BTreeSet<String> = JOBS
        .iter()
        .flat_map(|(stem, ..)| [format!("{stem}.service"), format!("{stem}.timer")])
        .collect();
    expected.insert(FAILED_TEMPLATE.into());
    assert_eq!(files.keys().cloned().collect::<BTreeSet<_>>(), expected);

    for (stem, command, calendar, _) in JOBS {
        let service = Unit::read(&files[&format!("{stem}.service")]);
        assert_eq!(
            service.one("Unit", "OnFailure"),
            "runbook-failed@%n.service"
        );
        assert_eq!(service.one("Service", "Type"), "oneshot");
        assert_eq!(
            service.all("Service", "Environment"),
            [
                format!("RUNBOOK_PATH={INSTALLED_RUNBOOKS}"),
                format!("RUNBOOK_STATE_DIR={STATE_DIR}")
            ]
        );
        assert_eq!(service.one("Service", "StateDirectory"), "runbook");
        assert_eq!(service.one("Service", "StandardOutput"), "journal");
        assert_eq!(
            service.one("Service", "ExecStart"),
            format!("{INSTALLED_BIN} {command}")
        );
        let words = argv(service.one("Service", "ExecStart"));
        assert_eq!(words.iter().filter(|w| *w == "--vars").count(), 1);
        assert!(words.windows(2).any(|w| w == ["--vars", DEPLOYMENT_VARS]));
        assert!(words.windows(2).any(|w| w == ["--format", "json"]));
        assert!(words.contains(&"--yes".to_string()));

        let timer = Unit::read(&files[&format!("{stem}.timer")]);
        assert_eq!(timer.one("Timer", "OnCalendar"), *calendar);
        assert_eq!(timer.one("Timer", "Persistent"), "true");
        assert_eq!(timer.one("Install", "WantedBy"), "timers.target");
    }
    // Runs that start together (Persistent= at boot) queue behind each other instead of
    // being refused by a held lock.
    let after = |stem: &str| -> Vec<String> {
        Unit::read(&files[&format!("{stem}.service")])
            .all("Unit", "After")
            .iter()
            .flat_map(|v| v.split_whitespace().map(String::from))
            .filter(|u| u.starts_with("atocore-"))
            .collect()
    };
    assert!(after("atocore-backup-daily").is_empty());
    assert_eq!(
        after("atocore-backup-weekly"),
        ["atocore-backup-daily.service"]
    );
    assert_eq!(
        after("atocore-offsite"),
        [
            "atocore-backup-daily.service",
            "atocore-backup-weekly.service"
        ]
    );
    assert_eq!(
        after("atocore-retention"),
        [
            "atocore-backup-daily.service",
            "atocore-backup-weekly.service",
            "atocore-offsite.service"
        ]
    );
    assert_eq!(
        after("atocore-offsite-check"),
        [
            "atocore-backup-daily.service",
            "atocore-backup-weekly.service",
            "atocore-offsite.service",
            "atocore-retention.service"
        ]
    );
    assert_eq!(
        after("atocore-drill"),
        [
            "atocore-backup-daily.service",
            "atocore-backup-weekly.service",
            "atocore-offsite.service",
            "atocore-retention.service",
            "atocore-offsite-check.service"
        ]
    );

    // The failure handler runs a real program, with the failed unit's name.
    let failed = Unit::read(&files[FAILED_TEMPLATE]);
    assert_eq!(failed.one("Service", "Type"), "oneshot");
    let exec = failed.one("Service", "ExecStart");
    assert!(exec.starts_with("/usr/bin/logger "), "{exec}");
    assert!(exec.contains("%i failed"), "{exec}");
}

#[test]
fn the_units_pass_systemd_analyze_verify_and_their_calendars_parse() {
    let files = unit_files();
    let Some(version) = systemd_analyze(&["--version"]).filter(|o| o.status.success()) else {
        // The parser check of the test above is all there is; the calendars at least
        // name something.
        eprintln!("systemd-analyze is not installed: verify and calendar checks skipped");
        for (stem, ..) in JOBS {
            let timer = Unit::read(&files[&format!("{stem}.timer")]);
            assert!(!timer.one("Timer", "OnCalendar").is_empty());
        }
        return;
    };
    eprintln!("{}", text(&version.stdout).lines().next().unwrap_or(""));

    // verify checks that ExecStart's program exists: the copies run the built binary.
    let dir = tempfile::tempdir().unwrap();
    let mut copies = Vec::new();
    for (name, path) in &files {
        let original = std::fs::read_to_string(path).unwrap();
        let from = format!("ExecStart={INSTALLED_BIN} ");
        let copy = original.replace(&from, &format!("ExecStart={RUNBOOK} "));
        if name.starts_with("atocore-") && name.ends_with(".service") {
            assert_ne!(
                copy, original,
                "{name}: ExecStart does not run {INSTALLED_BIN}"
            );
        }
        let to = dir.path().join(name);
        std::fs::write(&to, copy).unwrap();
        copies.push(to);
    }
    let ours = |line: &str| {
        line.contains(dir.path().to_str().unwrap())
            || line.contains("atocore-")
            || line.contains("runbook-failed@")
    };
    let mut args = vec!["verify".to_string()];
    args.extend(copies.iter().map(|p| p.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = systemd_analyze(&args).unwrap();
    let stderr = text(&out.stderr);
    let complaints: Vec<&str> = stderr.lines().filter(|l| ours(l)).collect();
    assert!(complaints.is_empty(), "verify: {complaints:#?}\n{stderr}");
    assert_eq!(out.status.code(), Some(0), "verify: {stderr}");

    // The check is live: a unit with an unknown key and a missing program is reported.
    let broken = dir.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    let daily = broken.join("atocore-backup-daily.service");
    let text_of = std::fs::read_to_string(dir.path().join("atocore-backup-daily.service")).unwrap();
    std::fs::write(
        &daily,
        text_of
            .replace("Type=oneshot", "Typo=oneshot")
            .replace(RUNBOOK, "/nonexistent/runbook"),
    )
    .unwrap();
    std::fs::copy(
        dir.path().join(FAILED_TEMPLATE),
        broken.join(FAILED_TEMPLATE),
    )
    .unwrap();
    let out = systemd_analyze(&["verify", daily.to_str().unwrap()]).unwrap();
    let stderr = text(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("Unknown key 'Typo'"), "{stderr}");
    assert!(stderr.contains("/nonexistent/runbook"), "{stderr}");

    for (stem, _, calendar, _) in JOBS {
        let timer = Unit::read(&files[&format!("{stem}.timer")]);
        let spec = timer.one("Timer", "OnCalendar");
        let out = systemd_analyze(&["calendar", spec]).unwrap();
        let stdout = text(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{spec}: {}", text(&out.stderr));
        assert!(
            stdout.contains(&format!("Normalized form: {calendar}\n")),
            "{spec}: {stdout}"
        );
        assert!(stdout.contains("Next elapse: "), "{spec}: {stdout}");
    }
    let out = systemd_analyze(&["calendar", "*-13-01 05:00:00"]).unwrap();
    assert_ne!(out.status.code(), Some(0), "a bad calendar passes");
}

// ------------------------------------------------------------------- crontab

/// The crontab: its `NAME=value` lines and its entries (five fields, the command).
struct Crontab {
    env: BTreeMap<String, String>,
    entries: Vec<([String; 5], String)>,
}

impl Crontab {
    fn read() -> Crontab {
        let text = std::fs::read_to_string(Path::new(SCHEDULE).join("crontab")).unwrap();
        let mut env = BTreeMap::new();
        let mut entries = Vec::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let first = line.split_whitespace().next().unwrap();
            if let Some((name, value)) = first.split_once('=')
                && name.chars().all(|c| c.is_ascii_uppercase() || c == '_')
            {
                assert_eq!(first, line, "an env line is NAME=value: {line}");
                env.insert(name.to_string(), value.to_string());
                continue;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            assert!(words.len() > 5, "no command: {line}");
            let fields: [String; 5] = std::array::from_fn(|i| words[i].to_string());
            for (field, (lo, hi)) in fields.iter().zip(CRON_RANGES) {
                assert!(
                    cron_field_ok(field, lo, hi),
                    "field {field:?} ({lo}-{hi}): {line}"
                );
            }
            entries.push((fields, words[5..].join(" ")));
        }
        Crontab { env, entries }
    }
}

/// minute, hour, day of month, month, day of week (0 and 7 are Sunday).
const CRON_RANGES: [(u32, u32); 5] = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)];

/// `*`, `N`, `N-M`, a list of those, each with an optional `/STEP`.
fn cron_field_ok(field: &str, lo: u32, hi: u32) -> bool {
    let num = |s: &str| {
        s.parse::<u32>()
            .ok()
            .filter(|n| (lo..=hi).contains(n) && !s.starts_with('+'))
    };
    field.split(',').all(|item| {
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => (r, Some(s)),
            None => (item, None),
        };
        let range_ok = range == "*"
            || num(range).is_some()
            || range
                .split_once('-')
                .is_some_and(|(a, b)| matches!((num(a), num(b)), (Some(a), Some(b)) if a <= b));
        let step_ok = step.is_none_or(|s| s.parse::<u32>().is_ok_and(|n| n >= 1 && n <= hi));
        range_ok && step_ok
    })
}

#[test]
fn cron_fields_are_checked() {
    for (field, lo, hi) in [
        ("*", 0, 59),
        ("0", 0, 59),
        ("59", 0, 59),
        ("1-5", 0, 7),
        ("1,4,7,10", 1, 12),
        ("*/15", 0, 59),
        ("0-30/5,45", 0, 59),
    ] {
        assert!(cron_field_ok(field, lo, hi), "{field}");
    }
    for (field, lo, hi) in [
        ("60", 0, 59),
        ("24", 0, 23),
        ("0", 1, 31),
        ("13", 1, 12),
        ("5-1", 0, 59),
        ("*/0", 0, 59),
        ("", 0, 59),
        ("1,", 0, 59),
        ("a", 0, 59),
        ("-1", 0, 59),
        ("+5", 0, 59),
    ] {
        assert!(!cron_field_ok(field, lo, hi), "{field}");
    }
}

#[test]
fn the_crontab_runs_the_same_commands_as_the_timers() {
    let cron = Crontab::read();
    assert_eq!(
        cron.env,
        BTreeMap::from([
            ("MAILTO".to_string(), "root".to_string()),
            ("RUNBOOK_PATH".into(), INSTALLED_RUNBOOKS.into()),
            ("RUNBOOK_STATE_DIR".into(), STATE_DIR.into()),
        ])
    );
    let got: Vec<(String, String)> = cron
        .entries
        .iter()
        .map(|(fields, command)| (fields.join(" "), command.clone()))
        .collect();
    let want: Vec<(String, String)> = JOBS
        .iter()
        .map(|(_, command, _, schedule)| {
            (schedule.to_string(), format!("{INSTALLED_BIN} {command}"))
        })
        .collect();
    assert_eq!(got, want);
    // The procedure's retention line.
    assert!(
        got.iter()
            .any(|(s, c)| s == "0 4 * * *" && c.contains(" atocore/retention "))
    );
    for (_, command) in &got {
        argv(command);
    }
}

// ------------------------------------------- every scheduled command, planned

/// `runbook --path <repo>/runbooks ARGS` in `dir`, the journal in `dir/state`.
fn runbook(dir: &Path, args: &[String]) -> Run {
    let mut c = Command::new(RUNBOOK);
    c.arg("--path")
        .arg(RUNBOOKS)
        .args(args)
        .current_dir(dir)
        .env("RUNBOOK_STATE_DIR", dir.join("state"))
        .env_remove("RUNBOOK_PATH")
        .stdin(Stdio::null());
    for var in ["http_proxy", "https_proxy", "all_proxy"] {
        c.env_remove(var).env_remove(var.to_ascii_uppercase());
    }
    c.output().expect("run runbook").into()
}

/// `atocore/service` to `state` on the sandbox whose vars file is `vars`.
fn service(dir: &Path, vars: &str, state: &str) -> Run {
    let state = format!("state={state}");
    runbook(
        dir,
        &strings(&[
            "run",
            "atocore/service",
            "--vars",
            vars,
            "--set",
            &state,
            "--yes",
            "--format",
            "json",
        ]),
    )
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn snapshot_names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir.join("srv/storage/atocore/backups/snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

/// The scheduled command as the test runs it: `run` -> `plan`, the deployment vars file
/// -> the sandbox's (and the drill values the deployment file carries).
fn as_plan(words: &[String], vars: &[&Path]) -> Vec<String> {
    assert_eq!(words[0], INSTALLED_BIN, "{words:?}");
    assert_eq!(words[1], "run", "{words:?}");
    let mut out = vec!["plan".to_string()];
    let mut rest = words[2..].iter();
    while let Some(w) = rest.next() {
        if w == "--vars" {
            assert_eq!(rest.next().unwrap(), DEPLOYMENT_VARS, "{words:?}");
            for v in vars {
                out.push("--vars".into());
                out.push(v.display().to_string());
            }
        } else {
            out.push(w.clone());
        }
    }
    out
}

#[test]
fn every_scheduled_command_plans_clean_against_an_atocore_sandbox() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let made = Command::new(TESTKIT)
        .args(["atocore-sandbox", d.to_str().unwrap(), "--port", "0"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", text(&made.stderr));
    let pidfile = d.join("run/atocore.pid");
    let _guard = ServiceGuard(pidfile.clone());
    let sandbox_vars = d.join("sandbox.yaml");

    // The drill's deployment values (dalidou.yaml has them; the sandbox does not): a
    // scratch stand-in instead of the real service.
    let drill_dir = d.join("drill");
    let drill_addr = format!("127.0.0.1:{}", free_port());
    let drill_vars = d.join("drill.yaml");
    let drill = json!({
        "drill_dir": drill_dir,
        "drill_addr": drill_addr,
        "drill_service_argv": [TESTKIT, "atocore-standin", "--root", drill_dir.join("atocore"), "--listen", drill_addr],
    });
    std::fs::write(&drill_vars, serde_yaml::to_string(&drill).unwrap()).unwrap();
    // The off-site job plans against a real off-site host (its plan lists the remote).
    let host = crate::support::OffsiteHost::start();
    let key = Command::new(TESTKIT)
        .args(["age-keygen", d.join("age.key").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(key.status.success(), "{key:?}");
    let offsite_vars = d.join("offsite.yaml");
    std::fs::write(
        &offsite_vars,
        format!(
            "{}age_recipients: [\"{}\"]\n",
            host.vars_yaml(),
            text(&key.stdout).trim()
        ),
    )
    .unwrap();
    let keys = |path: &Path| -> BTreeSet<String> {
        let map: serde_yaml::Mapping =
            serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        map.keys()
            .map(|k| k.as_str().unwrap().to_string())
            .collect()
    };
    let dalidou = keys(&Path::new(RUNBOOKS).join("atocore/env/dalidou.yaml"));
    for key in keys(&drill_vars) {
        assert!(dalidou.contains(&key), "{key}: not in the deployment file");
        assert!(
            !keys(&sandbox_vars).contains(&key),
            "{key}: the sandbox has it"
        );
    }

    // The service the runbooks check, and one snapshot with the vector store for
    // retention and the drill.
    let vars = sandbox_vars.display().to_string();
    let start = service(d, &vars, "started");
    assert_eq!(start.code, 0, "{start:?}");
    assert!(runbook::actions::daemon::running(&pidfile).is_some());
    let backup = runbook(
        d,
        &strings(&[
            "run",
            "atocore/backup",
            "--vars",
            &vars,
            "--set",
            "include_chroma=true",
            "--yes",
            "--format",
            "json",
        ]),
    );
    assert_eq!(backup.code, 0, "{backup:?}");
    let last: Json = serde_json::from_str(backup.stdout.lines().last().unwrap()).unwrap();
    let stamp = last["outputs"]["stamp"].as_str().unwrap().to_string();
    assert_eq!(snapshot_names(d), BTreeSet::from([stamp.clone()]));
    // A backup planned in the same second would name the same snapshot, and be refused.
    let deadline = Instant::now() + Duration::from_secs(2);
    while chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string() <= stamp {
        assert!(Instant::now() < deadline, "the clock does not move");
        std::thread::sleep(Duration::from_millis(10));
    }

    // Each job's command twice: the unit's ExecStart and the crontab line (in JOBS order,
    // checked above).
    let files = unit_files();
    let mut commands: Vec<(String, &str, Vec<String>)> = Vec::new();
    for (stem, ..) in JOBS {
        let unit = Unit::read(&files[&format!("{stem}.service")]);
        commands.push((
            format!("{stem}.service"),
            stem,
            argv(unit.one("Service", "ExecStart")),
        ));
    }
    let cron = Crontab::read().entries;
    assert_eq!(cron.len(), JOBS.len());
    for ((fields, command), (stem, ..)) in cron.iter().zip(JOBS) {
        commands.push((format!("crontab {}", fields.join(" ")), stem, argv(command)));
    }

    // The off-site check plans against a repository that holds a snapshot: it is
    // planned after the others, once the snapshot has been shipped for real.
    let (checks, others): (Vec<_>, Vec<_>) = commands
        .iter()
        .partition(|(_, stem, _)| *stem == "atocore-offsite-check");
    assert_eq!(checks.len(), 2);
    let mut planned = BTreeMap::<String, usize>::new();
    let mut plan_of = |source: &str, words: &[String]| -> (String, Json) {
        let args = as_plan(words, &[&sandbox_vars, &drill_vars, &offsite_vars]);
        let r = runbook(d, &args);
        assert_eq!(r.code, 0, "{source}: {args:?}\n{r:?}");
        let plan: Json =
            serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{source}: {e}\n{r:?}"));
        assert_eq!(plan["ok"], true, "{source}");
        assert_eq!(plan["summary"]["would_fail"], 0, "{source}");
        let name = plan["runbook"].as_str().unwrap().to_string();
        assert_eq!(
            plan["path"].as_str().unwrap(),
            format!("{RUNBOOKS}/{name}.yaml"),
            "{source}"
        );
        *planned.entry(name.clone()).or_default() += 1;
        (name, plan)
    };
    for (source, stem, words) in &others {
        let (name, plan) = plan_of(source, words);
        match (*stem, name.as_str()) {
            ("atocore-backup-daily", "atocore/backup") => {
                assert_eq!(plan["params"]["include_chroma"], false, "{source}")
            }
            ("atocore-backup-weekly", "atocore/backup") => {
                assert_eq!(plan["params"]["include_chroma"], true, "{source}")
            }
            ("atocore-retention", "atocore/retention") => {}
            ("atocore-offsite", "atocore/offsite") => {
                assert_eq!(plan["vars"]["resolved"], stamp.as_str(), "{source}");
                let push = &plan["steps"][1];
                assert_eq!(
                    (push["id"].as_str(), push["verdict"].as_str()),
                    (Some("push"), Some("will-change")),
                    "{source}"
                );
            }
            ("atocore-drill", "atocore/drill") => {
                assert_eq!(plan["params"]["stamp"], "latest", "{source}");
                assert_eq!(plan["vars"]["resolved"], stamp.as_str(), "{source}");
                assert_eq!(
                    plan["params"]["drill_addr"],
                    drill_addr.as_str(),
                    "{source}"
                );
            }
            other => panic!("{source}: unexpected {other:?}"),
        }
    }
    // Plans write nothing: no new or pruned snapshot, no scratch copy, nothing off-site.
    assert_eq!(snapshot_names(d), BTreeSet::from([stamp.clone()]));
    assert_eq!(
        std::fs::read_dir(&host.repo_dir).unwrap().count(),
        0,
        "a plan wrote off-site"
    );
    assert!(!drill_dir.exists());

    // The snapshot shipped for real, then the check planned: it would have the remote
    // hash the default subset (10%, as the command sets none) of the one snapshot, with
    // the key this host keeps (no identity), and it writes nothing there.
    let shipped = runbook(
        d,
        &strings(&[
            "run",
            "atocore/offsite",
            "--vars",
            &vars,
            "--vars",
            offsite_vars.to_str().unwrap(),
            "--yes",
            "--format",
            "json",
        ]),
    );
    assert_eq!(shipped.code, 0, "{shipped:?}");
    let remote = crate::support::tree_digest(&host.repo_dir);
    for (source, stem, words) in &checks {
        let (name, plan) = plan_of(source, words);
        assert_eq!(
            (*stem, name.as_str()),
            ("atocore-offsite-check", "atocore/offsite-check")
        );
        assert_eq!(plan["params"]["subset"], "10%", "{source}");
        let steps: Vec<(&str, &str, &str)> = plan["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["id"].as_str().unwrap(),
                    s["verdict"].as_str().unwrap(),
                    s["detail"].as_str().unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(steps.len(), 1, "{source}: {steps:?}");
        assert_eq!(
            (steps[0].0, steps[0].1),
            ("check", "will-change"),
            "{source}"
        );
        assert!(
            steps[0].2.starts_with(&format!(
                "check 1 snapshots on root@{}:22: the remote hashes 10% of ",
                host.host
            )),
            "{source}: {steps:?}"
        );
        assert_eq!(
            crate::support::tree_digest(&host.repo_dir),
            remote,
            "{source}: the plan wrote off-site"
        );
    }
    assert_eq!(
        planned,
        BTreeMap::from([
            ("atocore/backup".to_string(), 4),
            ("atocore/drill".into(), 2),
            ("atocore/offsite".into(), 2),
            ("atocore/offsite-check".into(), 2),
            ("atocore/retention".into(), 2),
        ])
    );

    let stop = service(d, &vars, "stopped");
    assert_eq!(stop.code, 0, "{stop:?}");
    assert!(runbook::actions::daemon::running(&pidfile).is_none());
}
