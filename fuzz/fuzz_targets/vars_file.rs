//! A `--vars` file: parsed as the binary reads it, then resolved against a runbook
//! declaring one param of every type (with a pattern and a secret), as `run` does.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use runbook::catalog::Catalog;
use runbook::load::{Loader, Runbook};
use runbook::params::{ParamInputs, resolve};
use runbook::template::Templates;

mod common;

const RUNBOOK: &str = r#"version: 1
params:
  s: {type: string}
  p: {type: path}
  n: {type: int}
  b: {type: bool}
  l: {type: list}
  stamp: {type: string, pattern: '\d{8}T\d{6}Z|latest'}
  token: {type: string, secret: true}
steps:
  - id: check
    action: assert
    with: {that: "true"}
"#;

fn runbook() -> &'static std::sync::Arc<Runbook> {
    static RB: OnceLock<std::sync::Arc<Runbook>> = OnceLock::new();
    RB.get_or_init(|| {
        let name = common::write_runbook("vars", RUNBOOK);
        let catalog = Catalog {
            search_path: vec![common::scratch().search.clone()],
        };
        Loader::new(&catalog, &Templates::new())
            .load(&name)
            .expect("the vars target's runbook is valid")
    })
}

fuzz_target!(|data: &[u8]| {
    let rb = runbook();
    let path = common::scratch().search.join("fuzz/input.vars.yaml");
    std::fs::write(&path, data).expect("write fuzzed vars file");
    let mut inputs = ParamInputs::default();
    match inputs.add_file(&path) {
        Ok(()) => {
            let _ = resolve(&rb.params, &inputs).map_err(|e| e.to_string());
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
