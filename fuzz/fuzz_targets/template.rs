//! The template renderer with params: the input is split on NUL bytes into a
//! template, a `when` expression and values for a string, an int, a bool and a list
//! param. They are put into a runbook (var, step argument, `when`, output), which is
//! loaded, given the values as `--set` gives them, and rendered the way `plan` and
//! `run` render: vars frozen in a frame, step arguments, the `when` expression and the
//! outputs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use runbook::catalog::Catalog;
use runbook::frame::Frame;
use runbook::load::Loader;
use runbook::params::ParamInputs;
use runbook::template::Templates;
use serde_json::json;

mod common;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = text.split('\0');
    let template = parts.next().unwrap_or_default();
    let when = parts
        .next()
        .filter(|w| !w.trim().is_empty())
        .unwrap_or("true");
    let values: Vec<&str> = parts.collect();
    let doc = json!({
        "version": 1,
        "params": {
            "s": {"type": "string", "default": "text"},
            "n": {"type": "int", "default": 3},
            "b": {"type": "bool", "default": false},
            "l": {"type": "list", "default": ["a", "b"]},
            "opt": {"type": "string"},
            "token": {"type": "string", "secret": true, "default": "s3cr3t"},
        },
        "vars": {"v": template},
        "steps": [
            {"id": "check", "action": "assert", "when": when,
             "with": {"that": "true", "message": template}},
            {"id": "write", "action": "write-file",
             "with": {"path": "/nonexistent/{{ v }}", "content": template}},
        ],
        "outputs": {"out": template},
    });
    let Ok(yaml) = serde_yaml::to_string(&doc) else {
        return;
    };
    let name = common::write_runbook("rendered", &yaml);
    let catalog = Catalog {
        search_path: vec![common::scratch().search.clone()],
    };
    let templates = Templates::new();
    let Ok(rb) = Loader::new(&catalog, &templates).load(&name) else {
        return;
    };
    let mut inputs = ParamInputs::default();
    for (param, value) in ["s", "n", "b", "l"].iter().zip(&values) {
        if inputs.add_set(&format!("{param}={value}")).is_err() {
            return;
        }
    }
    let Ok(mut frame) = Frame::new(rb.clone(), &inputs, None, &templates, Default::default())
    else {
        return;
    };
    for step in &rb.steps {
        if let Some(when) = &step.when {
            let _ = frame.eval(when, &templates);
        }
        if let Ok(args) = frame.render_args(&step.args, &templates) {
            let _ = frame.redactor.json(&args);
        }
    }
    let _ = frame.outputs(&templates);
    let _ = frame.shown_vars();
});
