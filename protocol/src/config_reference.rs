//! The configuration reference of both processes, rendered as Markdown from the JSON Schema that
//! `schemars` derives from their config structs (`outpost-agent config-reference`,
//! `outpost-central config-reference`, deploy/CONFIG.md). Pure: a schema value in, text out; no
//! I/O. Shared here because agent and central never depend on each other.
//!
//! What the schema carries, and so what the reference says, all from the config code:
//! - each key's meaning: the field's doc comment (`description`);
//! - its default: the value `load` would use when the key is absent, serialized from the same
//!   `Default` impl or `#[serde(default = ...)]` function (`default`);
//! - whether it is required: the key has no serde default (`required` of its table), or it has an
//!   empty default that validation refuses (`x-required`, set with
//!   `#[schemars(extend("x-required" = true))]`);
//! - an example value for required keys (`examples`, `#[schemars(example = ...)]`), not shown
//!   for a secret (`x-secret`, a token hash);
//! - its unit: the key's suffix (`_ms`, `_secs`, `_days`, `_bytes`, `_mib`, `_pct`, `_events`) or,
//!   for a number without one, `x-unit`;
//! - its allowed range: `minimum`/`maximum` (`#[schemars(range(min = ..., max = ...))]` naming the
//!   same constants `validate` uses); bounds relative to another key are said in the doc comment;
//! - a removed key that is still parsed only to be refused with instructions: `deprecated`.
//!
//! [`check`] names every key the reference could not describe fully (no meaning, no unit, no
//! example); each crate's tests require it to find nothing.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// How a key's environment override is named: `{prefix}_{SECTION}{separator}{KEY}`, upper case
/// (`OUTPOST_SYNC__CONNECT_TIMEOUT_MS`), as the shared loader sets up `config::Environment`
/// (`config_load::ENV_NAMING`).
#[derive(Clone, Copy, Debug)]
pub struct EnvNaming<'a> {
    pub prefix: &'a str,
    pub separator: &'a str,
}

impl EnvNaming<'_> {
    /// The variable that overrides the key at `path` (`["sync", "connect_timeout_ms"]`).
    pub fn var(&self, path: &[&str]) -> String {
        format!("{}_{}", self.prefix, path.join(self.separator)).to_uppercase()
    }
}

/// Unit implied by a key's name suffix. A key with one of these suffixes must not claim another
/// unit in `x-unit` ([`check`] reports it).
const SUFFIX_UNITS: &[(&str, &str)] = &[
    ("_ms", "ms"),
    ("_secs", "s"),
    ("_days", "days"),
    ("_bytes", "bytes"),
    ("_mib", "MiB"),
    ("_pct", "percent"),
    ("_events", "events"),
];

/// One table of the reference: the top level, a `[section]`, or an `[[array.of.tables]]`.
#[derive(Clone, Debug)]
pub struct Table {
    /// `None` for the top level; `Some("api")` for `[api]`; `Some("api.tokens")` for
    /// `[[api.tokens]]`.
    pub name: Option<String>,
    /// Whether this is an array of tables (`[[api.tokens]]`), which only a file can hold.
    pub array: bool,
    pub description: String,
    pub keys: Vec<Key>,
}

/// One key, as the reference describes it.
#[derive(Clone, Debug)]
pub struct Key {
    /// Path from the top of the file: `["sync", "connect_timeout_ms"]`; inside an array of tables
    /// the array's element is `"tokens[i]"`.
    pub path: Vec<String>,
    pub description: String,
    /// The value used when the key is absent (`None`: no default, or a removed key).
    pub default: Option<Value>,
    /// First documented example (required keys have one).
    pub example: Option<Value>,
    pub required: bool,
    /// A secret (a token hash): the reference shows no example value for it.
    pub secret: bool,
    /// A removed key, still parsed only so that `check-config` can say what replaces it.
    pub removed: bool,
    /// Explicit `x-unit`, else the unit implied by the name's suffix.
    pub unit: Option<String>,
    pub minimum: Option<Value>,
    pub maximum: Option<Value>,
    /// The values of an enumeration (`log.format`: `text`, `json`).
    pub allowed: Option<Vec<Value>>,
    /// JSON Schema type names (`integer`, `string`, `array`, `null`...).
    pub types: Vec<String>,
    /// JSON Schema format (`uint64`, `int64`, `double`...).
    pub format: Option<String>,
    /// Whether an `OUTPOST_*` variable can set the key: scalars can; arrays (and keys inside
    /// arrays of tables) cannot, as neither process sets a list separator.
    pub env_settable: bool,
    /// Whether this key is itself an array of tables, described by a [`Table`] of its own.
    pub table_array: bool,
}

impl Key {
    pub fn dotted(&self) -> String {
        self.path.join(".")
    }

    fn is_number(&self) -> bool {
        self.types.iter().any(|t| t == "integer" || t == "number")
    }
}

/// Follows a `$ref` into the root's `$defs`, merging the referring schema's own keywords (its
/// description, default...) over the definition's.
pub(crate) fn resolve(root: &Value, schema: &Value) -> Map<String, Value> {
    let mut out = Map::new();
    if let Some(r) = schema.get("$ref").and_then(Value::as_str)
        && let Some(name) = r.strip_prefix("#/$defs/")
        && let Some(def) = root.pointer(&format!("/$defs/{name}"))
    {
        out = resolve(root, def);
    }
    if let Some(obj) = schema.as_object() {
        for (k, v) in obj {
            if k != "$ref" {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    out
}

pub(crate) fn types_of(schema: &Map<String, Value>) -> Vec<String> {
    match schema.get("type") {
        Some(Value::String(t)) => vec![t.clone()],
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(|t| t.as_str().map(str::to_string))
            .collect(),
        _ if schema.contains_key("enum") || schema.contains_key("oneOf") => {
            vec!["string".to_string()]
        }
        _ => Vec::new(),
    }
}

pub(crate) fn is_table(schema: &Map<String, Value>) -> bool {
    schema.get("properties").is_some_and(Value::is_object)
}

/// Doc comments as one line: schemars keeps their line breaks.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A schema's doc comment. (Its `title` is left out: schemars sets the root's to the type name.)
fn description(schema: &Map<String, Value>) -> String {
    one_line(
        schema
            .get("description")
            .and_then(Value::as_str)
            .unwrap_or(""),
    )
}

/// Values of a string enumeration: `enum`, or `oneOf` of `const`s (when variants have docs).
pub(crate) fn enum_values(schema: &Map<String, Value>) -> Option<Vec<Value>> {
    if let Some(Value::Array(values)) = schema.get("enum") {
        return Some(values.clone());
    }
    let one_of = schema.get("oneOf")?.as_array()?;
    one_of
        .iter()
        .map(|v| {
            v.get("const")
                .cloned()
                .or_else(|| v.get("enum")?.as_array()?.first().cloned())
        })
        .collect()
}

fn unit_of(name: &str, schema: &Map<String, Value>) -> Option<String> {
    if let Some(u) = schema.get("x-unit").and_then(Value::as_str) {
        return Some(u.to_string());
    }
    SUFFIX_UNITS
        .iter()
        .find(|(suffix, _)| name.ends_with(suffix))
        .map(|(_, unit)| unit.to_string())
}

/// Every table of the config described by `schema` (a `schemars` root schema), the top level
/// first, then sections and arrays of tables by name. Keys are sorted by name within a table.
pub fn tables(schema: &Value) -> Vec<Table> {
    let root = resolve(schema, schema);
    let mut out = Vec::new();
    walk(schema, &root, &[], false, &mut out);
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn walk(
    root: &Value,
    table: &Map<String, Value>,
    path: &[String],
    in_array: bool,
    out: &mut Vec<Table>,
) {
    let required: Vec<&str> = table
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let props: BTreeMap<&String, &Value> = table
        .get("properties")
        .and_then(Value::as_object)
        .map(|p| p.iter().collect())
        .unwrap_or_default();
    let mut keys = Vec::new();
    for (name, prop) in props {
        let schema = resolve(root, prop);
        let mut key_path = path.to_vec();
        key_path.push(name.clone());
        if is_table(&schema) {
            walk(root, &schema, &key_path, in_array, out);
            continue;
        }
        let types = types_of(&schema);
        let items = schema.get("items").map(|i| resolve(root, i));
        let table_array = items.as_ref().is_some_and(is_table);
        if let Some(items) = items.as_ref().filter(|i| is_table(i)) {
            let mut element = path.to_vec();
            element.push(format!("{name}[i]"));
            let mut items = items.clone();
            // The array's own description says what each element is.
            if description(&items).is_empty() {
                items.insert("description".into(), Value::String(description(&schema)));
            }
            walk(root, &items, &element, true, out);
        }
        keys.push(Key {
            path: key_path,
            description: description(&schema),
            default: schema.get("default").cloned(),
            example: schema
                .get("examples")
                .and_then(Value::as_array)
                .and_then(|e| e.first().cloned()),
            required: required.contains(&name.as_str())
                || schema.get("x-required") == Some(&Value::Bool(true)),
            secret: schema.get("x-secret") == Some(&Value::Bool(true)),
            removed: schema.get("deprecated") == Some(&Value::Bool(true)),
            unit: unit_of(name, &schema),
            minimum: schema.get("minimum").cloned(),
            maximum: schema.get("maximum").cloned(),
            allowed: enum_values(&schema),
            env_settable: !in_array && !types.iter().any(|t| t == "array"),
            format: schema
                .get("format")
                .and_then(Value::as_str)
                .map(str::to_string),
            types,
            table_array,
        });
    }
    let name = (!path.is_empty()).then(|| {
        path.iter()
            .map(|p| p.trim_end_matches("[i]"))
            .collect::<Vec<_>>()
            .join(".")
    });
    out.push(Table {
        name,
        array: in_array && path.last().is_some_and(|p| p.ends_with("[i]")),
        description: description(table),
        keys,
    });
}

/// Every way the reference falls short of describing a key: no meaning, a number without a unit,
/// a unit that contradicts the key's suffix, a required key without an example. Empty when the
/// reference is complete.
pub fn check(schema: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    for table in tables(schema) {
        let table_name = table.name.as_deref().unwrap_or("(top level)");
        if table.description.is_empty() {
            problems.push(format!("{table_name}: the table has no doc comment"));
        }
        for key in &table.keys {
            let dotted = key.dotted();
            let name = key.path.last().map(String::as_str).unwrap_or_default();
            if key.description.is_empty() {
                problems.push(format!("{dotted}: no doc comment"));
            }
            if key.is_number() && key.unit.is_none() {
                problems.push(format!(
                    "{dotted}: a number needs a unit: a suffix ({}) or #[schemars(extend(\"x-unit\" = ...))]",
                    SUFFIX_UNITS
                        .iter()
                        .map(|(s, _)| *s)
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            if let Some((suffix, unit)) = SUFFIX_UNITS.iter().find(|(s, _)| name.ends_with(s))
                && key.unit.as_deref() != Some(unit)
            {
                problems.push(format!(
                    "{dotted}: the suffix {suffix} says {unit}, x-unit says {:?}",
                    key.unit
                ));
            }
            let no_default = key.default.as_ref().is_none_or(Value::is_null);
            if !key.removed
                && !key.table_array
                && (key.required || no_default)
                && key.example.is_none()
            {
                problems.push(format!(
                    "{dotted}: a key that is required or has no default needs #[schemars(example = ...)]"
                ));
            }
        }
    }
    problems
}

/// A config, as a JSON value of the file's shape, that sets every key (or with `required_only`,
/// only the required ones): required keys and keys without a default to their example, every
/// other key to its documented default, each array of tables to one element built the same way.
/// Removed keys are left out. Tests write it as TOML and load it: every documented default must
/// load, validate, and mean the same as leaving the key out.
pub fn example_document(schema: &Value, required_only: bool) -> Value {
    let tables = tables(schema);
    let mut doc = Map::new();
    fill(&tables, None, required_only, &mut doc);
    Value::Object(doc)
}

fn fill(tables: &[Table], name: Option<&str>, required_only: bool, into: &mut Map<String, Value>) {
    let Some(table) = tables.iter().find(|t| t.name.as_deref() == name) else {
        return;
    };
    let prefix = name.map(|n| format!("{n}.")).unwrap_or_default();
    for key in &table.keys {
        let last = key.path.last().cloned().unwrap_or_default();
        if key.removed || (required_only && !key.required) {
            continue;
        }
        let value = if key.table_array {
            let mut element = Map::new();
            fill(
                tables,
                Some(&format!("{prefix}{last}")),
                required_only,
                &mut element,
            );
            Value::Array(vec![Value::Object(element)])
        } else {
            let default = key.default.clone().filter(|d| !d.is_null());
            match (key.required, default, key.example.clone()) {
                (true, _, Some(e)) | (false, None, Some(e)) => e,
                (_, Some(d), _) => d,
                _ => continue,
            }
        };
        into.insert(last, value);
    }
    // Sections (not arrays of tables) nested directly in this table.
    for sub in tables.iter().filter(|t| !t.array) {
        let Some(sub_name) = sub.name.as_deref() else {
            continue;
        };
        let direct = match name {
            None => !sub_name.contains('.'),
            Some(n) => sub_name
                .strip_prefix(n)
                .and_then(|r| r.strip_prefix('.'))
                .is_some_and(|r| !r.contains('.')),
        };
        if direct {
            let mut section = Map::new();
            fill(tables, Some(sub_name), required_only, &mut section);
            if !section.is_empty() || !required_only {
                let last = sub_name.rsplit('.').next().unwrap_or(sub_name).to_string();
                into.insert(last, Value::Object(section));
            }
        }
    }
}

/// A value as it is written in TOML (scalars and arrays of scalars; strings JSON-escaped, which
/// TOML basic strings accept).
pub fn toml_value(v: &Value) -> String {
    match v {
        Value::Array(items) => format!(
            "[{}]",
            items.iter().map(toml_value).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(_) => "{...}".to_string(),
        other => other.to_string(),
    }
}

/// `n` with a human form in parentheses where it is a round number of a larger unit:
/// `65536 (64 KiB)`, `604800 (7 d)`.
fn humanize(n: &Value, unit: Option<&str>) -> Option<String> {
    let n = n.as_u64().filter(|n| *n > 0)?;
    let steps: &[(u64, &str)] = match unit? {
        "bytes" => &[(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")],
        "s" => &[(86_400, "d"), (3_600, "h"), (60, "min")],
        "ms" => &[(60_000, "min"), (1_000, "s")],
        "MiB" => &[(1 << 10, "GiB")],
        _ => &[],
    };
    steps
        .iter()
        .find(|(size, _)| n % size == 0)
        .map(|(size, name)| format!("{} {name}", n / size))
}

fn cell(s: &str) -> String {
    one_line(s).replace('|', "\\|")
}

fn default_cell(key: &Key) -> String {
    if key.removed {
        return "removed".to_string();
    }
    if key.required {
        return match &key.example {
            _ if key.secret => "required, secret".to_string(),
            Some(e) if !key.table_array => format!("required, e.g. `{}`", toml_value(e)),
            _ => "required".to_string(),
        };
    }
    match key.default.as_ref().filter(|d| !d.is_null()) {
        None => "unset".to_string(),
        Some(d) => match humanize(d, key.unit.as_deref()) {
            Some(h) => format!("`{}` ({h})", toml_value(d)),
            None => format!("`{}`", toml_value(d)),
        },
    }
}

fn allowed_cell(key: &Key) -> String {
    if let Some(values) = &key.allowed {
        return values
            .iter()
            .map(|v| format!("`{}`", toml_value(v)))
            .collect::<Vec<_>>()
            .join(", ");
    }
    match (&key.minimum, &key.maximum) {
        (Some(lo), Some(hi)) => format!("{lo}..={hi}"),
        (Some(lo), None) => format!("≥ {lo}"),
        (None, Some(hi)) => format!("≤ {hi}"),
        (None, None) => String::new(),
    }
}

/// One value below the documented minimum (unless the type cannot hold it) and one above the
/// documented maximum, as environment variable text: what the crates' range tests set to check
/// that `validate` enforces the range the reference shows.
pub fn outside_values(key: &Key) -> Vec<String> {
    let unsigned = key.format.as_deref().is_some_and(|f| f.starts_with("uint"));
    let mut out = Vec::new();
    for (bound, step) in [(&key.minimum, -1i64), (&key.maximum, 1)] {
        let Some(b) = bound else { continue };
        if b.is_f64() {
            out.push((b.as_f64().unwrap() + step as f64).to_string());
        } else if let Some(n) = b.as_i64() {
            if !(unsigned && n == 0 && step < 0) {
                out.push((i128::from(n) + i128::from(step)).to_string());
            }
        } else if let Some(n) = b.as_u64() {
            out.push((u128::from(n) + 1).to_string());
        }
    }
    out
}

/// The reference as Markdown: a `## {title}` heading, `intro`, then one table per section.
pub fn render(title: &str, intro: &str, schema: &Value, env: EnvNaming<'_>) -> String {
    let mut out = format!("## {title}\n\n");
    if !intro.is_empty() {
        out.push_str(&format!("{}\n\n", one_line(intro)));
    }
    for table in tables(schema) {
        let heading = match (&table.name, table.array) {
            (None, _) => "Top-level keys".to_string(),
            (Some(n), false) => format!("`[{n}]`"),
            (Some(n), true) => format!("`[[{n}]]`"),
        };
        out.push_str(&format!("### {heading}\n\n"));
        if !table.description.is_empty() {
            out.push_str(&format!("{}\n\n", one_line(&table.description)));
        }
        if table.array {
            out.push_str(
                "One table per element; an array of tables can only be written in the file, not \
                 in an environment variable.\n\n",
            );
        }
        out.push_str("| key | default | unit | allowed | environment variable | meaning |\n");
        out.push_str("| --- | --- | --- | --- | --- | --- |\n");
        for key in &table.keys {
            let path: Vec<&str> = key.path.iter().map(String::as_str).collect();
            let env_cell = if key.removed {
                "—".to_string()
            } else if key.env_settable {
                format!("`{}`", env.var(&path))
            } else {
                "file only".to_string()
            };
            let mut meaning = key.description.clone();
            if key.table_array {
                meaning.push_str(&format!(" See `[[{}]]`.", key.dotted()));
            }
            out.push_str(&format!(
                "| `{}` | {} | {} | {} | {} | {} |\n",
                key.dotted(),
                cell(&default_cell(key)),
                key.unit.as_deref().unwrap_or("—"),
                cell(&allowed_cell(key)),
                env_cell,
                cell(&meaning),
            ));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A schema of the shape schemars derives: a root with a section behind `$ref`, an array of
    /// tables, a required key, a removed key.
    fn schema() -> Value {
        json!({
            "title": "Demo",
            "description": "A demo config.",
            "type": "object",
            "properties": {
                "data_dir": {"type": "string", "description": "Where data lives.", "default": "",
                             "x-required": true, "examples": ["/var/lib/demo"]},
                "net": {"$ref": "#/$defs/Net", "default": {"timeout_ms": 500}},
            },
            "$defs": {
                "Net": {
                    "description": "`[net]`: the network.",
                    "type": "object",
                    "properties": {
                        "timeout_ms": {"type": "integer", "description": "How long.\nReally.",
                                       "default": 60000, "minimum": 50, "maximum": 600000},
                        "peers": {"type": "array", "items": {"$ref": "#/$defs/Peer"},
                                  "description": "Peers.", "default": [], "x-required": true},
                        "token": {"type": ["string", "null"], "description": "Gone.",
                                  "deprecated": true},
                    },
                },
                "Peer": {
                    "description": "One peer.",
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "description": "Its name.", "examples": ["p1"]},
                        "weight": {"type": "integer", "description": "Share | weight."}
                    },
                    "required": ["name"],
                },
            },
        })
    }

    /// Goal: tables, keys, defaults, units, ranges and environment names come out of the schema.
    #[test]
    fn renders_every_table_and_key() {
        let env = EnvNaming {
            prefix: "OUTPOST",
            separator: "__",
        };
        let md = render("Demo", "Intro.", &schema(), env);
        assert!(
            md.starts_with("## Demo\n\nIntro.\n\n### Top-level keys\n"),
            "{md}"
        );
        assert!(
            md.contains(
                "| `data_dir` | required, e.g. `\"/var/lib/demo\"` | — |  | `OUTPOST_DATA_DIR` | Where data lives. |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| `net.timeout_ms` | `60000` (1 min) | ms | 50..=600000 | `OUTPOST_NET__TIMEOUT_MS` | How long. Really. |"),
            "{md}"
        );
        assert!(md.contains("### `[[net.peers]]`\n\nOne peer."), "{md}");
        assert!(
            md.contains("| `net.peers` | required | — |  | file only |"),
            "{md}"
        );
        assert!(md.contains("| `net.token` | removed |"), "{md}");
        assert!(md.contains("Share \\| weight."), "{md}");
        let order: Vec<_> = tables(&schema()).into_iter().map(|t| t.name).collect();
        assert_eq!(
            order,
            vec![None, Some("net".into()), Some("net.peers".into())]
        );
    }

    /// Goal: `check` names a number without a unit and a required key without an example, and
    /// `example_document` sets every key but the removed one.
    #[test]
    fn check_and_example_document() {
        let problems = check(&schema());
        assert_eq!(
            problems,
            vec!["net.peers[i].weight: a number needs a unit: a suffix (_ms, _secs, _days, _bytes, _mib, _pct, _events) or #[schemars(extend(\"x-unit\" = ...))]".to_string(),
                 "net.peers[i].weight: a key that is required or has no default needs #[schemars(example = ...)]".to_string()],
        );
        assert_eq!(
            example_document(&schema(), false),
            json!({"data_dir": "/var/lib/demo", "net": {"timeout_ms": 60000, "peers": [{"name": "p1"}]}})
        );
        assert_eq!(
            example_document(&schema(), true),
            json!({"data_dir": "/var/lib/demo", "net": {"peers": [{"name": "p1"}]}})
        );
    }
}
