//! Loading: the TOML file, `BOX_BROKER_<SECTION>__<KEY>` overrides from the
//! environment (passed in, never read here), paths relative to the file,
//! then validation; and the one-line error that names where.

use std::path::Path;

use super::{AppConfig, Config, Settings};

/// The prefix of environment overrides: `BOX_BROKER_SERVER__LISTEN` sets
/// `[server] listen`; `BOX_BROKER_APPS__DEFAULT__API_BASE_URL` sets
/// `[apps.default] api_base_url`. Sections are separated by `__`.
pub const ENV_PREFIX: &str = "BOX_BROKER_";

/// The config's sections, as override names spell them.
const SECTIONS: &[&str] = &[
    "SERVER", "CACHE", "LOG", "APPS", "POLICY", "AUTH", "AUDIT", "ADMIN", "KEYSTORE", "UPSTREAM", "CENTRAL",
];

/// `BOX_BROKER_*` variables the broker's commands read that are not
/// config overrides.
const NOT_OVERRIDES: &[&str] = &[
    "BOX_BROKER_ADMIN_KEY",
    "BOX_BROKER_API_KEY",
    "BOX_BROKER_GIT_COMMIT",
    // The `kek_env` the README suggests.
    "BOX_BROKER_KEK",
];

/// A config problem: one line, naming where.
#[derive(Debug, thiserror::Error)]
#[error("{source_name}: {problem}")]
pub struct ConfigError {
    /// The file, or the file plus the environment.
    pub source_name: String,
    /// What is wrong and how to fix it.
    pub problem: String,
}

impl ConfigError {
    /// A problem with `source_name` (a file, a section, a variable).
    pub(crate) fn new(source_name: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            source_name: source_name.into(),
            problem: problem.into(),
        }
    }
}

impl Config {
    /// Warnings for `BOX_BROKER_*` variables that are set but are neither
    /// overrides nor read by a command: most likely a mistyped override
    /// (`BOX_BROKER_SERVER_LISTEN` for `BOX_BROKER_SERVER__LISTEN`).
    pub fn stray_env_warnings(&self) -> Vec<String> {
        let kek_env = self.keystore.as_ref().and_then(|k| k.kek_env.as_deref());
        stray_env_warnings(&self.other_env, kek_env)
    }

    /// Loads `path`, applies `BOX_BROKER_*` overrides from `env`, and validates.
    /// Tests pass their own `env`; nothing reads the process environment here.
    pub fn load(path: &Path, env: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        Self::parse(&read_file(path)?, path, env)
    }

    /// [`Self::load`] of `text`, as if read from `path` (which names it in
    /// errors, and whose directory relative paths are resolved against).
    /// Reads no file.
    pub fn parse(
        text: &str,
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let (table, source_name, other_env) = read_table(text, path, env)?;
        if table.contains_key("central") {
            return Err(ConfigError::new(
                &source_name,
                "this is an edge config ([central] names the central broker): run it with `box-broker edge --config`",
            ));
        }
        let mut config: Settings = deserialize(table, &source_name)?;
        let base = path.parent().unwrap_or(Path::new("."));
        for app in config.apps.values_mut() {
            app.resolve_paths(base);
        }
        if let Some(file) = &mut config.policy.file
            && file.is_relative()
        {
            *file = base.join(&*file);
        }
        for tls in [&mut config.server.tls, &mut config.admin.tls].into_iter().flatten() {
            for path in [&mut tls.cert_file, &mut tls.key_file]
                .into_iter()
                .chain(tls.client_ca_file.as_mut())
            {
                if path.is_relative() {
                    *path = base.join(&*path);
                }
            }
        }
        if let Some(k8s) = &mut config.auth.kubernetes {
            k8s.resolve_paths(base);
        }
        for key in config.auth.api_keys.iter_mut().chain(&mut config.admin.api_keys) {
            key.resolve_paths(base);
        }
        if let Some(store) = &mut config.keystore {
            for path in std::iter::once(&mut store.path).chain(store.kek_file.as_mut()) {
                resolve(path, base);
            }
        }
        if let Some(redis) = &mut config.redis {
            for path in redis
                .ca_file
                .iter_mut()
                .chain(redis.password_file.as_mut())
                .chain(redis.sentinel_password_file.as_mut())
            {
                resolve(path, base);
            }
        }
        config
            .validate()
            .map_err(|problem| ConfigError::new(&source_name, problem))?;
        Ok(Self {
            settings: config,
            other_env,
        })
    }
}

/// Warnings for `BOX_BROKER_*` variables in `other_env` that are neither
/// overrides nor read by a command (nor `kek_env`).
pub(super) fn stray_env_warnings(other_env: &[String], kek_env: Option<&str>) -> Vec<String> {
    other_env
        .iter()
        .filter(|name| !NOT_OVERRIDES.contains(&name.as_str()) && Some(name.as_str()) != kek_env)
        .filter(|name| !name.starts_with("BOX_BROKER_TEST_"))
        .map(|name| {
            let rest = &name[ENV_PREFIX.len()..];
            let hint = SECTIONS
                .iter()
                .find_map(|section| {
                    let key = rest.strip_prefix(section)?.strip_prefix('_')?;
                    (!key.is_empty()).then(|| format!(": did you mean {ENV_PREFIX}{section}__{key}?"))
                })
                .unwrap_or_default();
            format!(
                "{name} is set but is not a config override (those are {ENV_PREFIX}<SECTION>__<KEY>, \
                 with a double underscore), so it is ignored{hint}"
            )
        })
        .collect()
}

/// The text of the config file at `path`; an error names it.
pub(super) fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError::new(path.display().to_string(), format!("cannot read: {e}")))
}

/// `text` (read from `path`) as a TOML table with the `BOX_BROKER_*`
/// overrides of `env` applied; the name errors give (the file, and the
/// overrides applied); and the `BOX_BROKER_*` variables that are not overrides.
pub(super) fn read_table(
    text: &str,
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(toml::Table, String, Vec<String>), ConfigError> {
    let name = path.display().to_string();
    let mut table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::new(&name, toml_problem(&e, text)))?;
    let (overridden, other_env) = apply_env(&mut table, env)?;
    let source_name = if overridden.is_empty() {
        name
    } else {
        format!("{name} (with {})", overridden.join(", "))
    };
    Ok((table, source_name, other_env))
}

/// `table` as `T`; an error is one line naming `source_name`, never a value.
pub(super) fn deserialize<T: serde::de::DeserializeOwned>(
    table: toml::Table,
    source_name: &str,
) -> Result<T, ConfigError> {
    toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError::new(source_name, e.message().trim().replace('\n', " ")))
}

/// Makes a relative `path` relative to `base` (the config file's directory).
pub(super) fn resolve(path: &mut std::path::PathBuf, base: &Path) {
    if path.is_relative() {
        *path = base.join(&*path);
    }
}

impl AppConfig {
    fn resolve_paths(&mut self, base: &Path) {
        for path in [
            &mut self.box_config_file,
            &mut self.client_secret_file,
            &mut self.private_key_file,
            &mut self.private_key_passphrase_file,
        ]
        .into_iter()
        .flatten()
        {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
    }
}

/// One line for a TOML syntax error: the position and toml's message, but
/// never the quoted source line (which could hold a mistakenly inlined secret).
fn toml_problem(e: &toml::de::Error, text: &str) -> String {
    let position = e.span().map(|span| {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        format!("line {line}, column {column}: ")
    });
    format!(
        "{}{}",
        position.unwrap_or_default(),
        e.message().trim().replace('\n', " ")
    )
}

/// Applies `BOX_BROKER_A__B__C=value` as `a.b.c = value`. Values that parse as
/// a TOML boolean or integer become one; everything else is a string.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(Vec<String>, Vec<String>), ConfigError> {
    let (mut applied, mut other) = (Vec::new(), Vec::new());
    for (name, raw) in env {
        // Only `BOX_BROKER_<SECTION>__<KEY>`: every setting is in a section,
        // so an override always has a `__`, and a name without one is some
        // other use of the prefix (the admin CLI's BOX_BROKER_ADMIN_KEY, a
        // `kek_env` such as BOX_BROKER_KEK), never a setting.
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if !rest.contains("__") {
            other.push(name);
            continue;
        }
        let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
        if path.iter().any(String::is_empty) {
            return Err(ConfigError::new(
                &name,
                "malformed override name: use BOX_BROKER_SECTION__KEY",
            ));
        }
        let value = match raw.parse::<i64>() {
            Ok(n) => toml::Value::Integer(n),
            Err(_) => match raw.as_str() {
                "true" => toml::Value::Boolean(true),
                "false" => toml::Value::Boolean(false),
                _ => toml::Value::String(raw.clone()),
            },
        };
        let (last, parents) = path
            .split_last()
            .ok_or_else(|| ConfigError::new(&name, "empty override name"))?;
        let mut cursor = &mut *table;
        for key in parents {
            let entry = cursor
                .entry(key.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            cursor = entry
                .as_table_mut()
                .ok_or_else(|| ConfigError::new(&name, format!("`{key}` is a value, not a section")))?;
        }
        cursor.insert(last.clone(), value);
        applied.push(name);
    }
    applied.sort();
    other.sort();
    Ok((applied, other))
}
