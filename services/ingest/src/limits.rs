//! How many cars fit: the process's descriptor limit, raised to what the system allows, and the
//! connection limit derived from it. (What happens when the descriptors run out anyway is
//! `ecars_runtime::accept`, shared with the HTTP listener.)

use ecars_runtime::settings::ConfigError;

/// Descriptors kept for everything but MQTT clients: the database pool, Kafka, the HTTP API and
/// its WebSockets, the embedded broker's own listeners and links, log files.
pub const RESERVED_DESCRIPTORS: u64 = 1024;

/// Raises the process's soft descriptor limit to its hard limit and returns the limit now in
/// force. A car costs one descriptor; the default soft limit (often 1024) would cap the fleet
/// long before memory does.
pub fn raise_descriptor_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            let current = rlimit::getrlimit(rlimit::Resource::NOFILE)
                .map(|(soft, _)| soft)
                .unwrap_or(1024);
            tracing::warn!(error = %e, current, "cannot raise the descriptor limit");
            current
        }
    }
}

/// The MQTT connection limit: `requested` if the descriptors allow it, otherwise an error that
/// names the setting; without a request, what the descriptors allow after the reserve.
pub fn connection_limit(requested: Option<usize>, descriptors: u64) -> Result<usize, ConfigError> {
    let available = descriptors.saturating_sub(RESERVED_DESCRIPTORS);
    match requested {
        None if available == 0 => Err(ConfigError::Invalid {
            setting: "the descriptor limit (ulimit -n)",
            reason: format!(
                "{descriptors} descriptors leave none for MQTT clients after {RESERVED_DESCRIPTORS} reserved; raise it"
            ),
        }),
        None => Ok(usize::try_from(available).unwrap_or(usize::MAX)),
        Some(n) if n as u64 <= available => Ok(n),
        Some(n) => Err(ConfigError::Invalid {
            setting: "--mqtt-max-connections / ECARS_MQTT_MAX_CONNECTIONS",
            reason: format!(
                "{n} connections need {} descriptors, but this process may open {descriptors} (ulimit -n); lower the setting to at most {available} or raise the limit",
                n as u64 + RESERVED_DESCRIPTORS
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_comes_from_the_descriptors_unless_set_and_a_setting_that_cannot_fit_is_refused() {
        assert_eq!(connection_limit(None, 20_000).unwrap(), 20_000 - 1024);
        assert_eq!(connection_limit(Some(5_000), 20_000).unwrap(), 5_000);
        let error = connection_limit(Some(20_000), 20_000).unwrap_err();
        assert!(
            error.to_string().contains("--mqtt-max-connections")
                && error.to_string().contains("18976"),
            "{error}"
        );
        assert!(connection_limit(None, 1000).is_err());
    }
}
