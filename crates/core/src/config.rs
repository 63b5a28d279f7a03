//! Typed configuration: a TOML file, then `SHOAL_*` environment overrides.
//!
//! Every config struct in shoal is `#[serde(deny_unknown_fields)]`, so a typo in a key,
//! in the file or in an environment variable, is an error at start that names the key,
//! never a silent default.
//!
//! Environment mapping: `SHOAL_LISTEN` sets `listen`; a double underscore descends
//! into a table, so `SHOAL_DATABASE__URL` sets `database.url`. Values `true`/`false`
//! become booleans, whole numbers become integers, values starting with `[` are read as
//! TOML arrays, everything else is a string. `SHOAL_CONFIG` is not a key: it names the
//! file (see [`CONFIG_ENV`]).

use crate::Error;
use serde::de::DeserializeOwned;
use std::path::Path;

/// The environment variable that names the config file.
pub const CONFIG_ENV: &str = "SHOAL_CONFIG";
/// The prefix of override variables.
pub const ENV_PREFIX: &str = "SHOAL_";

/// Load `T` from an optional TOML file plus the `SHOAL_*` variables in `env`.
///
/// Pass `std::env::vars()` in production; tests pass a list, so no test depends on or
/// changes the process environment.
pub fn load<T: DeserializeOwned>(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T, Error> {
    let (text, origin) = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                Error::config(format!("cannot read config file {}", path.display())).with_source(e)
            })?;
            (text, format!("config file {}", path.display()))
        }
        None => (String::new(), "built-in defaults".to_string()),
    };
    load_str(&text, &origin, env)
}

/// Like [`load`], from TOML text; `origin` names where the text came from in errors.
pub fn load_str<T: DeserializeOwned>(
    text: &str,
    origin: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T, Error> {
    let mut overrides: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k != CONFIG_ENV)
        .collect();
    overrides.sort();
    if overrides.is_empty() {
        // Straight from the text, so errors carry line and column.
        return toml::from_str(text).map_err(|e| Error::config(format!("{origin}: {e}")));
    }
    let mut root: toml::Table =
        toml::from_str(text).map_err(|e| Error::config(format!("{origin}: {e}")))?;
    let names: Vec<&str> = overrides.iter().map(|(k, _)| k.as_str()).collect();
    for (key, value) in &overrides {
        set_path(&mut root, key, value)?;
    }
    toml::Value::Table(root)
        .try_into()
        .map_err(|e: toml::de::Error| {
            Error::config(format!(
                "{origin} with environment overrides {}: {}",
                names.join(", "),
                e.message().trim()
            ))
        })
}

fn set_path(root: &mut toml::Table, var: &str, raw: &str) -> Result<(), Error> {
    let path: Vec<String> = var[ENV_PREFIX.len()..]
        .split("__")
        .map(|s| s.to_ascii_lowercase())
        .collect();
    if path.iter().any(|p| p.is_empty()) {
        return Err(Error::config(format!(
            "environment variable {var}: empty key segment"
        )));
    }
    let mut table = root;
    for segment in &path[..path.len() - 1] {
        let entry = table
            .entry(segment.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = match entry {
            toml::Value::Table(t) => t,
            _ => {
                return Err(Error::config(format!(
                    "environment variable {var}: {segment} is not a table"
                )))
            }
        };
    }
    let last = path[path.len() - 1].clone();
    table.insert(last, parse_value(var, raw)?);
    Ok(())
}

fn parse_value(var: &str, raw: &str) -> Result<toml::Value, Error> {
    if raw == "true" || raw == "false" {
        return Ok(toml::Value::Boolean(raw == "true"));
    }
    if let Ok(i) = raw.parse::<i64>() {
        return Ok(toml::Value::Integer(i));
    }
    if raw.trim_start().starts_with('[') {
        let t: toml::Table = toml::from_str(&format!("v = {raw}")).map_err(|e| {
            Error::config(format!("environment variable {var}: not a TOML array: {e}"))
        })?;
        if let Some(v) = t.get("v") {
            return Ok(v.clone());
        }
    }
    Ok(toml::Value::String(raw.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Db {
        url: String,
        #[serde(default)]
        max_connections: u32,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        listen: String,
        #[serde(default)]
        verbose: bool,
        #[serde(default)]
        tags: Vec<String>,
        db: Option<Db>,
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn file_then_environment() {
        let cfg: Cfg = load_str(
            "listen = \"127.0.0.1:1\"\n[db]\nurl = \"a\"\n",
            "test",
            env(&[
                ("SHOAL_LISTEN", "127.0.0.1:2"),
                ("SHOAL_DB__MAX_CONNECTIONS", "7"),
                ("SHOAL_VERBOSE", "true"),
                ("SHOAL_TAGS", "[\"x\", \"y\"]"),
                ("SHOAL_CONFIG", "ignored.toml"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:2");
        assert!(cfg.verbose);
        assert_eq!(cfg.tags, vec!["x", "y"]);
        assert_eq!(
            cfg.db,
            Some(Db {
                url: "a".into(),
                max_connections: 7
            })
        );
    }

    #[test]
    fn unknown_key_in_file_is_named_with_its_line() {
        let err = load_str::<Cfg>("listen = \"x\"\nlisten_port = 3\n", "shoal.toml", env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen_port"), "{err}");
        assert!(err.contains("shoal.toml"), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn unknown_environment_key_is_named() {
        let err = load_str::<Cfg>("listen = \"x\"", "f", env(&[("SHOAL_LISTN", "y")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("SHOAL_LISTN") && err.contains("listn"),
            "{err}"
        );
    }

    #[test]
    fn wrong_type_is_an_error() {
        let err = load_str::<Cfg>("listen = 5", "f", env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen") || err.contains("string"), "{err}");
        assert!(load_str::<Cfg>("listen = \"x\"", "f", env(&[("SHOAL_VERBOSE", "yes")])).is_err());
    }

    #[test]
    fn missing_file_is_named() {
        let err = load::<Cfg>(Some(Path::new("/nonexistent/x.toml")), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/x.toml"), "{err}");
    }
}
