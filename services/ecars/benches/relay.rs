//! Benchmark of the live relay: `ecars up` (release build, its own process, so its memory can
//! be read from /proc) with 10,000 WebSocket clients over 1,000 VINs (10 per car) while
//! 2,000 readings/s arrive over MQTT, plus one fleet client that never reads.
//!
//! Reports publish-to-client latency (each reading's `date` is its publish time; clients run in
//! this process, on the same clock), frames delivered, the relay process's memory (VmRSS sampled
//! each second, and VmHWM), and what became of the stalled client.
//!
//! Run: `cargo bench -p ecars --bench relay` (`-- --quick`: 2,000 clients, 10 s). Results are
//! printed and written to `bench-results/relay.json`.

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rumqttc::{AsyncClient, MqttOptions, QoS};
use tokio_tungstenite::tungstenite::Message;

const ECARS: &str = env!("CARGO_BIN_EXE_ecars");
const WARMUP: Duration = Duration::from_secs(3);

fn proc_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (clients, cars, rate, seconds) = if quick {
        (2_000usize, 200usize, 2_000u64, 10u64)
    } else {
        (10_000, 1_000, 2_000, 20)
    };
    let dir = tempfile::tempdir().unwrap();
    let (mqtt, ws, http) = (
        ecars_e2e::free_port(),
        ecars_e2e::free_port(),
        ecars_e2e::free_port(),
    );
    let mut child = tokio::process::Command::new(ECARS)
        .arg("up")
        .env(
            "DATABASE_URL",
            format!("sqlite://{}", dir.path().join("relay.db").display()),
        )
        .env("ECARS_MQTT_ADDR", format!("127.0.0.1:{mqtt}"))
        .env("ECARS_MQTT_WS_ADDR", format!("127.0.0.1:{ws}"))
        .env("ECARS_HTTP_ADDR", format!("127.0.0.1:{http}"))
        .env("ECARS_ADMIN_ADDR", ecars_e2e::admin_addr_for(http))
        .env("ECARS_LOG", "warn,rumqttd=off")
        .env_remove("ECARS_DEVICE_SECRET")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    ecars_e2e::wait_for("/readyz", Duration::from_secs(30), || async {
        reqwest::get(format!("http://{}/readyz", ecars_e2e::admin_addr_for(http)))
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await
    .unwrap();
    let rss_idle = proc_kib(pid, "VmRSS:");
    let vins: Vec<String> = (0..cars as u32).map(ecars_e2e::test_vin).collect();

    // The clients: each counts frames and, once measuring, records latencies.
    let measuring = Arc::new(AtomicBool::new(false));
    let frames = Arc::new(AtomicU64::new(0));
    let latencies: Arc<Mutex<Vec<u64>>> = Arc::default();
    let connect_started = Instant::now();
    let sockets = futures_util::stream::iter(0..clients)
        .map(|i| {
            let url = format!("ws://127.0.0.1:{http}/v1/vehicles/{}/live", vins[i % cars]);
            async move { tokio_tungstenite::connect_async(url).await.map(|(s, _)| s) }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    let connect_seconds = connect_started.elapsed().as_secs_f64();
    let mut readers = Vec::new();
    let mut failed = 0;
    for socket in sockets {
        let Ok(mut socket) = socket else {
            failed += 1;
            continue;
        };
        let (measuring, frames, latencies) = (measuring.clone(), frames.clone(), latencies.clone());
        readers.push(tokio::spawn(async move {
            while let Some(Ok(message)) = socket.next().await {
                if let Message::Text(text) = message {
                    frames.fetch_add(1, Ordering::Relaxed);
                    if measuring.load(Ordering::Relaxed) {
                        let value: serde_json::Value =
                            serde_json::from_str(text.as_str()).unwrap_or_default();
                        if let Some(date) = value["date"]
                            .as_str()
                            .and_then(|d| chrono::DateTime::parse_from_rfc3339(d).ok())
                        {
                            let micros = (chrono::Utc::now() - date.with_timezone(&chrono::Utc))
                                .num_microseconds()
                                .unwrap_or(0)
                                .max(0) as u64;
                            latencies.lock().unwrap().push(micros);
                        }
                    }
                }
            }
        }));
    }
    let (mut stalled, _) =
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{http}/v1/live"))
            .await
            .unwrap();
    let rss_connected = proc_kib(pid, "VmRSS:");
    println!(
        "{} clients connected in {connect_seconds:.1} s ({failed} failed); relay process RSS {} MiB idle, {} MiB connected",
        readers.len(),
        rss_idle / 1024,
        rss_connected / 1024
    );

    // 2,000 readings/s over MQTT from 20 publishers, round-robin over the cars.
    let publishers = 20usize;
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let (stop, published, vins) = (stop.clone(), published.clone(), vins.clone());
        tasks.push(tokio::spawn(async move {
            let mut options = MqttOptions::new(format!("bench-pub-{p}"), "127.0.0.1", mqtt);
            options
                .set_keep_alive(Duration::from_secs(30))
                .set_inflight(200);
            let (client, mut eventloop) = AsyncClient::new(options, 1000);
            tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
            let every = Duration::from_secs_f64(publishers as f64 / rate as f64);
            let mut tick = tokio::time::interval(every);
            let mut n = p;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let vin = &vins[n % vins.len()];
                n += publishers;
                let payload = ecars_e2e::reading_json(vin, 50.0);
                if client
                    .publish(
                        format!("vehicles/{vin}/telemetry"),
                        QoS::AtLeastOnce,
                        false,
                        payload,
                    )
                    .await
                    .is_ok()
                {
                    published.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(WARMUP).await;
    measuring.store(true, Ordering::Relaxed);
    let frames_before = frames.load(Ordering::Relaxed);
    let published_before = published.load(Ordering::Relaxed);
    let started = Instant::now();
    let mut rss_max = 0;
    let mut stalled_closed: Option<(f64, String)> = None;
    while started.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        rss_max = rss_max.max(proc_kib(pid, "VmRSS:"));
    }
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let delivered = frames.load(Ordering::Relaxed) - frames_before;
    let sent = published.load(Ordering::Relaxed) - published_before;
    stop.store(true, Ordering::Relaxed);
    // The stalled fleet client: read what it was sent until the relay's close frame.
    let stalled_started = Instant::now();
    let mut stalled_frames = 0u64;
    while let Ok(Some(Ok(message))) =
        tokio::time::timeout(Duration::from_secs(5), stalled.next()).await
    {
        match message {
            Message::Text(_) => stalled_frames += 1,
            Message::Close(frame) => {
                stalled_closed = Some((
                    stalled_started.elapsed().as_secs_f64(),
                    frame
                        .map(|f| format!("{} {}", u16::from(f.code), f.reason))
                        .unwrap_or_default(),
                ));
                break;
            }
            _ => {}
        }
    }
    let hwm = proc_kib(pid, "VmHWM:");
    let mut sorted = std::mem::take(&mut *latencies.lock().unwrap());
    sorted.sort_unstable();
    let (p50, p99, max) = (
        percentile(&sorted, 0.5),
        percentile(&sorted, 0.99),
        sorted.last().map_or(f64::NAN, |&m| m as f64 / 1000.0),
    );
    println!(
        "{sent} readings published in {elapsed:.1} s ({:.0}/s); {delivered} frames delivered ({:.0}/s, expected {} per reading)",
        sent as f64 / elapsed,
        delivered as f64 / elapsed,
        clients / cars
    );
    println!(
        "publish-to-client latency: p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms ({} samples)",
        sorted.len()
    );
    println!(
        "relay process memory: RSS max {} MiB during the run (peak VmHWM {} MiB)",
        rss_max / 1024,
        hwm / 1024
    );
    match &stalled_closed {
        Some((_, close)) => println!(
            "stalled fleet client: closed by the relay ({close}) after {stalled_frames} buffered frames"
        ),
        None => println!("stalled fleet client: still open after {stalled_frames} frames"),
    }
    let results = serde_json::json!({
        "clients": readers.len(), "cars": cars, "failed_connects": failed,
        "connect_seconds": connect_seconds,
        "readings_per_second": sent as f64 / elapsed,
        "frames_per_second": delivered as f64 / elapsed,
        "latency_ms": {"p50": p50, "p99": p99, "max": max, "samples": sorted.len()},
        "relay_rss_mib": {"idle": rss_idle / 1024, "connected": rss_connected / 1024, "max_during_run": rss_max / 1024, "peak_hwm": hwm / 1024},
        "stalled_client": {"closed": stalled_closed.as_ref().map(|(_, c)| c.clone()), "frames_buffered": stalled_frames},
    });
    std::fs::create_dir_all("bench-results").ok();
    std::fs::write(
        "bench-results/relay.json",
        serde_json::to_string_pretty(&results).unwrap(),
    )
    .ok();
    for task in tasks {
        task.abort();
    }
    let _ = child.start_kill();
}
