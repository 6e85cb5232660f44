//! Prometheus metrics: the recorder every service installs, and the metrics of the parts this
//! crate runs (the batch writer). Each crate names and describes its own metrics in a `metrics`
//! module; the composition describes them all at start.

use std::time::Duration;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// How often histogram samples are folded into their buckets. The recorder keeps every sample
/// until then (or until a scrape renders them): without this, a process nobody scrapes, such as
/// `ecars up` on a laptop, grew by the samples of every reading, about 400 MiB an hour at
/// 5,000 readings/s in the soak run.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Runs the recorder's upkeep every `every` on a thread of its own, for the life of the process
/// (not on the async runtime: the recorder outlives any one runtime, as in tests).
fn keep_up(handle: PrometheusHandle, every: Duration) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("ecars-metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(every);
            handle.run_upkeep();
        })
        .map(drop)
}

/// Rows committed to the database, labelled by `table`.
pub const ROWS_WRITTEN: &str = "ecars_rows_written_total";
/// Rows in each committed batch, labelled by `table`.
pub const BATCH_SIZE: &str = "ecars_batch_rows";
/// Time to commit one batch, labelled by `table`.
pub const BATCH_LATENCY: &str = "ecars_batch_write_seconds";
/// Failed batch writes that will be retried, labelled by `table` and `reason` (`unavailable`,
/// `conflict`, `refused`).
pub const BATCH_RETRIES: &str = "ecars_batch_write_retries_total";
/// Always 1, labelled with the build's `version`: which version each process runs.
pub const BUILD_INFO: &str = "ecars_build_info";
/// How old a reading is when it is stored: now minus the date it carries, seconds.
pub const READING_AGE: &str = "ecars_reading_age_seconds";
/// HTTP requests answered, labelled by `route` (its pattern), `method` and `status`.
pub const HTTP_REQUESTS: &str = "ecars_http_requests_total";
/// Time to answer an HTTP request (to the response's head), labelled by `route`.
pub const HTTP_REQUEST_SECONDS: &str = "ecars_http_request_seconds";

/// Whether the database answered the last write or health check (1) or not (0).
pub const DATABASE_UP: &str = "ecars_database_up";

/// Installs the process-wide Prometheus recorder and describes the metrics of this crate and of
/// the bus (the service crates describe theirs; the composition calls them at start).
///
/// Safe to call more than once (tests start several services in one process): later calls
/// return a handle to the recorder already installed.
pub fn install_recorder() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0,
                ])
                .and_then(|b| {
                    // A reading's age spans a network hop to a Kafka outage.
                    b.set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Full(READING_AGE.to_owned()),
                        &[
                            0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
                            3600.0, 86400.0,
                        ],
                    )
                })
                .map(|b| b.build_recorder())
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
            let handle = recorder.handle();
            if let Err(error) = keep_up(handle.clone(), UPKEEP_INTERVAL) {
                tracing::error!(%error, "cannot start the metrics upkeep: histogram samples pile up until /metrics is scraped");
            }
            // Another recorder may already be installed (a test harness); ours still renders.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            ecars_bus::metrics::describe();
            metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            handle
        })
        .clone()
}

/// Describes this crate's metrics to the installed recorder.
pub fn describe() {
    describe_counter!(ROWS_WRITTEN, "Rows committed to the database, by table");
    describe_histogram!(BATCH_SIZE, "Rows per committed batch, by table");
    describe_histogram!(
        BATCH_LATENCY,
        Unit::Seconds,
        "Time to commit one batch, by table"
    );
    describe_counter!(
        BATCH_RETRIES,
        "Failed batch writes that are retried, by table and reason (unavailable, conflict, refused)"
    );
    describe_gauge!(
        DATABASE_UP,
        "1 when the database answered the last write or check, else 0"
    );
    describe_gauge!(BUILD_INFO, "1, labelled with the version this process runs");
    describe_histogram!(
        READING_AGE,
        Unit::Seconds,
        "How old each reading is when stored: now minus its date"
    );
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests answered, by route pattern, method and status"
    );
    describe_histogram!(
        HTTP_REQUEST_SECONDS,
        Unit::Seconds,
        "Time to answer an HTTP request, by route pattern"
    );
    describe_gauge!(
        crate::process::RESIDENT_MEMORY,
        Unit::Bytes,
        "Resident memory"
    );
    describe_gauge!(crate::process::OPEN_FDS, "Open file descriptors");
    describe_gauge!(
        crate::process::MAX_FDS,
        "The most descriptors the process may open"
    );
    describe_counter!(
        crate::process::CPU_SECONDS,
        Unit::Seconds,
        "User and system CPU time"
    );
    describe_gauge!(
        crate::process::START_TIME,
        Unit::Seconds,
        "When the process started, Unix time"
    );
    describe_counter!(
        crate::reloading::RELOADS,
        "Changes of settings files seen while running, by file and result (applied, refused)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Histogram samples recorded while nobody scrapes are folded into the buckets by the
    /// upkeep, not kept one by one: 20 million samples (160 MB kept raw) leave the process far
    /// smaller, and they are counted.
    #[test]
    fn unscraped_histograms_stay_small() {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&[1.0, 2.0])
            .unwrap()
            .build_recorder();
        let handle = recorder.handle();
        keep_up(handle.clone(), Duration::from_millis(20)).unwrap();
        let before = crate::process::resident_bytes().unwrap();
        let mut peak = before;
        metrics::with_local_recorder(&recorder, || {
            let samples = metrics::histogram!("upkeep_test_seconds");
            for round in 0..200 {
                for _ in 0..100_000 {
                    samples.record(1.5);
                }
                if round % 10 == 0 {
                    peak = peak.max(crate::process::resident_bytes().unwrap());
                    // Give the upkeep thread a turn on a busy machine.
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        });
        let grown = peak.saturating_sub(before);
        assert!(
            grown < 80 * 1024 * 1024,
            "{} MiB grown for 20 million samples",
            grown / 1024 / 1024
        );
        let text = handle.render();
        let counted: f64 = text
            .lines()
            .find_map(|line| line.strip_prefix("upkeep_test_seconds_count "))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0.0);
        // metrics-util's bucket can miss a sample written at the instant it is drained: a few
        // hundredths of a percent with a drain every 20 ms, as here, less every 5 s.
        assert!(
            counted >= 19_900_000.0,
            "the samples are counted, not lost: {text}"
        );
    }
}
