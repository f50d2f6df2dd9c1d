//! The configuration's keys: which exist (those of the defaults, each sink's section
//! included), which were given, and the environment overrides `OUTBOXD_<SECTION>__<KEY>`
//! applied to the file's table before it is read into [`Config`](super::Config).
//!
//! A key the defaults do not have is an error that names it and the keys of its section;
//! free-form tables (a sink's `OPEN_TABLES`, such as `sink.kafka.options`) take any key. An
//! override gets the type of the key's default: integers, booleans, comma-separated lists,
//! text.

use outboxd_sinks::SinkSections;

use super::{Config, ConfigError, ENV_PREFIX};

/// The dotted keys of `table` (under `prefix`), sections and values alike.
pub(super) fn given_keys(table: &toml::Table, prefix: &str) -> Vec<String> {
    let mut keys = Vec::new();
    for (key, value) in table {
        let dotted = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        if let toml::Value::Table(t) = value {
            keys.extend(given_keys(t, &dotted));
        }
        keys.push(dotted);
    }
    keys
}

pub(super) fn defaults_table() -> toml::Table {
    match toml::Table::try_from(Config::default()) {
        Ok(t) => t,
        Err(e) => unreachable!("the default configuration serializes: {e}"),
    }
}

pub(super) fn one_line(s: &str) -> String {
    s.split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('|') && !l.chars().all(|c| c == '^'))
        .collect::<Vec<_>>()
        .join("; ")
}

pub(super) fn check_keys(
    table: &toml::Table,
    defaults: &toml::Table,
    prefix: &str,
    origin: &str,
) -> Result<(), ConfigError> {
    for (key, value) in table {
        let dotted = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        if open_tables().contains(&dotted) {
            continue;
        }
        match (defaults.get(key), value) {
            (None, _) => {
                return Err(ConfigError::UnknownKey {
                    key: dotted,
                    origin: origin.to_owned(),
                    hint: known_keys(defaults, prefix),
                });
            }
            (Some(toml::Value::Table(d)), toml::Value::Table(t)) => {
                check_keys(t, d, &dotted, origin)?;
            }
            _ => {}
        }
    }
    Ok(())
}

fn known_keys(defaults: &toml::Table, prefix: &str) -> String {
    let keys: Vec<&str> = defaults.keys().map(String::as_str).collect();
    let section = if prefix.is_empty() {
        "the top level".to_owned()
    } else {
        format!("[{prefix}]")
    };
    format!(" (known keys in {section}: {})", keys.join(", "))
}

pub(super) fn apply_env(
    table: &mut toml::Table,
    defaults: &toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k.contains("__"))
        .collect();
    vars.sort();
    let open = open_tables();
    for (var, raw) in vars {
        let path: Vec<String> = var[ENV_PREFIX.len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        let dotted = path.join(".");
        // Walk the defaults to find the key's type; open sections take any string.
        let mut expected = Some(defaults);
        let mut kind = None;
        for (i, part) in path.iter().enumerate() {
            let here = path[..i].join(".");
            if open.contains(&here) {
                kind = Some(toml::Value::String(String::new()));
                break;
            }
            match expected.and_then(|t| t.get(part)) {
                Some(toml::Value::Table(t)) if i + 1 < path.len() => expected = Some(t),
                Some(v) if i + 1 == path.len() && !v.is_table() => kind = Some(v.clone()),
                _ => break,
            }
        }
        let Some(kind) = kind else {
            return Err(ConfigError::UnknownKey {
                key: dotted,
                origin: format!("environment variable {var}"),
                hint: String::new(),
            });
        };
        let invalid = |what: &str| ConfigError::Invalid {
            origin: format!("environment variable {var}"),
            message: format!("{dotted} must be {what}, got {raw:?}"),
        };
        let value = match kind {
            toml::Value::Integer(_) => {
                toml::Value::Integer(raw.trim().parse().map_err(|_| invalid("an integer"))?)
            }
            toml::Value::Boolean(_) => toml::Value::Boolean(match raw.trim() {
                "true" | "1" | "yes" | "on" => true,
                "false" | "0" | "no" | "off" => false,
                _ => return Err(invalid("true or false")),
            }),
            toml::Value::Array(_) => toml::Value::Array(
                raw.split(',')
                    .map(str::trim)
                    .filter(|item| !item.is_empty())
                    .map(|item| toml::Value::String(item.to_owned()))
                    .collect(),
            ),
            _ => toml::Value::String(raw.clone()),
        };
        // Set it, creating sections on the way.
        let (last, sections) = path.split_last().expect("the path has at least one part");
        let mut at = &mut *table;
        for section in sections {
            let entry = at
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            at = match entry {
                toml::Value::Table(t) => t,
                _ => return Err(invalid("a section")),
            };
        }
        at.insert(last.clone(), value);
    }
    Ok(())
}

/// Tables whose keys are free names: the sinks' pass-through options and `[route.headers]`.
pub(super) fn open_tables() -> Vec<String> {
    let mut open = SinkSections::open_tables();
    open.push("route.headers".into());
    open
}
