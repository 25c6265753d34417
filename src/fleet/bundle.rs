//! What the controller sends each host: the runbook's files (it and every runbook it
//! calls), named relative to the search-path directory they were found in, and the
//! digest over them that both sides compute the same way.

use std::path::{Path, PathBuf};

use super::FleetError;
use crate::load::Runbook;

#[derive(Debug, Clone)]
pub struct Bundle {
    /// The runbook's name (`atocore/backup`).
    pub name: String,
    /// sha256 over the relative paths and texts.
    pub digest: String,
    /// (path relative to the search-path directory, text), in the order the runbook
    /// reads them.
    pub files: Vec<(PathBuf, String)>,
}

/// `path` relative to the search-path directory that holds it.
fn relative(path: &Path, search_path: &[PathBuf]) -> Option<PathBuf> {
    let abs = crate::params::absolute(path);
    search_path.iter().find_map(|dir| {
        path.strip_prefix(dir)
            .ok()
            .or_else(|| abs.strip_prefix(crate::params::absolute(dir)).ok())
            .map(Path::to_path_buf)
    })
}

/// The digest a host checks (`runbook --expect-digest`): a file outside the search
/// path counts by its full path, so it never matches a controller's bundle.
pub fn digest_of(rb: &Runbook, search_path: &[PathBuf]) -> String {
    let files: Vec<(PathBuf, String)> = rb
        .files()
        .into_iter()
        .map(|(p, t)| (relative(&p, search_path).unwrap_or(p), t))
        .collect();
    crate::load::hash_files(&files)
}

impl Bundle {
    pub fn of(rb: &Runbook, search_path: &[PathBuf]) -> Result<Bundle, FleetError> {
        let mut files = Vec::new();
        for (path, text) in rb.files() {
            let rel = relative(&path, search_path).ok_or_else(|| {
                FleetError::Invalid(format!(
                    "{} is not under the runbook search path ({}): a fleet runs named runbooks, which it copies to each host",
                    path.display(),
                    search_path.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(":")
                ))
            })?;
            files.push((rel, text));
        }
        Ok(Bundle {
            name: rb.name.clone(),
            digest: crate::load::hash_files(&files),
            files,
        })
    }

    /// Writes the files under `dir` (which must not exist yet).
    pub fn write_to(&self, dir: &Path) -> std::io::Result<()> {
        for (rel, text) in &self.files {
            let path = dir.join(rel);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(path, text)?;
        }
        Ok(())
    }

    /// A unified diff from `old` (the files a fleet run started with) to these.
    pub fn diff_from(&self, old: &[(PathBuf, String)]) -> String {
        crate::load::files_diff(old, &self.files, "fleet run start")
    }
}
