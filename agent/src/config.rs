//! Agent configuration: a TOML file plus `OUTPOST_*` environment overrides, checked as a whole so
//! that every problem is reported at once, each naming its key. Reads local files only (the config
//! and the certificates it names); no network.
//!
//! Split along its seams: `schema` is the file as data (keys, defaults, ranges, and the reference
//! generated from them), `load` reads it with the loader both processes share, `validate` checks
//! it and builds the settings the agent runs with.

mod load;
mod schema;
mod validate;

pub use load::{load, load_with_env};
pub use outpost_protocol::config_load::{
    ENV_NAMING, ENV_PREFIX, ENV_SEPARATOR, LoadConfigError, Problem,
};
pub use outpost_protocol::secret::{
    MAX_CLIENT_NAME_LEN, MAX_TOKEN_LEN, MIN_TOKEN_LEN, check_token, hash_token, parse_sha256_hex,
    to_hex, valid_client_name,
};
pub use schema::*;
pub use validate::*;

#[cfg(test)]
pub(crate) mod tests;
