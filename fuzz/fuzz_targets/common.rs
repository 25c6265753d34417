//! What every target shares: a search path holding the bundled runbooks (so fuzzed
//! runbooks may call them) and a scratch directory for the fuzzed file, made once per
//! process. The targets go through the same file-reading entry points as the binary
//! (`Loader::load`, `ParamInputs::add_file`), so what is fuzzed is the production code.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub struct Scratch {
    _dir: tempfile::TempDir,
    pub search: PathBuf,
}

pub fn scratch() -> &'static Scratch {
    static SCRATCH: OnceLock<Scratch> = OnceLock::new();
    SCRATCH.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let search = dir.path().join("runbooks");
        copy_tree(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../runbooks"),
            &search,
        );
        std::fs::create_dir_all(search.join("fuzz")).expect("mkdir fuzz");
        Scratch { _dir: dir, search }
    })
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read runbooks").flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy runbook");
        }
    }
}

/// Writes `text` as the runbook `fuzz/NAME` and returns its name.
pub fn write_runbook(name: &str, text: &str) -> String {
    let path = scratch().search.join("fuzz").join(format!("{name}.yaml"));
    std::fs::write(path, text).expect("write fuzzed runbook");
    format!("fuzz/{name}")
}
