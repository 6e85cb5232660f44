//! The detection rules and how each maps to a Case, read from a TOML file whose every key has a
//! default (so an empty file, or none, gives the documented defaults).
//!
//! ```toml
//! quiet_period = "30m"          # an episode closes after this long without a firing
//!
//! [battery_drain]
//! max_percent_per_minute = 2.0  # fires when the battery falls faster than this...
//! window = "60s"                # ...over this much of the car's own time...
//! min_readings = 5              # ...seen in at least this many readings
//! priority = "High"
//!
//! [malfunction_reported]
//! priority = "Medium"
//!
//! [battery_critical]
//! below_percent = 10.0
//! priority = "High"
//!
//! [telemetry_silent]
//! enabled = true                # off by default
//! after = "10m"
//! ```

use std::fmt;
use std::path::Path;
use std::time::Duration;

use ecars_runtime::settings::parse_duration;
use serde::{Deserialize, Deserializer, Serialize};

/// A detection rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleKind {
    /// The battery falls faster than a threshold over a window.
    BatteryDrain,
    /// The car reports `malfunction: true`.
    MalfunctionReported,
    /// The battery is under a threshold.
    BatteryCritical,
    /// A car that was reporting went quiet.
    TelemetrySilent,
}

impl RuleKind {
    /// Every rule, in evaluation order.
    pub const ALL: [RuleKind; 4] = [
        RuleKind::BatteryDrain,
        RuleKind::MalfunctionReported,
        RuleKind::BatteryCritical,
        RuleKind::TelemetrySilent,
    ];

    /// The rule's name, as in the rules file, metrics and the anomaly key.
    pub fn name(self) -> &'static str {
        match self {
            RuleKind::BatteryDrain => "battery_drain",
            RuleKind::MalfunctionReported => "malfunction_reported",
            RuleKind::BatteryCritical => "battery_critical",
            RuleKind::TelemetrySilent => "telemetry_silent",
        }
    }

    /// Parses a rule name.
    pub fn parse(name: &str) -> Option<RuleKind> {
        RuleKind::ALL.into_iter().find(|r| r.name() == name)
    }
}

impl fmt::Display for RuleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a rule's episodes become Cases.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CaseMapping<'a> {
    /// Case `Priority`.
    pub priority: &'a str,
    /// Case `Subject`; `{vin}`, `{name}` and `{rule}` are replaced.
    pub subject: &'a str,
}

/// `battery_drain` settings.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatteryDrainRule {
    /// Whether the rule runs.
    pub enabled: bool,
    /// Fires when the battery falls faster than this, percent per minute.
    pub max_percent_per_minute: f64,
    /// Over this much of the car's own time.
    #[serde(deserialize_with = "duration")]
    pub window: Duration,
    /// Seen in at least this many readings.
    pub min_readings: usize,
    /// Case `Priority`.
    pub priority: String,
    /// Case `Subject`; `{vin}`, `{name}` and `{rule}` are replaced.
    pub subject: String,
}

impl Default for BatteryDrainRule {
    fn default() -> Self {
        BatteryDrainRule {
            enabled: true,
            max_percent_per_minute: 2.0,
            window: Duration::from_secs(60),
            min_readings: 5,
            priority: "High".into(),
            subject: "Battery draining fast: {name} ({vin})".into(),
        }
    }
}

/// `malfunction_reported` settings.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MalfunctionRule {
    /// Whether the rule runs.
    pub enabled: bool,
    /// Case `Priority`.
    pub priority: String,
    /// Case `Subject`; `{vin}`, `{name}` and `{rule}` are replaced.
    pub subject: String,
}

impl Default for MalfunctionRule {
    fn default() -> Self {
        MalfunctionRule {
            enabled: true,
            priority: "Medium".into(),
            subject: "Malfunction reported: {name} ({vin})".into(),
        }
    }
}

/// `battery_critical` settings.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatteryCriticalRule {
    /// Whether the rule runs.
    pub enabled: bool,
    /// Fires under this charge, percent.
    pub below_percent: f64,
    /// Case `Priority`.
    pub priority: String,
    /// Case `Subject`; `{vin}`, `{name}` and `{rule}` are replaced.
    pub subject: String,
}

impl Default for BatteryCriticalRule {
    fn default() -> Self {
        BatteryCriticalRule {
            enabled: true,
            below_percent: 10.0,
            priority: "High".into(),
            subject: "Battery critical: {name} ({vin})".into(),
        }
    }
}

/// `telemetry_silent` settings.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySilentRule {
    /// Whether the rule runs (off by default: parked cars go quiet too).
    pub enabled: bool,
    /// Fires when a car that was reporting sent nothing for this long.
    #[serde(deserialize_with = "duration")]
    pub after: Duration,
    /// Case `Priority`.
    pub priority: String,
    /// Case `Subject`; `{vin}`, `{name}` and `{rule}` are replaced.
    pub subject: String,
}

impl Default for TelemetrySilentRule {
    fn default() -> Self {
        TelemetrySilentRule {
            enabled: false,
            after: Duration::from_secs(600),
            priority: "Medium".into(),
            subject: "Telemetry silent: {name} ({vin})".into(),
        }
    }
}

/// Every rule's settings.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuleSet {
    /// An episode closes after this long without a firing (event time).
    #[serde(deserialize_with = "duration")]
    pub quiet_period: Duration,
    /// `battery_drain`.
    pub battery_drain: BatteryDrainRule,
    /// `malfunction_reported`.
    pub malfunction_reported: MalfunctionRule,
    /// `battery_critical`.
    pub battery_critical: BatteryCriticalRule,
    /// `telemetry_silent`.
    pub telemetry_silent: TelemetrySilentRule,
}

impl Default for RuleSet {
    fn default() -> Self {
        RuleSet {
            quiet_period: Duration::from_secs(30 * 60),
            battery_drain: BatteryDrainRule::default(),
            malfunction_reported: MalfunctionRule::default(),
            battery_critical: BatteryCriticalRule::default(),
            telemetry_silent: TelemetrySilentRule::default(),
        }
    }
}

/// Why a rules file is unusable.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// The file could not be read.
    #[error("invalid setting --rules / ECARS_ANOMALY_RULES: cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for the rules.
    #[error("invalid setting --rules / ECARS_ANOMALY_RULES: {path}: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// Which key and why, as the TOML parser says it.
        reason: String,
    },
}

impl RuleSet {
    /// Reads a rules file.
    pub fn load(path: &Path) -> Result<RuleSet, RulesError> {
        let text = std::fs::read_to_string(path).map_err(|source| RulesError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|reason| RulesError::Invalid {
            path: path.display().to_string(),
            reason,
        })
    }

    /// Parses rules from TOML text and checks the values make sense.
    pub fn parse(text: &str) -> Result<RuleSet, String> {
        let rules: RuleSet = toml::from_str(text).map_err(|e| e.to_string())?;
        rules.check()?;
        Ok(rules)
    }

    fn check(&self) -> Result<(), String> {
        let drain = &self.battery_drain;
        if drain.max_percent_per_minute.is_nan() || drain.max_percent_per_minute <= 0.0 {
            return Err("battery_drain.max_percent_per_minute must be above 0".into());
        }
        if drain.min_readings < 2 {
            return Err(
                "battery_drain.min_readings must be at least 2 (a slope needs two points)".into(),
            );
        }
        if drain.window.is_zero() {
            return Err("battery_drain.window must be longer than 0".into());
        }
        if !(0.0..=100.0).contains(&self.battery_critical.below_percent) {
            return Err("battery_critical.below_percent must be within 0..=100".into());
        }
        if self.quiet_period.is_zero() {
            return Err("quiet_period must be longer than 0".into());
        }
        Ok(())
    }

    /// Whether a rule runs.
    pub fn enabled(&self, rule: RuleKind) -> bool {
        match rule {
            RuleKind::BatteryDrain => self.battery_drain.enabled,
            RuleKind::MalfunctionReported => self.malfunction_reported.enabled,
            RuleKind::BatteryCritical => self.battery_critical.enabled,
            RuleKind::TelemetrySilent => self.telemetry_silent.enabled,
        }
    }

    /// How a rule's episodes become Cases.
    pub fn case_mapping(&self, rule: RuleKind) -> CaseMapping<'_> {
        let (priority, subject) = match rule {
            RuleKind::BatteryDrain => (&self.battery_drain.priority, &self.battery_drain.subject),
            RuleKind::MalfunctionReported => (
                &self.malfunction_reported.priority,
                &self.malfunction_reported.subject,
            ),
            RuleKind::BatteryCritical => (
                &self.battery_critical.priority,
                &self.battery_critical.subject,
            ),
            RuleKind::TelemetrySilent => (
                &self.telemetry_silent.priority,
                &self.telemetry_silent.subject,
            ),
        };
        CaseMapping { priority, subject }
    }
}

fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse_duration(&text).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_gives_the_documented_defaults() {
        let rules = RuleSet::parse("").unwrap();
        assert_eq!(rules, RuleSet::default());
        assert_eq!(rules.battery_drain.max_percent_per_minute, 2.0);
        assert_eq!(rules.battery_drain.window, Duration::from_secs(60));
        assert_eq!(rules.battery_drain.min_readings, 5);
        assert_eq!(rules.battery_critical.below_percent, 10.0);
        assert!(!rules.telemetry_silent.enabled);
        assert_eq!(rules.telemetry_silent.after, Duration::from_secs(600));
        assert_eq!(rules.quiet_period, Duration::from_secs(1800));
        assert_eq!(rules.case_mapping(RuleKind::BatteryDrain).priority, "High");
        assert_eq!(
            rules.case_mapping(RuleKind::BatteryCritical).priority,
            "High"
        );
    }

    #[test]
    fn a_file_overrides_single_keys() {
        let rules = RuleSet::parse(
            "quiet_period = \"10m\"\n[battery_drain]\nwindow = \"2m\"\npriority = \"Low\"\n[telemetry_silent]\nenabled = true\n",
        )
        .unwrap();
        assert_eq!(rules.quiet_period, Duration::from_secs(600));
        assert_eq!(rules.battery_drain.window, Duration::from_secs(120));
        assert_eq!(rules.battery_drain.priority, "Low");
        assert_eq!(rules.battery_drain.min_readings, 5);
        assert!(rules.telemetry_silent.enabled);
    }

    #[test]
    fn a_bad_file_names_the_key() {
        let error = RuleSet::parse("[battery_drain]\nwindw = \"2m\"\n").unwrap_err();
        assert!(error.contains("windw"), "{error}");
        let error = RuleSet::parse("[battery_drain]\nwindow = \"soon\"\n").unwrap_err();
        assert!(error.contains("soon"), "{error}");
        let error = RuleSet::parse("[battery_drain]\nmin_readings = 1\n").unwrap_err();
        assert!(error.contains("min_readings"), "{error}");
    }
}
