//! Finding runbooks: `atocore/backup` is `<search dir>/atocore/backup.yaml`; a path to
//! a file is that file.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Catalog {
    pub search_path: Vec<PathBuf>,
}

/// Where a runbook was found.
#[derive(Debug, Clone)]
pub struct Located {
    /// `atocore/backup`, or the file stem for a file outside the search path.
    pub name: String,
    pub path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
#[error("no runbook named `{name}` (looked in {}){}", searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "), hint.as_deref().map(|h| format!("; {h}")).unwrap_or_default())]
pub struct NotFound {
    pub name: String,
    pub searched: Vec<PathBuf>,
    pub hint: Option<String>,
}

impl Catalog {
    pub fn locate(&self, name_or_file: &str) -> Result<Located, NotFound> {
        let as_file = Path::new(name_or_file);
        let looks_like_file = name_or_file.ends_with(".yaml") || name_or_file.ends_with(".yml");
        if looks_like_file && as_file.is_file() {
            return Ok(Located {
                name: self.name_of(as_file),
                path: as_file.to_path_buf(),
            });
        }
        let mut searched = Vec::new();
        for dir in &self.search_path {
            for ext in ["yaml", "yml"] {
                let candidate = dir.join(format!("{name_or_file}.{ext}"));
                if candidate.is_file() {
                    return Ok(Located {
                        name: name_or_file.to_string(),
                        path: candidate,
                    });
                }
            }
            searched.push(dir.clone());
        }
        let names: Vec<String> = self.list().into_iter().map(|l| l.name).collect();
        let hint = crate::diagnostic::did_you_mean(name_or_file, names.iter().map(String::as_str))
            .or_else(|| {
                (!names.is_empty()).then(|| "`runbook list` shows the runbooks there".to_string())
            })
            .or_else(|| {
                Some(
                    "set --path DIR (or RUNBOOK_PATH) to the directory holding runbooks"
                        .to_string(),
                )
            });
        Err(NotFound {
            name: name_or_file.to_string(),
            searched,
            hint,
        })
    }

    /// The name of a file: relative to the search dir that holds it, else its stem.
    fn name_of(&self, file: &Path) -> String {
        let abs = crate::world::normalize(file);
        for dir in &self.search_path {
            if let Ok(rel) = abs.strip_prefix(crate::world::normalize(dir)) {
                return rel.with_extension("").to_string_lossy().into_owned();
            }
        }
        file.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Every runbook on the search path, sorted by name. Files without a top-level
    /// `steps` key (such as vars files under `env/`) are not runbooks.
    pub fn list(&self) -> Vec<Located> {
        let mut out: Vec<Located> = Vec::new();
        for dir in &self.search_path {
            for entry in walkdir::WalkDir::new(dir)
                .sort_by_file_name()
                .into_iter()
                .flatten()
            {
                let path = entry.path();
                let is_yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
                if !entry.file_type().is_file() || !is_yaml || !has_steps(path) {
                    continue;
                }
                let name = path
                    .strip_prefix(dir)
                    .unwrap_or(path)
                    .with_extension("")
                    .to_string_lossy()
                    .into_owned();
                if !out.iter().any(|l| l.name == name) {
                    out.push(Located {
                        name,
                        path: path.to_path_buf(),
                    });
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

fn has_steps(path: &Path) -> bool {
    std::fs::read_to_string(path).is_ok_and(|t| t.lines().any(|l| l.starts_with("steps:")))
}
