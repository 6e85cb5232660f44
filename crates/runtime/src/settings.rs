//! Settings helpers every service shares: logging, durations, secrets from a value or a file,
//! and the defaults of a settings struct, written once in its flags.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use clap::{Args, FromArgMatches, ValueEnum};
use tracing_subscriber::{fmt, EnvFilter};

/// How logs are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Logging settings.
#[derive(Clone, Debug, Args)]
pub struct LogConfig {
    /// Log format: `text` for people, `json` for collectors.
    #[arg(long = "log-format", env = "ECARS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub format: LogFormat,
    /// Log filter, in `tracing` EnvFilter syntax (for example `info,ecars_ingest=debug`). The
    /// embedded rumqttd logs every connection, so it is silenced unless named (`rumqttd=info`).
    #[arg(
        long = "log-level",
        env = "ECARS_LOG",
        default_value = "info,rumqttd=off",
        global = true
    )]
    pub filter: String,
}

impl LogConfig {
    /// Installs the global `tracing` subscriber. Fails when the filter does not parse.
    pub fn init(&self) -> Result<(), ConfigError> {
        let filter = EnvFilter::try_new(&self.filter).map_err(|e| ConfigError::Invalid {
            setting: "--log-level / ECARS_LOG",
            reason: e.to_string(),
        })?;
        let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
        let result = match self.format {
            LogFormat::Text => builder.try_init(),
            LogFormat::Json => builder.json().flatten_event(true).try_init(),
        };
        // A subscriber already installed (tests) is fine.
        let _ = result;
        Ok(())
    }
}

/// A setting that cannot be used, named so the operator knows what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The value is not acceptable.
    #[error("invalid setting {setting}: {reason}")]
    Invalid {
        /// The flag and environment variable.
        setting: &'static str,
        /// Why it is refused.
        reason: String,
    },
}

/// Whether an address is reachable only from this machine.
pub fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

/// Parses a duration: `500ms`, `5s`, `2m`, `1h 30m` (humantime), `1.5s`, or a plain number of
/// seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(duration) = humantime::parse_duration(text) {
        return Ok(duration);
    }
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((text, ""), |i| text.split_at(i));
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 500ms, 5s, 2m or 1h"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?} (use ms, s, m or h)"
            ))
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

/// Parses the integer milliseconds of the older `*_MS` settings (`50` is 50 ms).
pub fn parse_millis(text: &str) -> Result<Duration, String> {
    text.trim()
        .parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|_| format!("{text:?} is not a whole number of milliseconds"))
}

/// A secret given either as a value (flag or environment variable) or as a file holding it (for
/// Kubernetes and Docker secrets; a trailing newline is not part of it). `setting` names both
/// in errors, as `--x / ECARS_X`.
pub fn value_or_file(
    value: Option<&str>,
    file: Option<&Path>,
    setting: &'static str,
) -> Result<Option<String>, ConfigError> {
    match (value, file) {
        (Some(_), Some(_)) => Err(ConfigError::Invalid {
            setting,
            reason: "set either the value or the file, not both".into(),
        }),
        (Some(value), None) => Ok(Some(value.to_owned())),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map(|text| Some(text.trim_end_matches(['\n', '\r']).to_owned()))
            .map_err(|e| ConfigError::Invalid {
                setting,
                reason: format!("cannot read {}: {e}", path.display()),
            }),
        (None, None) => Ok(None),
    }
}

/// The settings struct `T` with every setting at the default its flags declare, ignoring the
/// environment: defaults are written once, in the `#[arg]` attributes, and `Default` impls and
/// tests take them from there.
///
/// Panics if a setting of `T` has neither a default nor is optional (a programming error,
/// caught by each settings struct's own test).
pub fn defaults<T: Args + FromArgMatches>() -> T {
    let command = T::augment_args(clap::Command::new("defaults"))
        .mut_args(|arg| arg.env(None))
        .no_binary_name(true);
    match command
        .try_get_matches_from(std::iter::empty::<&str>())
        .and_then(|matches| T::from_arg_matches(&matches))
    {
        Ok(settings) => settings,
        Err(e) => panic!(
            "{} has a setting without a default: {e}",
            std::any::type_name::<T>()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("5 fortnights").is_err());
        assert!(parse_duration("soon").is_err());
        assert_eq!(parse_millis("50"), Ok(Duration::from_millis(50)));
        assert!(parse_millis("50ms").is_err());
    }

    #[test]
    fn a_secret_comes_from_the_value_or_the_file_not_both() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "s3cret value\n").unwrap();
        assert_eq!(
            value_or_file(None, Some(&path), "--x / X")
                .unwrap()
                .as_deref(),
            Some("s3cret value")
        );
        assert_eq!(
            value_or_file(Some("v"), None, "--x / X")
                .unwrap()
                .as_deref(),
            Some("v")
        );
        assert_eq!(value_or_file(None, None, "--x / X").unwrap(), None);
        let both = value_or_file(Some("v"), Some(&path), "--x / X").unwrap_err();
        assert!(both.to_string().contains("--x / X"), "{both}");
        let missing = value_or_file(None, Some(&dir.path().join("nope")), "--x / X");
        assert!(missing.unwrap_err().to_string().contains("cannot read"));
    }

    #[derive(Debug, Args)]
    struct Example {
        /// `PATH` is set in every environment the tests run in: its value must not leak in.
        #[arg(long = "search", env = "PATH", default_value = "nowhere")]
        search: String,
        #[arg(long = "count", default_value_t = 7)]
        count: u32,
        #[arg(long = "wait", default_value = "2m", value_parser = parse_duration)]
        wait: Duration,
        #[arg(long = "name")]
        name: Option<String>,
    }

    #[test]
    fn defaults_come_from_the_flags_not_the_environment() {
        assert!(std::env::var_os("PATH").is_some());
        let example: Example = defaults();
        assert_eq!(example.search, "nowhere");
        assert_eq!(example.count, 7);
        assert_eq!(example.wait, Duration::from_secs(120));
        assert_eq!(example.name, None);
    }
}
