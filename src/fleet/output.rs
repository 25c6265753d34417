//! What a fleet command shows: a live line per host on a terminal, a summary table
//! at the end, or per-host JSON events, or JUnit XML (one testcase per host).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use serde_json::Value as Json;

use super::host::Outcome;
use super::record::{HostState, HostStatus};
use crate::render::Format;

pub struct Ui {
    format: Format,
    quiet: bool,
    names: Vec<String>,
    width: usize,
    /// One spinner line per host, on a terminal.
    live: Option<(indicatif::MultiProgress, Vec<indicatif::ProgressBar>)>,
    since: Vec<Option<Instant>>,
}

impl Ui {
    pub fn new(format: Format, quiet: bool, names: Vec<String>) -> Ui {
        let width = names.iter().map(String::len).max().unwrap_or(4).max(4);
        let live =
            (format == Format::Text && !quiet && std::io::stderr().is_terminal()).then(|| {
                let multi = indicatif::MultiProgress::new();
                let style =
                    indicatif::ProgressStyle::with_template("{spinner} {prefix} {msg} {elapsed}")
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner());
                let bars = names
                    .iter()
                    .map(|n| {
                        let bar = multi.add(indicatif::ProgressBar::new_spinner());
                        bar.set_style(style.clone());
                        bar.set_prefix(format!("{n:<width$}"));
                        bar.set_message("waiting");
                        bar
                    })
                    .collect();
                (multi, bars)
            });
        let since = vec![None; names.len()];
        Ui {
            format,
            quiet,
            names,
            width,
            live,
            since,
        }
    }

    /// A host a resume leaves alone (it succeeded before): its line says so at once.
    pub fn before(&mut self, host: usize, state: &HostState) {
        let run = state.run_id.as_deref().unwrap_or("-");
        self.settle(
            host,
            format!("{} before (run {run})", state.status.as_str()),
        );
    }

    /// Ends a host's live line with `line` (which says its own duration).
    fn settle(&self, host: usize, line: String) {
        if let Some((_, bars)) = &self.live {
            if let Ok(done) = indicatif::ProgressStyle::with_template("  {prefix} {msg}") {
                bars[host].set_style(done);
            }
            bars[host].finish_with_message(line);
        }
    }

    pub fn doing(&mut self, host: usize, what: &str) {
        self.since[host].get_or_insert_with(Instant::now);
        if let Some((_, bars)) = &self.live {
            bars[host].set_message(what.to_string());
            bars[host].enable_steady_tick(Duration::from_millis(120));
        }
    }

    pub fn event(&mut self, host: usize, event: Json) {
        if self.format == Format::Json {
            let mut line = serde_json::Map::new();
            line.insert("host".into(), Json::String(self.names[host].clone()));
            if let Json::Object(fields) = event {
                line.extend(fields);
            }
            println!("{}", Json::Object(line));
            return;
        }
        if let (Some((_, bars)), Some("step-started")) = (&self.live, event["event"].as_str()) {
            bars[host].set_message(format!("running  {}", event["key"].as_str().unwrap_or("")));
        }
    }

    pub fn finished(&mut self, host: usize, o: &Outcome) {
        let name = &self.names[host];
        let line = match (&o.failed_step, &o.error) {
            (Some(step), Some(e)) => format!("{} at step `{step}`: {e}", o.status.as_str()),
            (None, Some(e)) => format!("{}: {e}", o.status.as_str()),
            _ => format!("{} in {:.2}s", o.status.as_str(), o.duration.as_secs_f64()),
        };
        match self.format {
            Format::Json => println!(
                "{}",
                serde_json::json!({
                    "host": name,
                    "event": "host-finished",
                    "status": o.status.as_str(),
                    "run_id": o.run_id,
                    "failed_step": o.failed_step,
                    "error": o.error,
                    "duration": o.duration.as_secs_f64(),
                })
            ),
            Format::Text if !self.quiet => match &self.live {
                Some(_) => self.settle(host, line),
                None => println!("{name:<w$}  {line}", w = self.width),
            },
            _ => {}
        }
    }

    /// The end: a table (text), a final JSON line, or the JUnit document.
    pub fn summary(&mut self, id: &str, runbook: &str, rows: &[HostState]) {
        if let Some((multi, _)) = self.live.take() {
            let _ = multi.clear();
        }
        let mut out = std::io::stdout().lock();
        match self.format {
            Format::Json => {
                let _ = writeln!(
                    out,
                    "{}",
                    serde_json::json!({
                        "event": "fleet-finished",
                        "id": id,
                        "runbook": runbook,
                        "status": overall(rows).as_str(),
                        "hosts": rows,
                    })
                );
            }
            Format::Junit => {
                let _ = write!(out, "{}", junit(id, runbook, rows));
            }
            Format::Text => {
                let _ = write!(out, "{}", table(id, runbook, rows));
            }
        }
    }
}

/// Succeeded only when every host did.
pub fn overall(rows: &[HostState]) -> HostStatus {
    if rows.iter().all(|r| r.status == HostStatus::Succeeded) {
        HostStatus::Succeeded
    } else if rows.iter().any(|r| r.status == HostStatus::Running) {
        HostStatus::Running
    } else {
        HostStatus::Failed
    }
}

pub fn table(id: &str, runbook: &str, rows: &[HostState]) -> String {
    let w = rows.iter().map(|r| r.host.len()).max().unwrap_or(4).max(4);
    let mut s = format!(
        "{:<w$}  {:<11}  {:<24}  {:<16}  DURATION\n",
        "HOST", "STATUS", "RUN ID THERE", "FAILED STEP"
    );
    for r in rows {
        s.push_str(&format!(
            "{:<w$}  {:<11}  {:<24}  {:<16}  {}\n",
            r.host,
            r.status.as_str(),
            r.run_id.as_deref().unwrap_or("-"),
            r.failed_step.as_deref().unwrap_or("-"),
            r.duration_secs.map_or("-".into(), |d| format!("{d:.2}s")),
        ));
    }
    for r in rows.iter().filter(|r| r.error.is_some()) {
        s.push_str(&format!(
            "{}: {}\n",
            r.host,
            r.error.as_deref().unwrap_or("")
        ));
    }
    let count = |st: HostStatus| rows.iter().filter(|r| r.status == st).count();
    s.push_str(&format!(
        "fleet run {id} of {runbook}: {} succeeded, {} failed, {} unreachable, {} interrupted, {} not started{}\n",
        count(HostStatus::Succeeded),
        count(HostStatus::Failed),
        count(HostStatus::Unreachable),
        count(HostStatus::Interrupted),
        count(HostStatus::NotStarted),
        if overall(rows) == HostStatus::Succeeded {
            String::new()
        } else {
            format!("\n`runbook fleet resume {id}` continues the hosts that did not succeed")
        }
    ));
    s
}

fn esc(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

pub fn junit(id: &str, runbook: &str, rows: &[HostState]) -> String {
    let failures = rows
        .iter()
        .filter(|r| r.status != HostStatus::Succeeded)
        .count();
    let time: f64 = rows.iter().filter_map(|r| r.duration_secs).sum();
    let mut x = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites name=\"runbook fleet\" tests=\"{n}\" failures=\"{failures}\" time=\"{time:.3}\">\n  <testsuite name=\"{}\" tests=\"{n}\" failures=\"{failures}\" time=\"{time:.3}\">\n",
        esc(&format!("{runbook} ({id})")),
        n = rows.len(),
    );
    for r in rows {
        x.push_str(&format!(
            "    <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\">",
            esc(runbook),
            esc(&r.host),
            r.duration_secs.unwrap_or(0.0)
        ));
        if r.status != HostStatus::Succeeded {
            let message = match (&r.failed_step, &r.error) {
                (Some(step), Some(e)) => format!("{}: step {step}: {e}", r.status.as_str()),
                (None, Some(e)) => format!("{}: {e}", r.status.as_str()),
                _ => r.status.as_str().to_string(),
            };
            x.push_str(&format!(
                "<failure message=\"{}\" type=\"{}\"/>",
                esc(&message),
                r.status.as_str()
            ));
        } else if let Some(run) = &r.run_id {
            x.push_str(&format!("<system-out>run {}</system-out>", esc(run)));
        }
        x.push_str("</testcase>\n");
    }
    x.push_str("  </testsuite>\n</testsuites>\n");
    x
}
