//! File names central and its tools agree on inside a data directory. A leaf: no I/O.

/// Name of the ready file in the data directory: written by `run` once both listeners are bound
/// (addresses, pid), read by `dev`, the CLI and the traffic simulator.
pub const READY_FILE: &str = "ready.json";
