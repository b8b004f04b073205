//! How the agent reads its config: the shared loader (`outpost_protocol::config_load`) with the
//! agent's struct, its refusal of the old plain-text tokens, and relative paths resolved against
//! the file's directory. Reads the config file and the environment; no network.

use std::collections::BTreeMap;
use std::path::Path;

use config::ValueKind;
use outpost_protocol::config_load::{
    self, ConfigFile, LoadConfigError, Problem, Problems, RawConfig,
};

use super::{AgentConfig, Settings};

/// The message for the old plain-text form (which names no token: it is a secret).
const PLAIN_TOKEN_MESSAGE: &str = "plain-text tokens are no longer accepted: hash each token with \
    `outpost-agent hash-token` and list it as an [[api.tokens]] table with name, role and sha256";

/// Loads `path`, applies the process environment's `OUTPOST_*` overrides, resolves relative paths
/// against the config file's directory and validates everything, reporting every problem at once.
pub fn load(path: &Path) -> Result<Settings, LoadConfigError> {
    load_with_env(path, config_load::process_env())
}

/// `load` with an explicit environment (tests use this instead of mutating the process's).
pub fn load_with_env(
    path: &Path,
    env: BTreeMap<String, String>,
) -> Result<Settings, LoadConfigError> {
    config_load::load::<AgentConfig>(path, &env)
}

impl ConfigFile for AgentConfig {
    type Checked = Settings;

    /// `tokens = ["plain"]` and `tokens = "plain"`: the tokens themselves, from before clients
    /// were listed by the hash of their token. Each is refused by its index, with what to do
    /// instead, and never quoted.
    fn refuse_removed_forms(raw: &mut RawConfig, problems: &mut Problems) {
        // From the environment, `api.tokens` is refused as every list is.
        if raw.env_var("api.tokens").is_some() {
            return;
        }
        let Some(tokens) = raw.get_mut(&["api", "tokens"]) else {
            return;
        };
        if let ValueKind::String(_) = tokens.kind {
            tokens.kind = ValueKind::Array(vec![tokens.clone()]);
        }
        if let ValueKind::Array(items) = &tokens.kind {
            for (i, item) in items.iter().enumerate() {
                if let ValueKind::String(_) = item.kind {
                    problems.add(&format!("api.tokens[{i}]"), PLAIN_TOKEN_MESSAGE);
                }
            }
        }
    }

    fn check(mut self, path: &Path) -> Result<Settings, Vec<Problem>> {
        let base = std::path::absolute(path)
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_default();
        self.resolve_paths(&base);
        self.validate()
    }
}

impl AgentConfig {
    /// Makes every relative path absolute against `base` (the config file's directory), so the
    /// agent does not depend on the directory it was started from.
    pub fn resolve_paths(&mut self, base: &Path) {
        for p in [
            &mut self.data_dir,
            &mut self.sync.ca_cert,
            &mut self.sync.cert,
            &mut self.sync.key,
        ] {
            if !p.as_os_str().is_empty() && p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }
}
