//! `fleet plan`: every selected host's dry-run, run there by its installed engine
//! (read-only: nothing is installed, nothing written), shown side by side.

use indexmap::IndexMap;
use serde_json::Value as Json;

use super::cli::Target;
use super::host::{self, Engine};
use super::inventory::Host;
use super::{Ctx, FleetError};
use crate::actions::offsite::ssh::Remote;
use crate::exit::Exit;
use crate::render::Format;

/// How one host's plan came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
enum Verdict {
    Ok,
    WouldFail,
    /// The engine or runbook files of this fleet are not on the host.
    NotInstalled,
    /// The host's engine refused (bad values, files changed there).
    Refused,
    Unreachable,
}

#[derive(Debug, serde::Serialize)]
struct HostPlan {
    host: String,
    verdict: Verdict,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// The host's own `runbook plan --format json`.
    #[serde(skip_serializing_if = "Option::is_none")]
    plan: Option<Json>,
}

fn plan_host(host: &Host, engine: &Engine, digest: &str, name: &str, vars: &[u8]) -> HostPlan {
    let paths = host::HostPaths::new(host, engine, digest);
    let args = host::repo_args(host);
    let mut lines = Vec::new();
    let result = Remote::new(&args).run_lines(
        host::ENGINE_SCRIPT,
        &paths.engine_words(&["--expect-digest", digest, "plan", name, "--vars", "-"]),
        vars,
        &mut |l| lines.push(l.to_string()),
    );
    let parsed: Option<Json> = serde_json::from_str(&lines.join("\n")).ok();
    let (verdict, error, plan) = match result {
        Err(e) => (
            Verdict::Unreachable,
            Some(host::HostRun::unreachable(&e)),
            None,
        ),
        Ok((host::NOT_INSTALLED, _)) => (
            Verdict::NotInstalled,
            Some(format!(
                "engine {} or these runbook files are not installed in {} (`runbook fleet install` puts them there; `fleet run` does it itself)",
                &engine.sha256[..16],
                host.spec.dir.display()
            )),
            None,
        ),
        Ok((code, stderr)) => match parsed {
            Some(p) if p.get("steps").is_some() => {
                let verdict = if p["ok"] == Json::Bool(true) {
                    Verdict::Ok
                } else {
                    Verdict::WouldFail
                };
                (verdict, None, Some(p))
            }
            Some(p) => (
                Verdict::Refused,
                Some(
                    p["error"]
                        .as_str()
                        .map_or_else(|| p.to_string(), str::to_string),
                ),
                None,
            ),
            None => (
                Verdict::Refused,
                Some(format!("exit {code}: {stderr}")),
                None,
            ),
        },
    };
    HostPlan {
        host: host.name.clone(),
        verdict,
        error,
        plan,
    }
}

/// (step key, verdict label, detail) of every step, called runbooks' steps under
/// their call step's key.
fn flatten(steps: &Json, prefix: &str, out: &mut Vec<(String, String, String)>) {
    for s in steps.as_array().into_iter().flatten() {
        let key = format!("{prefix}{}", s["id"].as_str().unwrap_or("?"));
        let detail = match &s["detail"] {
            Json::String(d) => d.clone(),
            Json::Array(a) => format!(
                "unknown until {} runs",
                a.iter()
                    .filter_map(Json::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            _ => String::new(),
        };
        out.push((
            key.clone(),
            s["verdict"].as_str().unwrap_or("?").replace('-', " "),
            detail,
        ));
        flatten(&s["steps"], &format!("{key}/"), out);
    }
}

pub fn plan(ctx: &Ctx, target: &Target) -> Result<Exit, FleetError> {
    let hosts = ctx.hosts(target)?;
    let loaded = ctx.load(&target.name)?;
    let given = ctx.given(&target.inputs, &loaded)?;
    let engine = Engine::resolve(target.engine.as_deref(), ctx.state_dir, false)?;
    let digest = loaded.bundle.digest.clone();
    let plans: Vec<HostPlan> = std::thread::scope(|s| {
        let handles: Vec<_> = hosts
            .iter()
            .map(|h| {
                let vars =
                    super::host_values(&given, &h.spec.vars, &IndexMap::new(), &loaded, true);
                let (engine, digest, name) = (&engine, &digest, &loaded.bundle.name);
                s.spawn(move || plan_host(h, engine, digest, name, &host::yaml(&vars)))
            })
            .collect();
        handles
            .into_iter()
            .zip(&hosts)
            .map(|(t, h)| {
                t.join().unwrap_or_else(|_| HostPlan {
                    host: h.name.clone(),
                    verdict: Verdict::Refused,
                    error: Some("the plan thread panicked".into()),
                    plan: None,
                })
            })
            .collect()
    });
    let exit = if plans.iter().any(|p| p.verdict == Verdict::Unreachable) {
        Exit::StepFailed
    } else if plans.iter().all(|p| p.verdict == Verdict::Ok) {
        Exit::Success
    } else {
        Exit::Refused
    };
    if ctx.format() == Format::Json {
        let value = serde_json::json!({
            "runbook": loaded.bundle.name,
            "digest": digest,
            "ok": exit == Exit::Success,
            "hosts": plans,
        });
        print_quietly(&format!(
            "{}\n",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        ));
        return Ok(exit);
    }
    print_quietly(&side_by_side(&loaded.bundle.name, &plans));
    Ok(exit)
}

/// Prints, and says nothing when the reader has gone (`fleet plan | head`). `fleet
/// plan` keeps SIGPIPE ignored, unlike `plan`: it writes each host's values to its
/// ssh's stdin, and an ssh that failed at once (a host whose link is down) must make
/// that write fail, not kill the controller.
fn print_quietly(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

/// (step key, verdict label, detail).
type StepRow = (String, String, String);

/// Steps as rows, hosts as columns; hosts whose plans are identical (verdict by
/// verdict) share one column.
fn side_by_side(runbook: &str, plans: &[HostPlan]) -> String {
    let mut columns: Vec<(Vec<String>, Vec<StepRow>)> = Vec::new();
    let mut keys: Vec<String> = Vec::new();
    for p in plans {
        let mut steps = Vec::new();
        if let Some(plan) = &p.plan {
            flatten(&plan["steps"], "", &mut steps);
        }
        for (k, _, _) in &steps {
            if !keys.contains(k) {
                keys.push(k.clone());
            }
        }
        let labels: Vec<(String, String)> = steps
            .iter()
            .map(|(k, v, _)| (k.clone(), v.clone()))
            .collect();
        match columns.iter_mut().find(|(_, s)| {
            p.plan.is_some()
                && s.iter()
                    .map(|(k, v, _)| (k.clone(), v.clone()))
                    .collect::<Vec<_>>()
                    == labels
        }) {
            Some((names, _)) => names.push(p.host.clone()),
            None => columns.push((vec![p.host.clone()], steps)),
        }
    }
    let kw = keys.iter().map(String::len).max().unwrap_or(4).max(4);
    let heads: Vec<String> = columns.iter().map(|(n, _)| n.join(", ")).collect();
    let cw: Vec<usize> = heads.iter().map(|h| h.len().max(12)).collect();
    let mut s = format!("fleet plan {runbook} on {} host(s)\n", plans.len());
    s.push_str(&format!("{:<kw$}", "STEP"));
    for (h, w) in heads.iter().zip(&cw) {
        s.push_str(&format!("  {h:<w$}"));
    }
    s.push('\n');
    for key in &keys {
        s.push_str(&format!("{key:<kw$}"));
        for ((_, steps), w) in columns.iter().zip(&cw) {
            let cell = steps
                .iter()
                .find(|(k, _, _)| k == key)
                .map_or("-", |(_, v, _)| v.as_str());
            s.push_str(&format!("  {cell:<w$}"));
        }
        s.push('\n');
    }
    let mut problems = Vec::new();
    for p in plans {
        match p.verdict {
            Verdict::Ok => {}
            Verdict::WouldFail => {
                let mut steps = Vec::new();
                if let Some(plan) = &p.plan {
                    flatten(&plan["steps"], "", &mut steps);
                }
                for (k, v, d) in steps.iter().filter(|(_, v, _)| v == "would fail") {
                    problems.push(format!("host {}: step `{k}` {v}: {d}", p.host));
                }
            }
            v => problems.push(format!(
                "host {}: {}: {}",
                p.host,
                serde_json::to_value(v)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                p.error.as_deref().unwrap_or("")
            )),
        }
    }
    if problems.is_empty() {
        s.push_str("every host: nothing would fail\n");
    } else {
        for line in problems {
            s.push_str(&line);
            s.push('\n');
        }
    }
    s
}
