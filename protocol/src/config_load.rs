//! The one loader both processes read their config file with: TOML plus `OUTPOST_*` environment
//! overrides (the `config` crate), checked against the JSON schema that `schemars` derives from the
//! config struct, then handed to the process's own `validate`; every problem of every stage comes
//! back at once, each naming its key. Reads the config file and the environment; no network.
//!
//! The stages, and why each is there:
//! 1. The file and the environment are merged into one tree of `config::Value`s. A missing file or
//!    TOML that does not parse stops here ([`LoadConfigError::Read`]): there is no tree to check.
//! 2. The process may refuse forms it no longer accepts but still recognises, with its own
//!    instructions ([`ConfigFile::refuse_removed_forms`]).
//! 3. The tree is walked against the schema: a key the schema does not name is unknown, a key the
//!    schema requires is missing, a value that cannot become the field's type is wrong. Known keys
//!    are the schema's, so there is no list of keys to keep in step with the structs. Whether a value
//!    fits is decided by deserializing it alone with `config`'s own (lenient) rules, so the walk
//!    accepts exactly what the deserializer would. An unknown key is removed and a wrong or missing
//!    value is removed (the field's default applies) or, when the field has no default, replaced by
//!    a placeholder of its type, so that the struct still deserializes and `validate` can look at
//!    every other key.
//! 4. The process's `validate` ([`ConfigFile::check`]) adds its problems. Those about a key stage 2
//!    or 3 already named (or a key inside it) are dropped: they would be about a placeholder.
//!
//! Messages never quote a string value: some keys hold secrets (token hashes), and `check-config`
//! output ends up in logs. Numbers and booleans are quoted.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use config::{Value, ValueKind};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value as Json};

use crate::config_reference::{EnvNaming, enum_values, is_table, resolve, types_of};

/// Prefix of the environment variables that override config keys (`OUTPOST_SYNC__CENTRAL_ADDR`).
pub const ENV_PREFIX: &str = "OUTPOST";
/// Separator between nesting levels in an override's name (`SYNC__CENTRAL_ADDR` is
/// `sync.central_addr`).
pub const ENV_SEPARATOR: &str = "__";
/// How both processes name environment overrides: `OUTPOST_QUIC__IDLE_TIMEOUT_MS`.
pub const ENV_NAMING: EnvNaming<'static> = EnvNaming {
    prefix: ENV_PREFIX,
    separator: ENV_SEPARATOR,
};

/// One problem with one key: `quic.max_connections: must be 1..=65536, got 0`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The key's path from the top of the file, `.` between tables, `[i]` for an array element:
    /// `api.tokens[2].sha256`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// The problems found so far, in the order found; `validate` functions add to one.
#[derive(Clone, Debug, Default)]
pub struct Problems(Vec<Problem>);

impl Problems {
    pub fn add(&mut self, key: &str, message: impl fmt::Display) {
        self.0.push(Problem {
            key: key.to_string(),
            message: message.to_string(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Problem> {
        self.0.iter()
    }

    pub fn into_vec(self) -> Vec<Problem> {
        self.0
    }

    /// Whether a problem names `key` itself or a table or array that holds it.
    fn covers(&self, key: &str) -> bool {
        self.0.iter().any(|p| is_within(key, &p.key))
    }
}

/// Whether `key` is `outer` or lies inside it (`api.tokens[1].name` inside `api.tokens`).
fn is_within(key: &str, outer: &str) -> bool {
    key.strip_prefix(outer)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with('['))
}

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadConfigError {
    /// The file is missing, unreadable or not TOML: there is nothing to check key by key.
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        /// Boxed: `ConfigError` is large, and every `load` returns this type.
        source: Box<config::ConfigError>,
    },
    /// The file was read; these are all its problems.
    #[error("config {path} is invalid:\n{}", list(.problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl LoadConfigError {
    /// Every problem, one per line, each naming its key (a read error is one line of its own).
    pub fn problems(&self) -> Vec<String> {
        match self {
            LoadConfigError::Read { source, .. } => vec![source.to_string()],
            LoadConfigError::Invalid { problems, .. } => {
                problems.iter().map(ToString::to_string).collect()
            }
        }
    }
}

/// A process's config file: the struct the file deserializes into (its schema is the list of known
/// keys) and what the process makes of it once it is read.
pub trait ConfigFile: DeserializeOwned + schemars::JsonSchema {
    /// What the process runs with: the config itself, or settings built from it.
    type Checked;

    /// Refuses forms that are no longer accepted but are recognised, so that the operator is told
    /// what replaces them rather than that the value has the wrong type. Each problem's key (and
    /// what lies inside it) is then left alone by the schema check, which puts a placeholder there.
    fn refuse_removed_forms(_raw: &mut RawConfig, _problems: &mut Problems) {}

    /// Resolves relative paths against the directory of the file at `path` and validates the
    /// whole, returning every problem at once.
    fn check(self, path: &Path) -> Result<Self::Checked, Vec<Problem>>;
}

/// The merged tree of the file and the environment, before any check.
pub struct RawConfig {
    root: Value,
    /// Dotted key (`sync.central_addr`) to the variable that set it (`OUTPOST_SYNC__CENTRAL_ADDR`).
    from_env: BTreeMap<String, String>,
}

impl RawConfig {
    /// The value at `path` (`["api", "tokens"]`), if the file or the environment set it.
    pub fn get_mut(&mut self, path: &[&str]) -> Option<&mut Value> {
        let mut v = &mut self.root;
        for name in path {
            let ValueKind::Table(t) = &mut v.kind else {
                return None;
            };
            v = t.get_mut(*name)?;
        }
        Some(v)
    }

    /// The environment variable that set the key `dotted`, if one did.
    pub fn env_var(&self, dotted: &str) -> Option<&str> {
        self.from_env.get(dotted).map(String::as_str)
    }
}

/// The process's `OUTPOST_*` variables (the prefix matched without regard to case, as `config`
/// does). Variables whose name is not Unicode are skipped, as `config` skips them.
pub fn process_env() -> BTreeMap<String, String> {
    let prefix = format!("{ENV_PREFIX}_").to_lowercase();
    std::env::vars_os()
        .filter_map(|(k, v)| {
            let k = k.into_string().ok()?;
            k.to_lowercase()
                .starts_with(&prefix)
                .then(|| (k, v.to_string_lossy().into_owned()))
        })
        .collect()
}

/// Reads `path`, applies the `OUTPOST_*` overrides in `env` (the process's: [`process_env`]), checks
/// the result against `C`'s schema and `C::check`, and returns what `check` makes of it, or every
/// problem found.
pub fn load<C: ConfigFile>(
    path: &Path,
    env: &BTreeMap<String, String>,
) -> Result<C::Checked, LoadConfigError> {
    let read_err = |source| LoadConfigError::Read {
        path: path.to_path_buf(),
        source: Box::new(source),
    };
    let merged = config::Config::builder()
        .add_source(
            config::File::from(path)
                .format(config::FileFormat::Toml)
                .required(true),
        )
        .add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("_")
                .separator(ENV_SEPARATOR)
                .source(Some(
                    env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                )),
        )
        .build()
        .map_err(read_err)?;
    let mut raw = RawConfig {
        root: merged.cache,
        from_env: env_keys(env),
    };

    let mut problems = Problems::default();
    C::refuse_removed_forms(&mut raw, &mut problems);
    let schema = schemars::schema_for!(C).to_value();
    let mut walk = Walk {
        root: &schema,
        from_env: &raw.from_env,
        refused: problems.clone(),
        problems,
    };
    let top = resolve(&schema, &schema);
    walk.table("", &top, &mut raw.root);
    let mut problems = walk.problems;

    let checked = match C::deserialize(raw.root) {
        // The walk accepted every value it left, with the deserializer's own rules: a failure here
        // is a shape the walk does not know. Say so rather than lose it.
        Err(e) => {
            problems.add("(file)", e);
            None
        }
        Ok(cfg) => match cfg.check(path) {
            Ok(checked) => Some(checked),
            Err(found) => {
                let named = problems.clone();
                for p in found.into_iter().filter(|p| !named.covers(&p.key)) {
                    problems.0.push(p);
                }
                None
            }
        },
    };
    match checked {
        Some(checked) if problems.is_empty() => Ok(checked),
        _ => Err(LoadConfigError::Invalid {
            path: path.to_path_buf(),
            problems: problems.into_vec(),
        }),
    }
}

/// The dotted key each `OUTPOST_*` variable sets, as `config::Environment` derives it: prefix
/// removed, lower case, the separator read as `.`.
fn env_keys(env: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let prefix = format!("{ENV_PREFIX}_").to_lowercase();
    env.keys()
        .filter_map(|var| {
            let lower = var.to_lowercase();
            let rest = lower.strip_prefix(&prefix)?;
            Some((rest.replace(ENV_SEPARATOR, "."), var.clone()))
        })
        .collect()
}

/// One pass over the tree against the schema, collecting problems and leaving a tree that
/// deserializes.
struct Walk<'a> {
    /// The root schema, for `$ref`s.
    root: &'a Json,
    from_env: &'a BTreeMap<String, String>,
    /// Keys the process refused itself; the walk leaves them (and what is inside them) alone.
    refused: Problems,
    problems: Problems,
}

impl Walk<'_> {
    /// ` (OUTPOST_X)` when an environment variable set `key` or a key inside it, so the operator
    /// knows where to look; empty otherwise.
    fn origin(&self, key: &str) -> String {
        let vars: Vec<&str> = self
            .from_env
            .iter()
            .filter(|(k, _)| is_within(k, key))
            .map(|(_, v)| v.as_str())
            .collect();
        if vars.is_empty() {
            String::new()
        } else {
            format!(" ({})", vars.join(", "))
        }
    }

    /// Checks `value` at `key` against `schema`. False when the value cannot be used as it is (the
    /// caller removes it, or puts a placeholder in its place); a problem has then been added,
    /// unless the process refused the key already.
    fn check(&mut self, key: &str, schema: &Map<String, Json>, value: &mut Value) -> bool {
        if self.refused.covers(key) {
            return false;
        }
        if let Some(allowed) = enum_values(schema) {
            return self.one_of_values(key, &allowed, value);
        }
        let branches = schema
            .get("anyOf")
            .or_else(|| schema.get("oneOf"))
            .and_then(Json::as_array);
        if let Some(branches) = branches {
            return self.any_of(key, branches, value);
        }
        if is_table(schema) {
            return self.table(key, schema, value);
        }
        let types = types_of(schema);
        if matches!(value.kind, ValueKind::Nil) && types.iter().any(|t| t == "null") {
            return true;
        }
        match types.iter().map(String::as_str).find(|t| *t != "null") {
            Some("array") => self.array(key, schema, value),
            Some("object") => match value.kind {
                ValueKind::Table(_) => true,
                _ => {
                    let got = describe(value);
                    self.problems.add(
                        key,
                        format!("must be a table, got {got}{}", self.origin(key)),
                    );
                    false
                }
            },
            Some(scalar) => {
                let format = schema.get("format").and_then(Json::as_str);
                self.scalar(key, scalar, format, value)
            }
            None => true,
        }
    }

    /// A table: unknown keys removed, bad values removed or replaced, missing required keys
    /// replaced by placeholders. True unless the value is not a table at all.
    fn table(&mut self, key: &str, schema: &Map<String, Json>, value: &mut Value) -> bool {
        let ValueKind::Table(table) = &mut value.kind else {
            let got = describe(value);
            let origin = self.origin(key);
            self.problems
                .add(key, format!("must be a table ([{key}]), got {got}{origin}"));
            return false;
        };
        let empty = Map::new();
        let props = schema
            .get("properties")
            .and_then(Json::as_object)
            .unwrap_or(&empty);
        let required: Vec<&str> = schema
            .get("required")
            .and_then(Json::as_array)
            .map(|r| r.iter().filter_map(Json::as_str).collect())
            .unwrap_or_default();
        // Sorted, so that problems come out in the same order every time (the table is a HashMap).
        let mut names: Vec<String> = table.keys().cloned().collect();
        names.sort();
        for name in names {
            let child = join(key, &name);
            let Some(prop) = props.get(&name) else {
                if !self.refused.covers(&child) {
                    let origin = self.origin(&child);
                    self.problems.add(&child, format!("unknown key{origin}"));
                }
                table.remove(&name);
                continue;
            };
            let prop = resolve(self.root, prop);
            let v = table.get_mut(&name).expect("a key of this table");
            if !self.check(&child, &prop, v) {
                if required.contains(&name.as_str()) {
                    *v = placeholder(self.root, &prop);
                } else {
                    table.remove(&name);
                }
            }
        }
        for name in required {
            if table.contains_key(name) {
                continue;
            }
            let child = join(key, name);
            if !self.refused.covers(&child) {
                self.problems.add(&child, "is required");
            }
            let prop = props
                .get(name)
                .map(|p| resolve(self.root, p))
                .unwrap_or_default();
            table.insert(name.to_string(), placeholder(self.root, &prop));
        }
        true
    }

    /// An array: each element checked, a bad one replaced by a placeholder (removing it would
    /// renumber the elements after it, and the problems name them by index).
    fn array(&mut self, key: &str, schema: &Map<String, Json>, value: &mut Value) -> bool {
        let ValueKind::Array(items) = &mut value.kind else {
            let message = match self.from_env.iter().find(|(k, _)| *k == key) {
                // Neither process sets a list separator: a variable can only hold a scalar.
                Some((_, var)) => format!(
                    "cannot be set from the environment ({var}): a list can only be written in \
                     the config file"
                ),
                None => format!("must be an array, got {}", describe(value)),
            };
            self.problems.add(key, message);
            return false;
        };
        let Some(item) = schema.get("items").map(|i| resolve(self.root, i)) else {
            return true;
        };
        for (i, v) in items.iter_mut().enumerate() {
            if !self.check(&format!("{key}[{i}]"), &item, v) {
                *v = placeholder(self.root, &item);
            }
        }
        true
    }

    /// One of several schemas (`Option<T>` of a `$ref`: T or null). The first that takes the value
    /// without a problem wins; if none does, the first non-null one reports.
    fn any_of(&mut self, key: &str, branches: &[Json], value: &mut Value) -> bool {
        let resolved: Vec<Map<String, Json>> =
            branches.iter().map(|b| resolve(self.root, b)).collect();
        let is_null = |s: &Map<String, Json>| types_of(s) == ["null"];
        if matches!(value.kind, ValueKind::Nil) && resolved.iter().any(is_null) {
            return true;
        }
        let candidates: Vec<&Map<String, Json>> = resolved.iter().filter(|s| !is_null(s)).collect();
        if let [only] = candidates.as_slice() {
            return self.check(key, only, value);
        }
        for schema in &candidates {
            let mut trial = Walk {
                root: self.root,
                from_env: self.from_env,
                refused: self.refused.clone(),
                problems: Problems::default(),
            };
            let mut v = value.clone();
            if trial.check(key, schema, &mut v) && trial.problems.is_empty() {
                *value = v;
                return true;
            }
        }
        match candidates.first() {
            Some(first) => self.check(key, first, value),
            None => true,
        }
    }

    /// A string enumeration (`log.format`, a role).
    fn one_of_values(&mut self, key: &str, allowed: &[Json], value: &mut Value) -> bool {
        if let Ok(s) = String::deserialize(value.clone())
            && allowed.iter().any(|a| a.as_str() == Some(s.as_str()))
        {
            return true;
        }
        let names: Vec<String> = allowed
            .iter()
            .map(|a| a.as_str().map_or_else(|| a.to_string(), str::to_string))
            .collect();
        let origin = self.origin(key);
        self.problems
            .add(key, format!("must be one of {}{origin}", names.join(", ")));
        false
    }

    /// A string, number or boolean: the value must deserialize as the field's type.
    fn scalar(&mut self, key: &str, ty: &str, format: Option<&str>, value: &mut Value) -> bool {
        fn fits<T: DeserializeOwned>(v: &Value) -> bool {
            T::deserialize(v.clone()).is_ok()
        }
        let (ok, expected) = match (ty, format) {
            ("string", _) => (fits::<String>(value), "a string"),
            ("boolean", _) => (fits::<bool>(value), "true or false"),
            ("number", _) => (fits::<f64>(value), "a number"),
            ("integer", Some("uint8")) => (fits::<u8>(value), "an integer 0..=255"),
            ("integer", Some("uint16")) => (fits::<u16>(value), "an integer 0..=65535"),
            ("integer", Some("uint32")) => (fits::<u32>(value), "an integer 0..=4294967295"),
            ("integer", Some(f)) if f.starts_with("uint") => {
                (fits::<u64>(value), "a non-negative integer")
            }
            ("integer", Some("int8")) => (fits::<i8>(value), "an integer -128..=127"),
            ("integer", Some("int16")) => (fits::<i16>(value), "an integer -32768..=32767"),
            ("integer", Some("int32")) => (fits::<i32>(value), "a 32-bit integer"),
            ("integer", Some(f)) if f.starts_with("int") => (fits::<i64>(value), "an integer"),
            ("integer", _) => (fits::<i64>(value) || fits::<u64>(value), "an integer"),
            _ => (true, ""),
        };
        if !ok {
            let got = describe(value);
            let origin = self.origin(key);
            self.problems
                .add(key, format!("must be {expected}, got {got}{origin}"));
        }
        ok
    }
}

fn join(table: &str, name: &str) -> String {
    if table.is_empty() {
        name.to_string()
    } else {
        format!("{table}.{name}")
    }
}

/// What a value is, for a message: numbers and booleans as they are, strings never (a secret may
/// be one).
fn describe(v: &Value) -> String {
    match &v.kind {
        ValueKind::Nil => "nothing".to_string(),
        ValueKind::Boolean(b) => b.to_string(),
        ValueKind::I64(n) => n.to_string(),
        ValueKind::I128(n) => n.to_string(),
        ValueKind::U64(n) => n.to_string(),
        ValueKind::U128(n) => n.to_string(),
        ValueKind::Float(n) => n.to_string(),
        ValueKind::String(_) => "a string".to_string(),
        ValueKind::Table(_) => "a table".to_string(),
        ValueKind::Array(_) => "an array".to_string(),
    }
}

/// A value of `schema`'s type that deserializes, for a key without a default whose value was
/// wrong or missing: an empty string, the minimum or zero, the first allowed value, an empty
/// array, a table of placeholders. It is never used: the key's problem makes the load fail.
fn placeholder(root: &Json, schema: &Map<String, Json>) -> Value {
    let kind = if let Some(allowed) = enum_values(schema) {
        match allowed.first().and_then(Json::as_str) {
            Some(s) => ValueKind::String(s.to_string()),
            None => ValueKind::Nil,
        }
    } else if let Some(branches) = schema
        .get("anyOf")
        .or_else(|| schema.get("oneOf"))
        .and_then(Json::as_array)
    {
        let first = branches
            .iter()
            .map(|b| resolve(root, b))
            .find(|b| types_of(b) != ["null"]);
        return match first {
            Some(b) => placeholder(root, &b),
            None => Value::new(None, ValueKind::Nil),
        };
    } else if is_table(schema) {
        let mut table = config::Map::new();
        let props = schema.get("properties").and_then(Json::as_object);
        for name in schema
            .get("required")
            .and_then(Json::as_array)
            .into_iter()
            .flatten()
            .filter_map(Json::as_str)
        {
            let prop = props
                .and_then(|p| p.get(name))
                .map(|p| resolve(root, p))
                .unwrap_or_default();
            table.insert(name.to_string(), placeholder(root, &prop));
        }
        ValueKind::Table(table)
    } else {
        let min = schema.get("minimum");
        match types_of(schema)
            .iter()
            .map(String::as_str)
            .find(|t| *t != "null")
        {
            Some("string") => ValueKind::String(String::new()),
            Some("integer") => match min {
                Some(m) if m.as_i64().is_some() => ValueKind::I64(m.as_i64().unwrap_or(0)),
                Some(m) if m.as_u64().is_some() => ValueKind::U64(m.as_u64().unwrap_or(0)),
                _ => ValueKind::I64(0),
            },
            Some("number") => ValueKind::Float(min.and_then(Json::as_f64).unwrap_or(0.0)),
            Some("boolean") => ValueKind::Boolean(false),
            Some("array") => ValueKind::Array(Vec::new()),
            Some("object") => ValueKind::Table(config::Map::new()),
            _ => ValueKind::Nil,
        }
    };
    Value::new(None, kind)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Serialize;

    /// A config of the shapes both processes use: a required key, sections with defaults, a
    /// section without one, an array of tables with required keys, an enumeration, an optional
    /// key, a list.
    #[derive(Debug, Deserialize, Serialize, schemars::JsonSchema)]
    #[serde(deny_unknown_fields)]
    struct Demo {
        /// Where data lives.
        data_dir: String,
        #[serde(default)]
        net: Net,
        /// Peers.
        #[serde(default)]
        peers: Vec<Peer>,
        log: Log,
    }

    #[derive(Debug, Deserialize, Serialize, schemars::JsonSchema)]
    #[serde(deny_unknown_fields, default)]
    struct Net {
        timeout_ms: u64,
        port: u16,
        fraction: f64,
        mirror: Option<String>,
        hosts: Vec<String>,
    }

    impl Default for Net {
        fn default() -> Self {
            Net {
                timeout_ms: 500,
                port: 7601,
                fraction: 0.5,
                mirror: None,
                hosts: Vec::new(),
            }
        }
    }

    #[derive(Debug, Deserialize, Serialize, schemars::JsonSchema)]
    #[serde(deny_unknown_fields)]
    struct Peer {
        name: String,
        role: Role,
        #[serde(default)]
        weight: Option<u32>,
    }

    #[derive(Debug, Default, Deserialize, Serialize, schemars::JsonSchema, PartialEq)]
    #[serde(rename_all = "lowercase")]
    enum Role {
        #[default]
        Reader,
        Admin,
    }

    #[derive(Debug, Deserialize, Serialize, schemars::JsonSchema)]
    #[serde(deny_unknown_fields)]
    struct Log {
        #[serde(default)]
        level: Role,
    }

    impl ConfigFile for Demo {
        type Checked = Demo;

        fn refuse_removed_forms(raw: &mut RawConfig, problems: &mut Problems) {
            if let Some(v) = raw.get_mut(&["net", "old"]) {
                problems.add("net.old", "was removed: use net.timeout_ms");
                v.kind = ValueKind::Nil;
            }
        }

        /// The demo's own rules: a timeout of at most 10 s, a non-empty data_dir.
        fn check(self, _path: &Path) -> Result<Demo, Vec<Problem>> {
            let mut p = Problems::default();
            if self.net.timeout_ms > 10_000 {
                p.add("net.timeout_ms", "must be 0..=10000");
            }
            if self.data_dir.is_empty() {
                p.add("data_dir", "must not be empty");
            }
            for (i, peer) in self.peers.iter().enumerate() {
                if peer.name.is_empty() {
                    p.add(&format!("peers[{i}].name"), "must not be empty");
                }
            }
            if p.is_empty() {
                Ok(self)
            } else {
                Err(p.into_vec())
            }
        }
    }

    fn load_text(text: &str, env: &[(&str, &str)]) -> Result<Demo, LoadConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("demo.toml");
        std::fs::write(&path, text).unwrap();
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        load::<Demo>(&path, &env)
    }

    fn problems(e: LoadConfigError) -> Vec<String> {
        match e {
            LoadConfigError::Invalid { problems, .. } => {
                problems.iter().map(ToString::to_string).collect()
            }
            other => panic!("expected problems, got {other}"),
        }
    }

    const VALID: &str = "data_dir = \"d\"\n[log]\nlevel = \"admin\"\n";

    /// Goal: a valid file loads, with defaults, lenient numbers and overrides as `config` reads
    /// them.
    #[test]
    fn a_valid_file_loads() {
        let d = load_text(
            &format!("{VALID}[net]\nport = \"8080\"\n[[peers]]\nname = \"a\"\nrole = \"reader\"\n"),
            &[
                ("OUTPOST_NET__TIMEOUT_MS", "900"),
                ("OUTPOST_NET__MIRROR", "m"),
            ],
        )
        .unwrap();
        assert_eq!((d.net.timeout_ms, d.net.port), (900, 8080));
        assert_eq!(d.net.mirror.as_deref(), Some("m"));
        assert_eq!(d.peers[0].role, Role::Reader);
        assert_eq!(d.log.level, Role::Admin);
    }

    /// Goal: every kind of problem is reported at once, each by its key: unknown keys at every
    /// depth (file and environment), a missing required key and section, values of the wrong type,
    /// an unknown enumeration value, a list from the environment, and the process's own problems
    /// (except those about a key already named). Method: one file with all of them.
    #[test]
    fn every_problem_is_reported_by_its_key() {
        let text = "bogus = 1\n[net]\nport = 70000\nfraction = \"x\"\nold = 3\n\
                    [[peers]]\nname = \"a\"\nrole = \"root\"\ncolour = \"red\"\n\
                    [[peers]]\nrole = \"admin\"\nweight = -1\n";
        let all = problems(
            load_text(
                text,
                &[
                    ("OUTPOST_NET__TIMEOUT_MS", "20000"),
                    ("OUTPOST_NET__SPEED", "3"),
                    ("OUTPOST_NET__HOSTS", "a,b"),
                ],
            )
            .unwrap_err(),
        );
        let expected = [
            "net.old: was removed: use net.timeout_ms",
            "bogus: unknown key",
            "net.fraction: must be a number, got a string",
            "net.hosts: cannot be set from the environment (OUTPOST_NET__HOSTS): a list can only \
             be written in the config file",
            "net.port: must be an integer 0..=65535, got 70000",
            "net.speed: unknown key (OUTPOST_NET__SPEED)",
            "peers[0].colour: unknown key",
            "peers[0].role: must be one of reader, admin",
            "peers[1].weight: must be an integer 0..=4294967295, got -1",
            "peers[1].name: is required",
            "data_dir: is required",
            "log: is required",
            "net.timeout_ms: must be 0..=10000",
        ];
        assert_eq!(all, expected, "{all:#?}");
    }

    /// Goal: a file that is not TOML cannot be checked key by key and says so.
    #[test]
    fn unreadable_file_is_a_read_error() {
        let err = load_text("data_dir = ", &[]).unwrap_err();
        assert!(matches!(err, LoadConfigError::Read { .. }), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let err = load::<Demo>(&dir.path().join("missing.toml"), &BTreeMap::new()).unwrap_err();
        assert!(matches!(err, LoadConfigError::Read { .. }), "{err}");
    }

    /// Goal: the error's text lists the problems one per line under the file's name.
    #[test]
    fn invalid_lists_one_problem_per_line() {
        let err = load_text("data_dir = \"\"\nx = 1\n[log]\n", &[]).unwrap_err();
        let text = err.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].ends_with("is invalid:"), "{text}");
        assert_eq!(
            &lines[1..],
            ["  x: unknown key", "  data_dir: must not be empty"],
            "{text}"
        );
        assert_eq!(err.problems().len(), 2);
    }

    #[test]
    fn within() {
        assert!(is_within("api.tokens[1].name", "api.tokens"));
        assert!(is_within("api.tokens", "api.tokens"));
        assert!(is_within("api.tokens.x", "api.tokens"));
        assert!(!is_within("api.tokens_max", "api.tokens"));
        assert!(!is_within("api", "api.tokens"));
    }
}
