//! Settings shared by every service, and logging set-up.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, ValueEnum};
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

/// Parses `90s`, `5m`, `1h`, `250ms` or a plain number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((text, ""), |i| text.split_at(i));
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 90s, 5m or 1h"))?;
    let seconds = match unit {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (use ms, s, m or h)"
            ))
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}
