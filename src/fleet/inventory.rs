//! The inventory (`hosts.yaml`): the hosts a fleet command may reach, how to reach
//! each, where on it the fleet keeps its files, and the host's own param values.

use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::FleetError;
use crate::diagnostic::{Diagnostic, did_you_mean};
use crate::source::SourceFile;

/// `hosts.yaml`: the hosts a fleet command may act on, and groups of them.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    /// Each host by name (letters, digits, `.`, `_`, `-`).
    pub hosts: IndexMap<String, HostSpec>,
    /// Named lists of host names, for `--limit`.
    #[serde(default)]
    pub groups: IndexMap<String, Vec<String>>,
}

/// One host: how to reach it over SSH, and its own values.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HostSpec {
    /// IP address or DNS name that `ssh` connects to.
    pub address: String,
    /// SSH port.
    #[serde(default = "default_port")]
    pub port: u16,
    /// The login: the engine runs as this user there (root for `chown`).
    #[serde(default = "default_user")]
    pub user: String,
    /// Private key file (`ssh -i`); relative paths are from the inventory's directory.
    pub ssh_key: PathBuf,
    /// known_hosts file holding the host's key: host keys are always verified.
    pub known_hosts: PathBuf,
    /// Directory on the host for the fleet's files: `bin/` (the engine), `runbooks/`
    /// (the runbook files, by digest) and `state/` (the host's journal).
    #[serde(default = "default_dir")]
    pub dir: PathBuf,
    /// This host's param values (its paths, its service manager); they win over
    /// `--vars` files.
    #[serde(default)]
    #[schemars(with = "IndexMap<String, Json>")]
    pub vars: IndexMap<String, Json>,
}

fn default_port() -> u16 {
    22
}
fn default_user() -> String {
    "root".into()
}
fn default_dir() -> PathBuf {
    PathBuf::from("/var/lib/runbook")
}

/// A selected host, with its name.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Host {
    pub name: String,
    #[serde(flatten)]
    pub spec: HostSpec,
}

pub fn schema_text() -> String {
    let schema = schemars::schema_for!(Inventory);
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}

fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl Inventory {
    /// Reads and checks an inventory; every error names `file:line:col` and the field.
    pub fn load(path: &Path) -> Result<Inventory, FleetError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            FleetError::Invalid(format!("cannot read the inventory {}: {e}", path.display()))
        })?;
        let src = SourceFile::new(path, text);
        let fail = |pos, field: &str, msg: String| {
            FleetError::Invalid(
                Diagnostic::at(&src, pos, format!("inventory: {msg}"))
                    .field(field.to_string())
                    .to_string(),
            )
        };
        if let Err(pos) = src.check_nesting() {
            return Err(fail(pos, "", crate::load::too_deep()));
        }
        let raw: serde_yaml::Value = serde_yaml::from_str(&src.text).map_err(|e| {
            fail(
                crate::params::yaml_pos(&e),
                "",
                crate::params::yaml_message(&e),
            )
        })?;
        let mut inv: Inventory = serde_path_to_error::deserialize(raw).map_err(|e| {
            let field = e.path().to_string();
            let field = if field == "." { String::new() } else { field };
            let msg = e.inner().to_string();
            let pos = if msg.starts_with("unknown field") {
                let unknown = msg.split('`').nth(1).unwrap_or_default();
                src.key_pos(&if field.is_empty() {
                    unknown.to_string()
                } else if field.ends_with(unknown) {
                    field.clone()
                } else {
                    format!("{field}.{unknown}")
                })
            } else {
                src.value_pos(&field)
            };
            fail(pos, &field, msg)
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for (name, host) in &mut inv.hosts {
            let at = |f: &str| format!("hosts.{name}.{f}");
            if !name_ok(name) {
                return Err(fail(
                    src.key_pos(&format!("hosts.{name}")),
                    &format!("hosts.{name}"),
                    format!(
                        "host name `{name}`: use letters, digits, `.`, `_` and `-` (not first)"
                    ),
                ));
            }
            // ssh takes a word that starts with `-` as an option (`-oProxyCommand=...`):
            // an address or user never may.
            let address_ok = !host.address.is_empty()
                && !host.address.starts_with('-')
                && host
                    .address
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_'));
            if !address_ok {
                return Err(fail(
                    src.value_pos(&at("address")),
                    &at("address"),
                    format!("`{}` is not a host name or IP address", host.address),
                ));
            }
            if !name_ok(&host.user) {
                return Err(fail(
                    src.value_pos(&at("user")),
                    &at("user"),
                    format!("`{}` is not a user name", host.user),
                ));
            }
            if !host.dir.is_absolute() || host.dir.to_str().is_none_or(|d| d.contains('\n')) {
                return Err(fail(
                    src.value_pos(&at("dir")),
                    &at("dir"),
                    format!("`{}` must be an absolute path", host.dir.display()),
                ));
            }
            for (field, file) in [
                ("ssh_key", &mut host.ssh_key),
                ("known_hosts", &mut host.known_hosts),
            ] {
                if file.is_relative() {
                    *file = crate::params::absolute(&base.join(&*file));
                }
                if !file.is_file() {
                    return Err(fail(
                        src.value_pos(&at(field)),
                        &at(field),
                        format!("{} is not a file here", file.display()),
                    ));
                }
            }
        }
        for (group, members) in &inv.groups {
            if inv.hosts.contains_key(group) {
                return Err(fail(
                    src.key_pos(&format!("groups.{group}")),
                    &format!("groups.{group}"),
                    format!("group `{group}` has the name of a host"),
                ));
            }
            for (i, m) in members.iter().enumerate() {
                if !inv.hosts.contains_key(m) {
                    let hint = did_you_mean(m, inv.hosts.keys().map(String::as_str))
                        .map(|h| format!("; {h}"))
                        .unwrap_or_default();
                    return Err(fail(
                        src.value_pos(&format!("groups.{group}[{i}]")),
                        &format!("groups.{group}[{i}]"),
                        format!("no host named `{m}` in `hosts`{hint}"),
                    ));
                }
            }
        }
        if inv.hosts.is_empty() {
            return Err(fail(src.key_pos("hosts"), "hosts", "no hosts".into()));
        }
        Ok(inv)
    }

    /// The hosts `--limit` picks (all when empty), in inventory order.
    pub fn select(&self, limit: &[String]) -> Result<Vec<Host>, FleetError> {
        let mut wanted = std::collections::BTreeSet::new();
        for word in limit.iter().map(|w| w.trim()).filter(|w| !w.is_empty()) {
            if self.hosts.contains_key(word) {
                wanted.insert(word.to_string());
            } else if let Some(members) = self.groups.get(word) {
                wanted.extend(members.iter().cloned());
            } else {
                let names = self
                    .hosts
                    .keys()
                    .chain(self.groups.keys())
                    .map(String::as_str);
                let hint = did_you_mean(word, names)
                    .map(|h| format!("; {h}"))
                    .unwrap_or_default();
                return Err(FleetError::Invalid(format!(
                    "--limit: no host or group named `{word}` in the inventory{hint}"
                )));
            }
        }
        Ok(self
            .hosts
            .iter()
            .filter(|(n, _)| limit.is_empty() || wanted.contains(*n))
            .map(|(n, spec)| Host {
                name: n.clone(),
                spec: spec.clone(),
            })
            .collect())
    }
}
