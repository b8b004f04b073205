//! Central's configuration: a TOML file plus `OUTPOST_*` environment overrides, validated as a
//! whole so that every problem is reported at once, each naming its key. Reads files; no sockets.
//!
//! Split along its seams: `schema` is the file as data (keys, defaults, ranges, and the reference
//! generated from them), `load` reads it with the loader both processes share, `validate` checks
//! it.

mod load;
mod schema;
mod validate;

pub use outpost_protocol::config_load::{
    ENV_NAMING, ENV_PREFIX, ENV_SEPARATOR, LoadConfigError, Problem,
};
pub use outpost_protocol::secret::{
    MAX_CLIENT_NAME_LEN, MAX_TOKEN_LEN, MIN_TOKEN_LEN, parse_sha256_hex, sha256_hex,
    valid_client_name,
};
pub use schema::*;

#[cfg(test)]
mod tests;
