//! A PostgreSQL outage in the middle of a run loses nothing: the persistence worker holds its
//! batch and retries, the bus fills, ingest stops reading from the cars (backpressure), and
//! everything flows again once the database is back.

use std::time::Duration;

use ecars_e2e::{wait_for, PgServer, Pipeline, PipelineOptions};
use ecars_persist::PersistConfig;
use ecars_simulator::SimulatorConfig;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_mid_run_loses_nothing() {
    let pg = PgServer::start().unwrap();
    let mut options = PipelineOptions::new(pg.url());
    options.bus_capacity = 200;
    options.persist = PersistConfig {
        batch_rows: 100,
        batch_delay: Duration::from_millis(20),
        ..PersistConfig::default()
    };
    let pipeline = Pipeline::start(options).await.unwrap();

    let cars = 20;
    let per_car = 250;
    let simulator = tokio::spawn(ecars_simulator::run(
        SimulatorConfig {
            vehicles: cars,
            interval: Duration::from_millis(10),
            broker: format!("mqtt://{}", pipeline.mqtt_addr),
            readings_per_vehicle: Some(per_car),
            malfunction: 2,
            ..SimulatorConfig::default()
        },
        CancellationToken::new(),
    ));

    wait_for("the first 1,000 rows", Duration::from_secs(30), || async {
        pipeline.db.sensor_rows().count().await.unwrap_or(0) >= 1_000
    })
    .await
    .unwrap();
    pg.stop().unwrap();
    let during = pipeline.db.sensor_rows().count().await;
    assert!(during.is_err(), "the database is down");
    // The outage itself: cars keep publishing into a pipeline that cannot write.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ready = reqwest::get(format!("{}/readyz", pipeline.admin_base()))
        .await
        .unwrap();
    assert_eq!(ready.status(), 503, "/readyz reports the database outage");
    pg.start_server().unwrap();

    let report = simulator.await.unwrap().unwrap();
    assert_eq!(report.published, u64::from(cars) * per_car);
    assert_eq!(
        report.acknowledged, report.published,
        "every reading was acknowledged to its car"
    );
    let db = pipeline.shutdown().await.unwrap();
    assert_eq!(
        db.sensor_rows().count().await.unwrap(),
        (u64::from(cars) * per_car) as i64,
        "every reading stored once"
    );

    let metrics = ecars_runtime::metrics::install_recorder().render();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(
        value("ecars_batch_write_retries_total") >= 1.0,
        "the writer retried:\n{metrics}"
    );
    assert!(
        value("ecars_bus_backpressure_total") >= 1.0,
        "publishers were held back:\n{metrics}"
    );
}
