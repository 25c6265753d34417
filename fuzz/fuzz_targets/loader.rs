//! YAML text -> validated runbook, as `runbook validate` does it (calls to the bundled
//! runbooks resolve); every diagnostic is rendered as the binary prints it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use runbook::catalog::Catalog;
use runbook::load::Loader;
use runbook::template::Templates;

mod common;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let name = common::write_runbook("loaded", text);
    let catalog = Catalog {
        search_path: vec![common::scratch().search.clone()],
    };
    let templates = Templates::new();
    match Loader::new(&catalog, &templates).load(&name) {
        Ok(rb) => {
            let _ = rb.content_hash();
            let _ = rb.call_tree_params();
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
