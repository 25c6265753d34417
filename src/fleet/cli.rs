//! `runbook fleet ...`: the command-line definitions of the fleet commands.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::cli::Inputs;

pub const FLEET_HELP: &str = "\
Each host runs an ordinary `runbook run` with its journal on that host (in the host's
`dir`), so a host's run outlives the controller; the controller keeps a fleet record
in its state dir (which hosts, which run id on each, how each ended).

Examples:
  runbook fleet install atocore/backup --hosts hosts.yaml
                                   put the engine and the runbook files on every host
  runbook fleet plan atocore/backup --hosts hosts.yaml --vars env/common.yaml
                                   every host's dry-run, side by side; writes nothing
  runbook fleet run atocore/backup --hosts hosts.yaml --parallel 3 --max-fail 1
  runbook fleet runs               fleet runs, newest first
  runbook fleet show FLEET_RUN_ID  per host: status, run id there, failed step, duration
  runbook fleet resume FLEET_RUN_ID --vars secrets.yaml
                                   continue the hosts that did not succeed

Host values: --vars files (for every host), then the host's `vars` in the inventory,
then --set. Secrets reach each host's process on its standard input, never its argv,
and are never written to the fleet record: give them again to `fleet resume`.

Exit codes: 0 every host succeeded, 1 some host failed (or was unreachable, or not
started), 2 invalid input (inventory, --limit), 3 refused before anything ran (engine
not static or of another version, runbook changed since the fleet run started, the
fleet run is being resumed elsewhere), 4 internal error.";

#[derive(Debug, Subcommand)]
#[command(after_help = FLEET_HELP)]
pub enum FleetCommand {
    /// Every host's dry-run, side by side. Nothing is written on any host; a host
    /// without this engine and these runbook files says so (`fleet install` puts them
    /// there).
    #[command(after_help = FLEET_HELP)]
    Plan {
        #[command(flatten)]
        target: Target,
    },
    /// Run the runbook on every selected host: `--parallel N` at a time, at most
    /// `--max-fail` failures before no more hosts are started.
    #[command(after_help = FLEET_HELP)]
    Run {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        window: Window,
    },
    /// Put this engine and the runbook's files on every selected host (what `fleet run`
    /// does first where they are missing); runs nothing.
    Install {
        #[command(flatten)]
        target: Target,
    },
    /// The fleet runs of this controller, newest first.
    Runs,
    /// One fleet run: per host, its status, its run id there, the failed step, duration.
    Show { fleet_run_id: String },
    /// Continue a fleet run: hosts that succeeded are skipped; a host's started run is
    /// continued there (`runbook resume`), one that never started is started.
    #[command(after_help = FLEET_HELP)]
    Resume {
        fleet_run_id: String,
        /// Values again (secrets are never recorded), as for `fleet run`.
        #[command(flatten)]
        inputs: Inputs,
        /// The static engine build that started the fleet run [default: this program].
        #[arg(long, value_name = "FILE", env = "RUNBOOK_FLEET_ENGINE")]
        engine: Option<PathBuf>,
        /// Override the fleet run's --parallel.
        #[arg(long, value_name = "N", value_parser = parse_parallel)]
        parallel: Option<usize>,
        /// Override the fleet run's --max-fail.
        #[arg(long, value_name = "K|P%", value_parser = crate::fleet::scheduler::FailLimit::parse)]
        max_fail: Option<crate::fleet::scheduler::FailLimit>,
    },
    /// Print the JSON Schema of the inventory (hosts.yaml).
    Schema,
}

#[derive(Debug, Args, Clone)]
pub struct Target {
    /// Runbook name on the search path (`atocore/backup`).
    pub name: String,
    /// The inventory: `hosts:` (address, port, user, ssh_key, known_hosts, dir, vars) and
    /// `groups:`. `runbook fleet schema` prints its JSON Schema.
    #[arg(long, value_name = "FILE")]
    pub hosts: PathBuf,
    /// Only these hosts or groups, comma-separated (`--limit staging,db1`).
    #[arg(long, value_name = "NAMES", value_delimiter = ',')]
    pub limit: Vec<String>,
    #[command(flatten)]
    pub inputs: Inputs,
    /// The engine to install on the hosts: a statically linked build of this version
    /// (`RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --target
    /// x86_64-unknown-linux-gnu`) [default: this program].
    #[arg(long, value_name = "FILE", env = "RUNBOOK_FLEET_ENGINE")]
    pub engine: Option<PathBuf>,
}

#[derive(Debug, Args, Clone)]
pub struct Window {
    /// How many hosts run at once (a sliding window: a host starts as soon as one ends).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = parse_parallel)]
    pub parallel: usize,
    /// Stop starting hosts once K hosts (or P% of the selected hosts) have failed;
    /// running ones finish, the rest are reported not started [default: no limit].
    #[arg(long, value_name = "K|P%", value_parser = crate::fleet::scheduler::FailLimit::parse)]
    pub max_fail: Option<crate::fleet::scheduler::FailLimit>,
}

/// `--parallel`: at least one host at a time (0 would run nothing, silently).
fn parse_parallel(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!(
            "`{text}` is not a number of hosts to run at once: give 1 or more"
        )),
    }
}
