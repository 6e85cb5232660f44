//! Simulated cars that drive like eCars' agents (profiles `short`, `medium`, `long`) and publish
//! telemetry over MQTT with rumqttc, one connection per car.
//!
//! A normal car drains its battery at a realistic 0.2–0.7 %/min while driving; a car marked as
//! malfunctioning drains at 4–6 %/min and reports `malfunction: true`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use clap::Args;
use ecars_model::device_auth::DeviceSecret;
use ecars_model::telemetry::{TelemetryTopic, Vin, LEGACY_TOPIC};
use ecars_runtime::settings::parse_millis;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, Transport};
use serde::Serialize;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// Settings of the simulator.
#[derive(Clone, Debug, Args)]
pub struct SimulatorConfig {
    /// Number of simulated cars (one MQTT connection each).
    #[arg(long = "vehicles", env = "ECARS_SIM_VEHICLES", default_value_t = 20)]
    pub vehicles: u32,
    /// Time between two readings of one car (`1s`, `200ms`); 0 publishes as fast as the broker
    /// accepts.
    #[arg(long = "interval", env = "ECARS_SIM_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub interval: Duration,
    /// The same in whole milliseconds, as earlier versions took it; wins over --interval.
    #[arg(long = "interval-ms", env = "ECARS_SIM_INTERVAL_MS", value_parser = parse_millis)]
    pub interval_ms: Option<Duration>,
    /// Broker to publish to: `mqtt://host:port` or `ws://host:port/mqtt`.
    #[arg(
        long = "broker",
        env = "ECARS_SIM_BROKER",
        default_value = "mqtt://127.0.0.1:1883"
    )]
    pub broker: String,
    /// Fleet device secret: each car logs in as its VIN with the HMAC password.
    #[arg(
        long = "device-secret",
        env = "ECARS_DEVICE_SECRET",
        hide_env_values = true
    )]
    pub device_secret: Option<String>,
    /// How many of the cars malfunction (fast battery drain, `malfunction: true`).
    #[arg(
        long = "malfunction",
        env = "ECARS_SIM_MALFUNCTION",
        default_value_t = 0
    )]
    pub malfunction: u32,
    /// Stop after this long (`90s`, `5m`, `1h`, or seconds); runs until Ctrl-C when absent.
    #[arg(long = "duration", env = "ECARS_SIM_DURATION", value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Stop each car after this many readings.
    #[arg(long = "readings-per-vehicle", env = "ECARS_SIM_READINGS_PER_VEHICLE")]
    pub readings_per_vehicle: Option<u64>,
    /// Publish on eCars' legacy `ecars/data` topic, coordinates as strings, as eCars' own
    /// simulator did (instead of `vehicles/{VIN}/telemetry`).
    #[arg(long = "legacy-topic", env = "ECARS_SIM_LEGACY_TOPIC")]
    pub legacy_topic: bool,
    /// Seed for the cars' VINs, routes and profiles (the same seed gives the same fleet).
    #[arg(long = "seed", env = "ECARS_SIM_SEED", default_value_t = 1)]
    pub seed: u64,
    /// Spread the cars' first connections evenly over this long (`5s`), as a real fleet comes
    /// online, instead of connecting them all at once.
    #[arg(long = "ramp", env = "ECARS_SIM_RAMP", value_parser = parse_duration)]
    pub ramp: Option<Duration>,
    /// How long a car that has sent all its readings waits without hearing from the broker
    /// before it gives up on the acknowledgements still missing (a loaded pipeline holds them
    /// back: backpressure, not loss).
    #[arg(long = "ack-timeout", env = "ECARS_SIM_ACK_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub ack_timeout: Duration,
    /// Run the cars' clocks this many times faster than real time (`60`: a minute of driving
    /// per second), for demos and tests of time-based detection; readings carry the cars' time.
    #[arg(long = "time-scale", env = "ECARS_SIM_TIME_SCALE", default_value_t = 1.0, value_parser = parse_time_scale)]
    pub time_scale: f64,
}

fn parse_time_scale(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if (0.001..=10_000.0).contains(&v) => Ok(v),
        _ => Err(format!("{text:?} is not a factor between 0.001 and 10000")),
    }
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        ecars_runtime::settings::defaults()
    }
}

impl SimulatorConfig {
    /// Time between two readings of one car.
    pub fn interval(&self) -> Duration {
        self.interval_ms.unwrap_or(self.interval)
    }
}

pub use ecars_runtime::settings::parse_duration;

/// Errors of the simulator.
#[derive(Debug, thiserror::Error)]
pub enum SimulatorError {
    /// The broker URL is unusable.
    #[error("invalid setting --broker / ECARS_SIM_BROKER: {0}")]
    Broker(String),
    /// More malfunctioning cars than cars.
    #[error("invalid setting --malfunction / ECARS_SIM_MALFUNCTION: {0} malfunctioning cars but only {1} cars")]
    Malfunction(u32, u32),
}

/// eCars' driving profiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// City trips.
    Short,
    /// Suburban trips.
    Medium,
    /// Highway trips.
    Long,
}

impl Profile {
    fn name(self) -> &'static str {
        match self {
            Profile::Short => "short",
            Profile::Medium => "medium",
            Profile::Long => "long",
        }
    }

    /// Cruising speed band, mph.
    fn speed_band(self) -> (f64, f64) {
        match self {
            Profile::Short => (15.0, 40.0),
            Profile::Medium => (30.0, 55.0),
            Profile::Long => (55.0, 75.0),
        }
    }
}

/// One simulated car's state.
#[derive(Clone, Debug)]
pub struct Vehicle {
    /// VIN.
    pub vin: Vin,
    /// Display name.
    pub name: String,
    /// Driving profile.
    pub profile: Profile,
    /// Whether the car malfunctions.
    pub malfunctioning: bool,
    battery: f64,
    speed: f64,
    latitude: f64,
    longitude: f64,
    heading: f64,
    charging: bool,
    rng: StdRng,
}

/// Range at 100 %, miles.
const FULL_RANGE_MILES: f64 = 260.0;

impl Vehicle {
    /// Car number `index` of a fleet seeded with `seed`.
    pub fn new(seed: u64, index: u32, malfunctioning: bool) -> Vehicle {
        let mut rng =
            StdRng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(u64::from(index)));
        let profile = match index % 3 {
            0 => Profile::Short,
            1 => Profile::Medium,
            _ => Profile::Long,
        };
        // 8 characters of a made-up manufacturer code, then 9 digits: 17 in all.
        let vin = Vin::parse(&format!(
            "5YJ3E1EA{:09}",
            u64::from(index) + seed % 1000 * 1_000_000
        ))
        .unwrap_or_else(|_| unreachable!("the VIN pattern is always 17 characters of A-Z0-9"));
        Vehicle {
            vin,
            name: format!("eCar {}", index + 1),
            profile,
            malfunctioning,
            battery: rng.random_range(60.0..100.0),
            speed: 0.0,
            // Around San Francisco, where eCars' demo drives.
            latitude: 37.7749 + rng.random_range(-0.1..0.1),
            longitude: -122.4194 + rng.random_range(-0.1..0.1),
            heading: rng.random_range(0.0..std::f64::consts::TAU),
            charging: false,
            rng,
        }
    }

    /// Advances the car by `dt` of driving and returns its reading as JSON, dated now.
    pub fn step(&mut self, dt: Duration, legacy: bool) -> serde_json::Value {
        self.step_at(dt, Utc::now(), legacy)
    }

    /// Advances the car by `dt` of driving and returns its reading as JSON, dated `date` (the
    /// car's own clock).
    pub fn step_at(
        &mut self,
        dt: Duration,
        date: chrono::DateTime<Utc>,
        legacy: bool,
    ) -> serde_json::Value {
        let minutes = dt.as_secs_f64() / 60.0;
        let (low, high) = self.profile.speed_band();
        if self.charging {
            self.speed = 0.0;
            self.battery = (self.battery + 2.0 * minutes).min(100.0);
            self.charging = self.battery < 95.0;
        } else {
            let target = self.rng.random_range(low..high);
            self.speed = (self.speed + (target - self.speed) * 0.3).clamp(0.0, high);
            // Normal: about 0.25 %/min in town to 0.6 %/min on the highway. Malfunction: 4-6 %/min.
            let drain_per_min = if self.malfunctioning {
                self.rng.random_range(4.0..6.0)
            } else {
                0.1 + self.speed / 150.0 + self.rng.random_range(0.0..0.05)
            };
            self.battery = (self.battery - drain_per_min * minutes).max(0.0);
            if self.battery < 5.0 {
                self.charging = true;
            }
            let miles = self.speed * minutes / 60.0;
            self.heading += self.rng.random_range(-0.2..0.2);
            self.latitude = (self.latitude + miles / 69.0 * self.heading.cos()).clamp(-89.9, 89.9);
            self.longitude =
                (self.longitude + miles / 54.6 * self.heading.sin()).clamp(-179.9, 179.9);
        }
        let mpge = (130.0 - self.speed * 0.5 + self.rng.random_range(-3.0..3.0)).max(60.0);
        let mut reading = serde_json::json!({
            "vin": self.vin.as_str(),
            "name": self.name,
            "profile": self.profile.name(),
            "range": round(self.battery / 100.0 * FULL_RANGE_MILES, 1),
            "mpge": round(mpge, 1),
            "battery": round(self.battery, 2),
            "malfunction": self.malfunctioning,
            "speed": round(self.speed, 1),
            "latitude": round(self.latitude, 6),
            "longitude": round(self.longitude, 6),
            // Microseconds, as precise as the store: two readings of a fast car never share a
            // date (equal bytes with an equal date are one reading sent twice).
            "date": date.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        });
        if legacy {
            // eCars' simulator sent coordinates as strings.
            reading["latitude"] = serde_json::Value::String(format!("{:.6}", self.latitude));
            reading["longitude"] = serde_json::Value::String(format!("{:.6}", self.longitude));
        }
        reading
    }
}

fn round(value: f64, digits: i32) -> f64 {
    let factor = 10f64.powi(digits);
    (value * factor).round() / factor
}

/// What a run published.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SimulatorReport {
    /// Readings handed to the MQTT client.
    pub published: u64,
    /// Readings the broker acknowledged (PUBACK).
    pub acknowledged: u64,
    /// Connection errors seen (each followed by a reconnect).
    pub connection_errors: u64,
    /// Wall time of the run, seconds.
    pub seconds: f64,
}

impl SimulatorReport {
    /// Acknowledged readings per second.
    pub fn rate(&self) -> f64 {
        if self.seconds > 0.0 {
            self.acknowledged as f64 / self.seconds
        } else {
            0.0
        }
    }
}

#[derive(Default)]
struct Counters {
    published: AtomicU64,
    acknowledged: AtomicU64,
    connection_errors: AtomicU64,
}

/// Where the cars connect.
#[derive(Clone, Debug)]
enum BrokerUrl {
    Tcp { host: String, port: u16 },
    WebSocket { url: String, port: u16 },
}

fn parse_broker(url: &str) -> Result<BrokerUrl, SimulatorError> {
    let bad = |why: &str| SimulatorError::Broker(format!("{url:?}: {why}"));
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| bad("expected mqtt://host:port or ws://host:port/path"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = authority
        .rsplit_once(':')
        .ok_or_else(|| bad("missing :port"))?;
    let port: u16 = port.parse().map_err(|_| bad("port is not a number"))?;
    match scheme {
        "mqtt" | "tcp" => Ok(BrokerUrl::Tcp {
            host: host.to_owned(),
            port,
        }),
        "ws" => Ok(BrokerUrl::WebSocket {
            url: url.to_owned(),
            port,
        }),
        other => Err(bad(&format!(
            "unsupported scheme {other:?} (use mqtt or ws)"
        ))),
    }
}

/// Drives the fleet until `shutdown`, the duration, or every car's reading count is reached.
pub async fn run(
    config: SimulatorConfig,
    shutdown: CancellationToken,
) -> Result<SimulatorReport, SimulatorError> {
    let broker = parse_broker(&config.broker)?;
    if config.malfunction > config.vehicles {
        return Err(SimulatorError::Malfunction(
            config.malfunction,
            config.vehicles,
        ));
    }
    let secret = config.device_secret.as_deref().map(DeviceSecret::new);
    let counters = Arc::new(Counters::default());
    let stop = shutdown.child_token();
    if let Some(duration) = config.duration {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(duration).await;
            stop.cancel();
        });
    }
    tracing::info!(
        vehicles = config.vehicles,
        malfunctioning = config.malfunction,
        interval_ms = config.interval().as_millis() as u64,
        broker = config.broker,
        "simulator starting"
    );
    let started = Instant::now();
    let mut cars = tokio::task::JoinSet::new();
    for index in 0..config.vehicles {
        // The last K cars malfunction, so `--vehicles 5 --malfunction 1` marks car 5.
        let vehicle = Vehicle::new(
            config.seed,
            index,
            index >= config.vehicles - config.malfunction,
        );
        let delay = config
            .ramp
            .map_or(Duration::ZERO, |ramp| ramp * index / config.vehicles);
        let car = drive(
            vehicle,
            broker.clone(),
            secret.clone(),
            config.clone(),
            Arc::clone(&counters),
            stop.clone(),
        );
        cars.spawn(async move {
            tokio::time::sleep(delay).await;
            car.await
        });
    }
    while cars.join_next().await.is_some() {}
    let report = SimulatorReport {
        published: counters.published.load(Ordering::Relaxed),
        acknowledged: counters.acknowledged.load(Ordering::Relaxed),
        connection_errors: counters.connection_errors.load(Ordering::Relaxed),
        seconds: started.elapsed().as_secs_f64(),
    };
    tracing::info!(
        published = report.published,
        acknowledged = report.acknowledged,
        connection_errors = report.connection_errors,
        seconds = format!("{:.1}", report.seconds),
        per_second = format!("{:.0}", report.rate()),
        "simulator finished"
    );
    Ok(report)
}

async fn drive(
    mut vehicle: Vehicle,
    broker: BrokerUrl,
    secret: Option<DeviceSecret>,
    config: SimulatorConfig,
    counters: Arc<Counters>,
    stop: CancellationToken,
) {
    // A car's client ids start with its VIN: with device credentials on, the gateway refuses
    // any other (so no car can take over another's session).
    let client_id = format!("{}-sim", vehicle.vin);
    let mut options = match &broker {
        BrokerUrl::Tcp { host, port } => MqttOptions::new(client_id, host.clone(), *port),
        BrokerUrl::WebSocket { url, port } => {
            let mut options = MqttOptions::new(client_id, url.clone(), *port);
            options.set_transport(Transport::Ws);
            options
        }
    };
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(1 << 20, 1 << 20)
        .set_inflight(100)
        // A persistent session, as a car that must not lose readings uses: readings in flight
        // when a connection drops are sent again after the reconnect (same payload, so the same
        // event id downstream) instead of being forgotten with a clean session.
        .set_clean_session(false);
    if let Some(secret) = &secret {
        options.set_credentials(vehicle.vin.as_str(), secret.password_for(&vehicle.vin));
    }
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    let topic = if config.legacy_topic {
        LEGACY_TOPIC.to_owned()
    } else {
        TelemetryTopic::for_vin(&vehicle.vin)
    };

    let vin = vehicle.vin.clone();
    let ack_timeout = config.ack_timeout;
    let publisher = {
        let counters = Arc::clone(&counters);
        let stop = stop.clone();
        let client = client.clone();
        async move {
            let interval = config.interval();
            let mut ticker = tokio::time::interval(interval.max(Duration::from_micros(1)));
            ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
            let mut sent = 0u64;
            let mut last = Instant::now();
            let (clock_start, wall_start) = (Utc::now(), last);
            while config.readings_per_vehicle.is_none_or(|max| sent < max) {
                if !interval.is_zero() {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = ticker.tick() => {}
                    }
                } else if stop.is_cancelled() {
                    break;
                }
                let now = Instant::now();
                let car_time = (now - wall_start).mul_f64(config.time_scale);
                let date = clock_start
                    + chrono::TimeDelta::from_std(car_time).unwrap_or(chrono::TimeDelta::MAX);
                let reading = vehicle.step_at(
                    (now - last).mul_f64(config.time_scale),
                    date,
                    config.legacy_topic,
                );
                last = now;
                let payload = reading.to_string();
                if client
                    .publish(topic.clone(), QoS::AtLeastOnce, false, payload)
                    .await
                    .is_err()
                {
                    break;
                }
                sent += 1;
                counters.published.fetch_add(1, Ordering::Relaxed);
            }
            sent
        }
    };
    let mut publisher = std::pin::pin!(publisher);
    let mut sent: Option<u64> = None;
    let mut acked = 0u64;
    loop {
        // Once publishing is over, wait for the outstanding acknowledgements (bounded).
        if let Some(total) = sent {
            if acked >= total {
                break;
            }
        }
        tokio::select! {
            total = &mut publisher, if sent.is_none() => {
                sent = Some(total);
            }
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    acked += 1;
                    counters.acknowledged.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Event::Incoming(Packet::ConnAck(ack))) if ack.code != rumqttc::ConnectReturnCode::Success => {
                    tracing::warn!(%vin, code = ?ack.code, "broker refused the car");
                    break;
                }
                Ok(_) => {}
                Err(e) => {
                    counters.connection_errors.fetch_add(1, Ordering::Relaxed);
                    if stop.is_cancelled() && sent.is_some() {
                        break;
                    }
                    tracing::debug!(%vin, error = %e, "car lost its connection; reconnecting");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = stop.cancelled(), if sent.is_some() => break,
                    }
                }
            },
            _ = tokio::time::sleep(ack_timeout), if sent.is_some() => {
                tracing::warn!(%vin, outstanding = sent.unwrap_or(0) - acked, timeout = ?ack_timeout, "acknowledgements still missing; giving up");
                break;
            }
        }
    }
    let _ = client.disconnect().await;
    // Let the DISCONNECT go out.
    let _ = tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_reads_as_a_duration_and_the_old_milliseconds_still_work() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            simulator: SimulatorConfig,
        }
        let interval = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
                .map(|cli| cli.simulator.interval())
        };
        assert_eq!(
            SimulatorConfig::default().interval(),
            Duration::from_secs(1)
        );
        assert_eq!(interval(&[]).unwrap(), Duration::from_secs(1));
        assert_eq!(
            interval(&["--interval", "200ms"]).unwrap(),
            Duration::from_millis(200)
        );
        assert_eq!(
            interval(&["--interval-ms", "25"]).unwrap(),
            Duration::from_millis(25)
        );
        assert!(interval(&["--interval", "soon"]).is_err());
    }

    #[test]
    fn broker_urls_parse() {
        assert!(matches!(
            parse_broker("mqtt://127.0.0.1:1883"),
            Ok(BrokerUrl::Tcp { port: 1883, .. })
        ));
        assert!(matches!(
            parse_broker("ws://localhost:8083/mqtt"),
            Ok(BrokerUrl::WebSocket { port: 8083, .. })
        ));
        assert!(parse_broker("http://x:1").is_err());
        assert!(parse_broker("mqtt://x").is_err());
    }

    /// Drain over one simulated minute, in %/min.
    fn drain_per_minute(vehicle: &mut Vehicle) -> f64 {
        let before = vehicle.battery;
        for _ in 0..60 {
            vehicle.step(Duration::from_secs(1), false);
        }
        before - vehicle.battery
    }

    #[test]
    fn normal_cars_drain_slowly_and_malfunctioning_cars_fast() {
        for index in 0..30 {
            let mut normal = Vehicle::new(7, index, false);
            normal.battery = 90.0;
            let drain = drain_per_minute(&mut normal);
            assert!(
                (0.05..1.0).contains(&drain),
                "normal car {index} drained {drain} %/min"
            );
            let mut faulty = Vehicle::new(7, index, true);
            faulty.battery = 90.0;
            let drain = drain_per_minute(&mut faulty);
            assert!(
                drain > 3.5,
                "malfunctioning car {index} drained only {drain} %/min"
            );
        }
    }

    #[test]
    fn readings_are_valid_telemetry_in_both_styles() {
        let mut vehicle = Vehicle::new(3, 4, true);
        for legacy in [false, true] {
            let reading = vehicle.step(Duration::from_secs(1), legacy);
            let topic = if legacy {
                TelemetryTopic::Legacy
            } else {
                TelemetryTopic::Vehicle(vehicle.vin.to_string())
            };
            let parsed = ecars_model::telemetry::parse_reading(
                &topic,
                reading.to_string().as_bytes(),
                uuid_nil(),
                Utc::now(),
            )
            .expect("simulator readings are accepted");
            assert_eq!(parsed.malfunction, Some(true));
            assert_eq!(parsed.vin, vehicle.vin);
        }
        assert!(vehicle.step(Duration::from_secs(1), true)["latitude"].is_string());
    }

    fn uuid_nil() -> uuid::Uuid {
        uuid::Uuid::nil()
    }
}
