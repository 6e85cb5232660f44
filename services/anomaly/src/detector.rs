//! Per-car detection over event time (the reading's `date`), in episodes.
//!
//! An episode opens when a rule fires and closes once the rule stayed quiet for the quiet
//! period; firings inside an open episode update it. The detector is pure: it is handed a car's
//! [`VehicleState`] and a reading and says what changed, so the worker can store the state and the
//! changes in one transaction, and a restart (or another worker after a rebalance) carries on
//! from the stored state instead of opening the episode again.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use ecars_model::{AnomalyChange, TelemetryReading, Vin};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::rules::{RuleKind, RuleSet};

/// A battery level at a moment of the car's time. Stored as `[unix ms, percent]`: a car's
/// state holds a window of these and is written with every batch, so it is kept small.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(from = "(i64, f64)", into = "(i64, f64)")]
struct BatteryPoint {
    date: DateTime<Utc>,
    percent: f64,
}

impl From<(i64, f64)> for BatteryPoint {
    fn from((ms, percent): (i64, f64)) -> Self {
        BatteryPoint {
            date: DateTime::from_timestamp_millis(ms).unwrap_or_default(),
            percent,
        }
    }
}

impl From<BatteryPoint> for (i64, f64) {
    fn from(point: BatteryPoint) -> Self {
        (point.date.timestamp_millis(), point.percent)
    }
}

/// What the detector remembers of one car.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VehicleState {
    /// The car's display name, from its newest reading.
    pub name: Option<String>,
    /// Event time of the newest reading processed: older or equal ones are duplicates or late,
    /// and never trip a rule.
    pub last_date: Option<DateTime<Utc>>,
    /// Battery levels inside the drain window.
    battery: VecDeque<BatteryPoint>,
    /// The drain fitted to `battery` as it is, while it is unchanged: a car reporting many
    /// times a second adds a point every fraction of the window, and refitting the whole
    /// window for every reading in between was most of the detector's own CPU. Not stored.
    #[serde(skip)]
    fitted: Option<Option<(f64, Duration)>>,
    /// Open episodes, one per rule at most.
    pub episodes: BTreeMap<RuleKind, Episode>,
}

/// A reading kept as evidence, with what it showed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    /// The reading's event id.
    pub event_id: Uuid,
    /// Its event time.
    pub date: DateTime<Utc>,
    /// Battery, percent.
    pub battery: Option<f64>,
    /// Speed.
    pub speed: Option<f64>,
    /// What the rule saw, in words.
    pub detail: String,
}

/// One episode of one rule on one car.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Episode {
    /// The Case's external id: VIN, rule and start, so every worker computes the same key.
    pub key: String,
    /// The rule.
    pub rule: RuleKind,
    /// Event time of the first firing.
    pub started_at: DateTime<Utc>,
    /// Event time of the newest firing.
    pub last_fired_at: DateTime<Utc>,
    /// Firings so far.
    pub firings: u64,
    /// The readings that tripped it.
    pub evidence: Vec<Evidence>,
    /// When it closed (event time), once closed.
    pub closed_at: Option<DateTime<Utc>>,
}

impl Episode {
    /// The deterministic anomaly key of an episode.
    pub fn key_for(vin: &Vin, rule: RuleKind, started_at: DateTime<Utc>) -> String {
        format!(
            "{vin}-{rule}-{}",
            started_at.to_rfc3339_opts(SecondsFormat::Millis, true)
        )
    }
}

/// A change of an episode, for the outbox and the anomalies stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpisodeChange {
    /// The car.
    pub vin: Vin,
    /// Its display name.
    pub name: Option<String>,
    /// What happened.
    pub kind: AnomalyChange,
    /// The episode after the change.
    pub episode: Episode,
}

/// Applies the rules to readings.
#[derive(Clone, Debug)]
pub struct Detector {
    rules: RuleSet,
}

impl Detector {
    /// A detector with these rules.
    pub fn new(rules: RuleSet) -> Detector {
        Detector { rules }
    }

    /// The rules.
    pub fn rules(&self) -> &RuleSet {
        &self.rules
    }

    /// Feeds one reading of the car whose state this is. A reading not newer than the newest
    /// one seen (a duplicate or a late arrival) changes nothing.
    pub fn observe(
        &self,
        state: &mut VehicleState,
        reading: &TelemetryReading,
    ) -> Vec<EpisodeChange> {
        if state.last_date.is_some_and(|last| reading.date <= last) {
            metrics::counter!(crate::metrics::READINGS_SKIPPED).increment(1);
            return Vec::new();
        }
        state.last_date = Some(reading.date);
        if reading.name.is_some() {
            state.name.clone_from(&reading.name);
        }
        let quiet = delta(self.rules.quiet_period);
        let mut changes = Vec::new();

        // A car that reports again ends its silence at once.
        if let Some(mut episode) = state.episodes.remove(&RuleKind::TelemetrySilent) {
            episode.closed_at = Some(reading.date);
            changes.push(change(
                state,
                reading.vin.clone(),
                AnomalyChange::Closed,
                episode,
            ));
        }

        let firings = self.evaluate(state, reading);
        for rule in [
            RuleKind::BatteryDrain,
            RuleKind::MalfunctionReported,
            RuleKind::BatteryCritical,
        ] {
            let fired = firings.iter().find(|(r, _)| *r == rule);
            let open = state.episodes.remove(&rule);
            match (open, fired) {
                (Some(mut episode), Some(_)) if reading.date - episode.last_fired_at <= quiet => {
                    episode.last_fired_at = reading.date;
                    episode.firings += 1;
                    state.episodes.insert(rule, episode.clone());
                    changes.push(change(
                        state,
                        reading.vin.clone(),
                        AnomalyChange::Updated,
                        episode,
                    ));
                }
                (open, Some((_, evidence))) => {
                    if let Some(mut old) = open {
                        old.closed_at = Some(old.last_fired_at + quiet);
                        changes.push(change(
                            state,
                            reading.vin.clone(),
                            AnomalyChange::Closed,
                            old,
                        ));
                    }
                    let episode = Episode {
                        key: Episode::key_for(&reading.vin, rule, reading.date),
                        rule,
                        started_at: reading.date,
                        last_fired_at: reading.date,
                        firings: 1,
                        evidence: vec![evidence.clone()],
                        closed_at: None,
                    };
                    state.episodes.insert(rule, episode.clone());
                    changes.push(change(
                        state,
                        reading.vin.clone(),
                        AnomalyChange::Opened,
                        episode,
                    ));
                }
                (Some(mut episode), None) => {
                    if reading.date - episode.last_fired_at > quiet {
                        episode.closed_at = Some(episode.last_fired_at + quiet);
                        changes.push(change(
                            state,
                            reading.vin.clone(),
                            AnomalyChange::Closed,
                            episode,
                        ));
                    } else {
                        state.episodes.insert(rule, episode);
                    }
                }
                (None, None) => {}
            }
        }
        changes
    }

    /// Checks a car that may have gone quiet, at wall-clock time `now`: opens a
    /// `telemetry_silent` episode (starting when the silence passed the threshold, so every
    /// worker computes the same key).
    pub fn sweep(
        &self,
        vin: &Vin,
        state: &mut VehicleState,
        now: DateTime<Utc>,
    ) -> Vec<EpisodeChange> {
        let rule = &self.rules.telemetry_silent;
        let Some(last) = state.last_date else {
            return Vec::new();
        };
        if !rule.enabled || state.episodes.contains_key(&RuleKind::TelemetrySilent) {
            return Vec::new();
        }
        let started_at = last + delta(rule.after);
        if started_at > now {
            return Vec::new();
        }
        let episode = Episode {
            key: Episode::key_for(vin, RuleKind::TelemetrySilent, started_at),
            rule: RuleKind::TelemetrySilent,
            started_at,
            last_fired_at: started_at,
            firings: 1,
            evidence: Vec::new(),
            closed_at: None,
        };
        state
            .episodes
            .insert(RuleKind::TelemetrySilent, episode.clone());
        vec![change(state, vin.clone(), AnomalyChange::Opened, episode)]
    }

    /// The rules that fire on this reading, with the evidence.
    fn evaluate(
        &self,
        state: &mut VehicleState,
        reading: &TelemetryReading,
    ) -> Vec<(RuleKind, Evidence)> {
        let evidence = |detail: String| Evidence {
            event_id: reading.event_id,
            date: reading.date,
            battery: reading.battery,
            speed: reading.speed,
            detail,
        };
        let mut fired = Vec::new();
        let drain = &self.rules.battery_drain;
        if let Some(percent) = reading.battery {
            // A car that reports many times a second would otherwise fill the window with
            // thousands of points, each reading refitting all of them and each batch storing them:
            // points closer than the window's resolution add nothing to a drain over minutes.
            let resolution = delta(drain.window / window_points(drain.min_readings));
            let spaced = state
                .battery
                .back()
                .is_none_or(|last| reading.date - last.date >= resolution);
            let points = state.battery.len();
            if spaced {
                // Kept to a thousandth of a percent: a car's 87.53333333333333 is 17 digits in
                // the stored state, rewritten for the car with every batch (a full window was
                // 4,123 bytes in a test, now 3,243), and digits past the third do not move a drain
                // measured in percent a minute.
                state.battery.push_back(BatteryPoint {
                    date: reading.date,
                    percent: (percent * 1000.0).round() / 1000.0,
                });
            }
            let oldest = reading.date - delta(drain.window);
            while state.battery.front().is_some_and(|p| p.date < oldest) {
                state.battery.pop_front();
            }
            if spaced || state.battery.len() != points {
                state.fitted = None;
            }
            // Too few points cannot fire: not fitted.
            if drain.enabled && state.battery.len() >= drain.min_readings {
                let fitted = *state
                    .fitted
                    .get_or_insert_with(|| drain_rate(&state.battery));
                if let Some((rate, span)) = fitted {
                    // "Sustained over the window": the readings must cover most of it.
                    let covered = span >= drain.window.mul_f64(0.75);
                    if covered && rate > drain.max_percent_per_minute {
                        let first = state.battery.front().map_or(percent, |p| p.percent);
                        fired.push((
                            RuleKind::BatteryDrain,
                            evidence(format!(
                                "battery fell {rate:.1} %/min over {:.0} s ({} readings, {first:.1} % to {percent:.1} %); limit {} %/min",
                                span.as_secs_f64(),
                                state.battery.len(),
                                drain.max_percent_per_minute
                            )),
                        ));
                    }
                }
            }
            let critical = &self.rules.battery_critical;
            if critical.enabled && percent < critical.below_percent {
                fired.push((
                    RuleKind::BatteryCritical,
                    evidence(format!(
                        "battery at {percent:.1} %, under {} %",
                        critical.below_percent
                    )),
                ));
            }
        }
        if self.rules.malfunction_reported.enabled && reading.malfunction == Some(true) {
            fired.push((
                RuleKind::MalfunctionReported,
                evidence("the car reported malfunction: true".into()),
            ));
        }
        fired
    }
}

fn change(state: &VehicleState, vin: Vin, kind: AnomalyChange, episode: Episode) -> EpisodeChange {
    EpisodeChange {
        vin,
        name: state.name.clone(),
        kind,
        episode,
    }
}

/// Battery points a drain window holds at most (and at least twice the readings a rule asks
/// for, so the rule can always be met).
fn window_points(min_readings: usize) -> u32 {
    u32::try_from(min_readings.saturating_mul(2))
        .unwrap_or(u32::MAX)
        .max(120)
}

fn delta(duration: Duration) -> TimeDelta {
    TimeDelta::from_std(duration).unwrap_or(TimeDelta::MAX)
}

/// Least-squares battery fall in percent per minute (positive = draining) and the time the
/// points span, or `None` under two points.
fn drain_rate(points: &VecDeque<BatteryPoint>) -> Option<(f64, Duration)> {
    let first = points.front()?;
    let last = points.back()?;
    if points.len() < 2 || last.date <= first.date {
        return None;
    }
    let n = points.len() as f64;
    // Minutes since the first point, from integer milliseconds: a chrono subtraction per point
    // and pass was a visible share of a busy `ecars up`'s profile (every reading refits).
    let start = first.date.timestamp_millis();
    let xs = points
        .iter()
        .map(|p| (p.date.timestamp_millis() - start) as f64 / 60_000.0);
    let mean_x = xs.clone().sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.percent).sum::<f64>() / n;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for (x, p) in xs.zip(points.iter()) {
        sxy += (x - mean_x) * (p.percent - mean_y);
        sxx += (x - mean_x) * (x - mean_x);
    }
    if sxx == 0.0 {
        return None;
    }
    let span = (last.date - first.date).to_std().ok()?;
    Some((-sxy / sxx, span))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn vin() -> Vin {
        Vin::parse("5YJ3E1EA000000001").unwrap()
    }

    fn at(seconds: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + seconds, 0).unwrap()
    }

    fn reading(seconds: i64, battery: f64, malfunction: bool) -> TelemetryReading {
        TelemetryReading {
            event_id: Uuid::now_v7(),
            received_at: at(seconds),
            vin: vin(),
            name: Some("eCar 1".into()),
            profile: None,
            range: None,
            mpge: None,
            battery: Some(battery),
            malfunction: Some(malfunction),
            speed: Some(40.0),
            latitude: None,
            longitude: None,
            date: at(seconds),
        }
    }

    /// Drives a car with readings every `step` seconds draining `per_minute`, returns changes.
    fn drive(
        detector: &Detector,
        state: &mut VehicleState,
        from: i64,
        to: i64,
        step: i64,
        start_battery: f64,
        per_minute: f64,
    ) -> Vec<EpisodeChange> {
        let mut changes = Vec::new();
        let mut t = from;
        while t < to {
            let battery = start_battery - per_minute * (t - from) as f64 / 60.0;
            changes.extend(detector.observe(state, &reading(t, battery, false)));
            t += step;
        }
        changes
    }

    fn opened(changes: &[EpisodeChange]) -> Vec<RuleKind> {
        changes
            .iter()
            .filter(|c| c.kind == AnomalyChange::Opened)
            .map(|c| c.episode.rule)
            .collect()
    }

    #[test]
    fn a_normal_drain_never_opens_an_episode() {
        let detector = Detector::new(RuleSet::default());
        let mut state = VehicleState::default();
        let changes = drive(&detector, &mut state, 0, 3600, 1, 90.0, 0.7);
        assert!(changes.is_empty(), "{changes:?}");
    }

    #[test]
    fn a_fast_drain_opens_one_episode_within_the_window_and_updates_it_after() {
        let detector = Detector::new(RuleSet::default());
        let mut state = VehicleState::default();
        let changes = drive(&detector, &mut state, 0, 300, 5, 90.0, 5.0);
        assert_eq!(opened(&changes), vec![RuleKind::BatteryDrain]);
        let first = &changes[0];
        assert!(
            first.episode.started_at <= at(60),
            "{:?}",
            first.episode.started_at
        );
        assert!(first.episode.evidence[0].detail.contains("%/min"));
        assert!(changes[1..]
            .iter()
            .all(|c| c.kind == AnomalyChange::Updated && c.episode.key == first.episode.key));
    }

    #[test]
    fn a_car_reporting_a_hundred_times_a_second_keeps_a_small_window_and_is_still_watched() {
        let detector = Detector::new(RuleSet::default());
        let mut state = VehicleState::default();
        let mut changes = Vec::new();
        for n in 0..12_000i64 {
            // 120 s of readings 10 ms apart, draining 5 %/min.
            let date = at(0) + TimeDelta::milliseconds(n * 10);
            let mut r = reading(0, 90.0 - 5.0 * (n as f64 * 0.01) / 60.0, false);
            r.date = date;
            changes.extend(detector.observe(&mut state, &r));
            assert!(state.battery.len() <= 121, "{} points", state.battery.len());
        }
        assert_eq!(opened(&changes), vec![RuleKind::BatteryDrain]);
        // The state is stored with every batch that has the car: a full window stays under a
        // 4 KiB database page (4,123 bytes with full-precision percentages).
        let stored = serde_json::to_string(&state).unwrap();
        assert!(stored.len() < 3_500, "{} bytes: {stored}", stored.len());
    }

    #[test]
    fn too_few_readings_in_the_window_do_not_count() {
        let detector = Detector::new(RuleSet::default());
        let mut state = VehicleState::default();
        // One reading every 20 s: at most 4 in a 60 s window, under the 5 required.
        let changes = drive(&detector, &mut state, 0, 600, 20, 90.0, 5.0);
        assert!(opened(&changes).is_empty(), "{changes:?}");
    }

    /// A car reporting ten times a second, its state kept in memory between readings (the fit
    /// reused while the window is unchanged) and its state stored and loaded before every
    /// reading (fitted afresh each time), gives the same changes; the drain does fire.
    #[test]
    fn a_reused_fit_decides_as_a_fresh_one() {
        let detector = Detector::new(RuleSet::default());
        let (mut kept, mut stored) = (VehicleState::default(), String::new());
        let (mut from_kept, mut from_stored) = (Vec::new(), Vec::new());
        for tenth in 0..12_000 {
            let battery = 90.0 - 3.0 * f64::from(tenth) / 600.0;
            let mut r = reading(0, battery, false);
            r.date += TimeDelta::milliseconds(i64::from(tenth) * 100);
            from_kept.extend(detector.observe(&mut kept, &r));
            let mut loaded: VehicleState = match stored.as_str() {
                "" => VehicleState::default(),
                json => serde_json::from_str(json).unwrap(),
            };
            from_stored.extend(detector.observe(&mut loaded, &r));
            stored = serde_json::to_string(&loaded).unwrap();
        }
        assert_eq!(opened(&from_kept), vec![RuleKind::BatteryDrain]);
        let dates = |changes: &[EpisodeChange]| {
            changes
                .iter()
                .map(|c| (c.kind, c.episode.last_fired_at, c.episode.firings))
                .collect::<Vec<_>>()
        };
        assert_eq!(dates(&from_kept), dates(&from_stored));
    }

    #[test]
    fn duplicates_and_late_readings_change_nothing() {
        let detector = Detector::new(RuleSet::default());
        let mut state = VehicleState::default();
        drive(&detector, &mut state, 0, 120, 5, 90.0, 0.5);
        let before = state.clone();
        // A late reading with a malfunction (and a battery that would look like a fast drain).
        let late = reading(30, 20.0, true);
        assert!(detector.observe(&mut state, &late).is_empty());
        assert!(detector.observe(&mut state, &late).is_empty());
        assert_eq!(state, before);
    }

    #[test]
    fn an_episode_closes_after_the_quiet_period_and_a_new_one_gets_a_new_key() {
        let detector = Detector::new(RuleSet::default());
        let mut state = VehicleState::default();
        let first = detector.observe(&mut state, &reading(0, 80.0, true));
        assert_eq!(opened(&first), vec![RuleKind::MalfunctionReported]);
        // Still inside the quiet period: nothing; then past it: closed.
        assert!(detector
            .observe(&mut state, &reading(600, 80.0, false))
            .is_empty());
        let closed = detector.observe(&mut state, &reading(1801, 80.0, false));
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].kind, AnomalyChange::Closed);
        assert_eq!(closed[0].episode.closed_at, Some(at(1800)));
        let again = detector.observe(&mut state, &reading(1900, 80.0, true));
        assert_eq!(opened(&again), vec![RuleKind::MalfunctionReported]);
        assert_ne!(again[0].episode.key, first[0].episode.key);
    }

    #[test]
    fn battery_critical_fires_under_ten_percent() {
        let detector = Detector::new(RuleSet::default());
        let mut state = VehicleState::default();
        assert!(detector
            .observe(&mut state, &reading(0, 10.0, false))
            .is_empty());
        let changes = detector.observe(&mut state, &reading(1, 9.9, false));
        assert_eq!(opened(&changes), vec![RuleKind::BatteryCritical]);
    }

    #[test]
    fn the_state_survives_a_round_trip_through_json_so_a_restart_reopens_nothing() {
        let detector = Detector::new(RuleSet::default());
        let mut state = VehicleState::default();
        detector.observe(&mut state, &reading(0, 80.0, true));
        let mut restored: VehicleState =
            serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
        let changes = detector.observe(&mut restored, &reading(10, 80.0, true));
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].kind, AnomalyChange::Updated);
    }

    #[test]
    fn silence_opens_an_episode_with_a_deterministic_key_and_the_next_reading_closes_it() {
        let mut rules = RuleSet::default();
        rules.telemetry_silent.enabled = true;
        let detector = Detector::new(rules);
        let mut state = VehicleState::default();
        detector.observe(&mut state, &reading(0, 80.0, false));
        assert!(detector.sweep(&vin(), &mut state, at(599)).is_empty());
        let opened = detector.sweep(&vin(), &mut state, at(700));
        assert_eq!(opened.len(), 1);
        assert_eq!(opened[0].episode.started_at, at(600));
        assert!(detector.sweep(&vin(), &mut state, at(800)).is_empty());
        let closed = detector.observe(&mut state, &reading(900, 80.0, false));
        assert_eq!(closed[0].kind, AnomalyChange::Closed);
        assert_eq!(closed[0].episode.rule, RuleKind::TelemetrySilent);
    }
}
