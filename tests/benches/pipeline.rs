//! Benchmark: MQTT publish to committed row, end to end, through the real broker into SQLite
//! and a throwaway PostgreSQL server, with 1,000 simulated cars (one MQTT connection each).
//!
//! - throughput: every car publishes as fast as the pipeline acknowledges (QoS 1); readings per
//!   second from the first publish to the last committed row;
//! - latency: the fleet publishes at a fixed rate; each reading's `date` is its publish time,
//!   and the persistence worker reports each committed batch, so commit time minus `date` is
//!   the publish-to-row latency.
//!
//! Run: `cargo bench -p ecars-e2e --bench pipeline` (options: `--quick`, `--only sqlite|postgres`,
//! `--without-anomaly`: leave the anomaly worker out, to see what it costs the write path;
//! `--timeline`: print each second of the latency run, rows committed, their worst latency, the
//! sensor-row and detector commits' count and mean duration and the rollup batches applied, to
//! see when a run falls behind and why).
//! Results are printed and written to `bench-results/pipeline.json`.

use std::time::{Duration, Instant};

use chrono::Utc;
use ecars_e2e::{PgServer, Pipeline, PipelineOptions};
use ecars_simulator::SimulatorConfig;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Readings taken in the first seconds of a latency run are not measured.
const WARMUP_SECONDS: i64 = 3;

struct Throughput {
    readings: u64,
    seconds: f64,
}

struct Latency {
    rate: u64,
    readings: usize,
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

/// What is measured: `ecars up`'s composition, with or without its anomaly worker.
#[derive(Clone, Copy)]
struct Composition {
    anomaly: bool,
}

async fn start(
    database_url: &str,
    composition: Composition,
) -> (Pipeline, mpsc::Receiver<Vec<ecars_model::TelemetryReading>>) {
    let (tx, rx) = mpsc::channel(1024);
    let mut options = PipelineOptions::new(database_url);
    options.observer = Some(tx);
    if !composition.anomaly {
        options.anomaly = None;
    }
    (Pipeline::start(options).await.expect("pipeline starts"), rx)
}

async fn throughput(
    database_url: &str,
    composition: Composition,
    vehicles: u32,
    per_vehicle: u64,
) -> Throughput {
    let (pipeline, mut committed) = start(database_url, composition).await;
    let total = u64::from(vehicles) * per_vehicle;
    let config = SimulatorConfig {
        vehicles,
        interval: Duration::ZERO,
        broker: format!("mqtt://{}", pipeline.mqtt_addr),
        readings_per_vehicle: Some(per_vehicle),
        ..SimulatorConfig::default()
    };
    let started = Instant::now();
    let simulator = tokio::spawn(ecars_simulator::run(config, CancellationToken::new()));
    let mut rows = 0u64;
    while rows < total {
        match tokio::time::timeout(Duration::from_secs(60), committed.recv()).await {
            Ok(Some(batch)) => rows += batch.len() as u64,
            _ => panic!("stalled at {rows}/{total} rows"),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let report = simulator.await.expect("simulator task").expect("simulator");
    assert_eq!(report.acknowledged, total, "every reading acknowledged");
    assert_eq!(
        pipeline.db.sensor_rows().count().await.unwrap() as u64,
        total,
        "every reading stored once"
    );
    pipeline.shutdown().await.unwrap();
    Throughput {
        readings: total,
        seconds,
    }
}

/// One second of a latency run, by commit time (`--timeline`).
#[derive(Default)]
struct Second {
    rows: u64,
    max_ms: f64,
    /// What the process's metrics grew by in this second.
    metrics: Sample,
}

/// The counters `--timeline` follows: sensor-row and detector commits (count, seconds) and the
/// rollup batches applied.
#[derive(Default, Clone, Copy)]
struct Sample {
    sensor_batches: f64,
    sensor_seconds: f64,
    detector_batches: f64,
    detector_seconds: f64,
    rollup_batches: f64,
}

impl Sample {
    fn now() -> Sample {
        let commits = |table: &str| {
            let filter = format!("table=\"{table}\"");
            (
                ecars_e2e::metric_sum("ecars_batch_write_seconds_count", &filter),
                ecars_e2e::metric_sum("ecars_batch_write_seconds_sum", &filter),
            )
        };
        let (sensor_batches, sensor_seconds) = commits("sensor_data");
        let (detector_batches, detector_seconds) = commits("case_outbox");
        Sample {
            sensor_batches,
            sensor_seconds,
            detector_batches,
            detector_seconds,
            rollup_batches: ecars_e2e::metric_sum(ecars_persist::ROLLUP_APPLIED, ""),
        }
    }

    fn since(self, before: Sample) -> Sample {
        Sample {
            sensor_batches: self.sensor_batches - before.sensor_batches,
            sensor_seconds: self.sensor_seconds - before.sensor_seconds,
            detector_batches: self.detector_batches - before.detector_batches,
            detector_seconds: self.detector_seconds - before.detector_seconds,
            rollup_batches: self.rollup_batches - before.rollup_batches,
        }
    }
}

/// Gives the newest second of `seconds` what the metrics grew by since `last` (the sample that
/// closed the second before), and makes the sample now the new `last`.
fn close_second(seconds: &mut [Second], last: &mut Sample) {
    let sample = Sample::now();
    if let Some(newest) = seconds.last_mut() {
        newest.metrics = sample.since(*last);
    }
    *last = sample;
}

async fn latency(
    database_url: &str,
    composition: Composition,
    vehicles: u32,
    rate: u64,
    seconds: u64,
    timeline: bool,
) -> Latency {
    let (pipeline, mut committed) = start(database_url, composition).await;
    let interval_ms = u64::from(vehicles) * 1000 / rate;
    let per_vehicle = seconds * 1000 / interval_ms;
    let interval = Duration::from_millis(interval_ms);
    let total = u64::from(vehicles) * per_vehicle;
    let config = SimulatorConfig {
        vehicles,
        interval,
        broker: format!("mqtt://{}", pipeline.mqtt_addr),
        readings_per_vehicle: Some(per_vehicle),
        ..SimulatorConfig::default()
    };
    // The first seconds include 1,000 connections being set up: measure the steady state, the
    // readings taken after the warm-up.
    let measure_from = Utc::now() + chrono::Duration::seconds(WARMUP_SECONDS);
    let simulator = tokio::spawn(ecars_simulator::run(config, CancellationToken::new()));
    let mut samples: Vec<f64> = Vec::with_capacity(total as usize);
    let mut rows = 0u64;
    let started = Instant::now();
    let mut seconds_seen: Vec<Second> = Vec::new();
    let mut last_sample = Sample::now();
    while rows < total {
        match tokio::time::timeout(Duration::from_secs(60), committed.recv()).await {
            Ok(Some(batch)) => {
                let now = Utc::now();
                rows += batch.len() as u64;
                let latencies = batch
                    .iter()
                    .filter(|r| r.date >= measure_from)
                    .map(|r| (now - r.date).num_microseconds().unwrap_or(0) as f64 / 1000.0);
                let before = samples.len();
                samples.extend(latencies);
                if timeline {
                    let second = started.elapsed().as_secs() as usize;
                    while seconds_seen.len() <= second {
                        close_second(&mut seconds_seen, &mut last_sample);
                        seconds_seen.push(Second::default());
                    }
                    let this = &mut seconds_seen[second];
                    this.rows += batch.len() as u64;
                    this.max_ms = samples[before..]
                        .iter()
                        .copied()
                        .fold(this.max_ms, f64::max);
                }
            }
            _ => panic!("stalled at {rows}/{total} rows"),
        }
    }
    // The last second ends with the run.
    close_second(&mut seconds_seen, &mut last_sample);
    let mean_ms = |seconds: f64, count: f64| {
        if count > 0.0 {
            seconds / count * 1000.0
        } else {
            0.0
        }
    };
    for (second, s) in seconds_seen.iter().enumerate() {
        let m = s.metrics;
        println!(
            "  second {second:>3}: {:>6} rows, worst {:>7.1} ms; commits: {:>3} sensor-row ({:>6.1} ms mean), {:>3} detector ({:>6.1} ms mean); {:>3} rollup batches",
            s.rows,
            s.max_ms,
            m.sensor_batches,
            mean_ms(m.sensor_seconds, m.sensor_batches),
            m.detector_batches,
            mean_ms(m.detector_seconds, m.detector_batches),
            m.rollup_batches,
        );
    }
    simulator.await.expect("simulator task").expect("simulator");
    pipeline.shutdown().await.unwrap();
    let mut steady = samples;
    steady.sort_by(f64::total_cmp);
    let pct = |p: f64| steady[((steady.len() as f64 * p) as usize).min(steady.len() - 1)];
    Latency {
        rate,
        readings: steady.len(),
        p50_ms: pct(0.50),
        p95_ms: pct(0.95),
        p99_ms: pct(0.99),
        max_ms: *steady.last().unwrap_or(&0.0),
    }
}

fn main() {
    let filter = std::env::var("ECARS_LOG").unwrap_or_else(|_| "warn,rumqttd=off".into());
    let log = ecars_runtime::settings::LogConfig {
        format: ecars_runtime::settings::LogFormat::Text,
        filter,
    };
    log.init().expect("log filter");
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let timeline = args.iter().any(|a| a == "--timeline");
    let composition = Composition {
        anomaly: !args.iter().any(|a| a == "--without-anomaly"),
    };
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (vehicles, per_vehicle, seconds) = if quick {
        (200, 100, 6)
    } else {
        (1000, 200, 20)
    };
    let rate = 10_000;

    let dir = tempfile::tempdir().unwrap();
    let pg = PgServer::start().expect("throwaway PostgreSQL");
    let mut results = Vec::new();
    for (backend, make_url) in [
        (
            "sqlite",
            Box::new(|n: usize| {
                format!(
                    "sqlite://{}",
                    dir.path().join(format!("bench-{n}.db")).display()
                )
            }) as Box<dyn Fn(usize) -> String>,
        ),
        ("postgres", Box::new(|_| pg.url())),
    ] {
        if only.as_deref().is_some_and(|o| o != backend) {
            continue;
        }
        let t = runtime.block_on(throughput(&make_url(1), composition, vehicles, per_vehicle));
        let rps = t.readings as f64 / t.seconds;
        println!(
            "{backend:>8} throughput: {} readings from {vehicles} cars in {:.2}s = {rps:.0} readings/s",
            t.readings, t.seconds
        );
        let l = runtime.block_on(latency(
            &make_url(2),
            composition,
            vehicles,
            rate,
            seconds,
            timeline,
        ));
        println!(
            "{backend:>8} latency at {} readings/s ({} readings after warm-up): p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            l.rate, l.readings, l.p50_ms, l.p95_ms, l.p99_ms, l.max_ms
        );
        results.push(serde_json::json!({
            "backend": backend,
            "anomaly_worker": composition.anomaly,
            "vehicles": vehicles,
            "throughput_readings": t.readings,
            "throughput_seconds": t.seconds,
            "readings_per_second": rps,
            "latency_rate": l.rate,
            "latency_readings": l.readings,
            "p50_ms": l.p50_ms, "p95_ms": l.p95_ms, "p99_ms": l.p99_ms, "max_ms": l.max_ms,
        }));
    }
    std::fs::create_dir_all("bench-results").ok();
    let path = "bench-results/pipeline.json";
    if std::fs::write(path, serde_json::to_string_pretty(&results).unwrap()).is_ok() {
        println!("results written to {path}");
    }
}
