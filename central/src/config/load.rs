//! How central reads its config: the shared loader (`outpost_protocol::config_load`) with
//! central's struct, and relative paths resolved against the file's directory. Reads the config
//! file and the environment; no network.

use std::collections::HashMap;
use std::path::Path;

use outpost_protocol::config_load::{self, ConfigFile, LoadConfigError, Problem};

use super::CentralConfig;

impl ConfigFile for CentralConfig {
    type Checked = CentralConfig;

    fn check(mut self, path: &Path) -> Result<CentralConfig, Vec<Problem>> {
        let base = path.parent().unwrap_or(Path::new("."));
        self.resolve_paths(base);
        let problems = self.validate();
        if problems.is_empty() {
            Ok(self)
        } else {
            Err(problems)
        }
    }
}

impl CentralConfig {
    /// Reads `path`, applies the process environment's `OUTPOST_*` overrides, resolves relative
    /// paths against the file's directory and validates the result, reporting every problem at
    /// once.
    pub fn load(path: &Path) -> Result<CentralConfig, LoadConfigError> {
        Self::load_with_env(path, None)
    }

    /// As `load`, with the environment given explicitly (`None`: the process environment). Tests
    /// use this because edition 2024 makes `set_var` unsafe.
    pub fn load_with_env(
        path: &Path,
        env: Option<HashMap<String, String>>,
    ) -> Result<CentralConfig, LoadConfigError> {
        let env = match env {
            Some(env) => env.into_iter().collect(),
            None => config_load::process_env(),
        };
        config_load::load::<CentralConfig>(path, &env)
    }

    /// Makes every relative path absolute against `base` (the config file's directory).
    pub fn resolve_paths(&mut self, base: &Path) {
        for p in [
            &mut self.data_dir,
            &mut self.quic.ca_cert,
            &mut self.quic.cert,
            &mut self.quic.key,
        ] {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = base.join(&*p);
            }
        }
        if let Some(p) = &mut self.renewal.ca_dir
            && p.is_relative()
            && !p.as_os_str().is_empty()
        {
            *p = base.join(&*p);
        }
    }
}
