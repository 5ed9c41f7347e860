//! Durations as the config and the CLI take them: whole seconds (`600`) or
//! milliseconds, or a duration with units (`"600s"`, `"10m"`, `"1h30m"`,
//! humantime's grammar). A leaf, so the config, the policy and the CLI can
//! all use it.

use serde::Deserializer;

/// A `*_secs` setting: whole seconds (`600`), or a duration with units
/// (`"600s"`, `"10m"`, `"1h30m"`).
pub fn de_secs<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    d.deserialize_any(DurationVisitor { unit: Unit::Secs })
}

/// An optional `*_secs` setting (see [`de_secs`]).
pub fn de_secs_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    de_secs(d).map(Some)
}

/// A `*_ms` setting: whole milliseconds (`250`), or a duration with units
/// (`"250ms"`, `"2s"`).
pub fn de_millis<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    d.deserialize_any(DurationVisitor { unit: Unit::Millis })
}

/// Parses `text` as whole seconds or a duration with units ("10m").
pub fn parse_secs(text: &str) -> Result<u64, String> {
    parse_duration(text, Unit::Secs)
}

#[derive(Clone, Copy)]
enum Unit {
    Secs,
    Millis,
}

fn parse_duration(text: &str, unit: Unit) -> Result<u64, String> {
    let text = text.trim();
    if let Ok(n) = text.parse::<u64>() {
        return Ok(n);
    }
    let (name, example) = match unit {
        Unit::Secs => ("seconds", "600, \"600s\", \"10m\" or \"1h30m\""),
        Unit::Millis => ("milliseconds", "250, \"250ms\" or \"2s\""),
    };
    let duration = humantime::parse_duration(text)
        .map_err(|e| format!("{text:?} is not a duration ({e}): give {name}, e.g. {example}"))?;
    match unit {
        Unit::Secs if duration.subsec_nanos() != 0 => {
            Err(format!("{text:?} is not a whole number of seconds: e.g. {example}"))
        }
        Unit::Secs => Ok(duration.as_secs()),
        Unit::Millis if duration.subsec_nanos() % 1_000_000 != 0 => Err(format!(
            "{text:?} is not a whole number of milliseconds: e.g. {example}"
        )),
        Unit::Millis => u64::try_from(duration.as_millis()).map_err(|_| format!("{text:?} is too long")),
    }
}

struct DurationVisitor {
    unit: Unit,
}

impl serde::de::Visitor<'_> for DurationVisitor {
    type Value = u64;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.unit {
            Unit::Secs => f.write_str("whole seconds, or a duration such as \"10m\""),
            Unit::Millis => f.write_str("whole milliseconds, or a duration such as \"2s\""),
        }
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<u64, E> {
        Ok(v)
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<u64, E> {
        u64::try_from(v).map_err(|_| E::custom(format!("{v} is negative: a duration cannot be")))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<u64, E> {
        parse_duration(v, self.unit).map_err(E::custom)
    }
}
