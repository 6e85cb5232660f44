//! The Kafka producer of the bus, with the disk spool that keeps accepted readings through a
//! Kafka outage.
//!
//! Three phases, switched under one lock so that each car's readings stay in order:
//!
//! - **Direct**: records go to librdkafka; `publish` returns when Kafka acknowledged them.
//! - **Diverting**: every broker was lost. Records still in librdkafka's memory are purged and
//!   their delivery reports move them, in queue order, to the spool; new records wait in a short
//!   list behind them. Once the last report is in, the list follows them into the spool.
//! - **Spooling**: `publish` returns when the record is on disk. A drainer hands the spool to
//!   Kafka oldest first; when it has delivered everything, the producer goes Direct again.
//!
//! librdkafka's queue filling up (Kafka slower than the cars) also switches to Spooling, without a
//! purge: what is in memory is older than what goes to disk and is delivered first.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig, ThreadedProducer,
};
use rdkafka::util::Timeout;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::spool::{Spool, SpooledRecord};
use super::KafkaConfig;
use crate::metrics as names;
use crate::{BusError, Stream};

/// Told when a published record is in Kafka or on disk.
type Done = oneshot::Sender<Result<(), BusError>>;

/// What a delivery report belongs to.
pub(crate) enum Opaque {
    /// A `publish` call waiting for Kafka.
    Publisher(Done),
    /// A record the drainer took from the spool.
    Drainer(oneshot::Sender<Result<(), String>>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Direct,
    Diverting,
    Spooling,
}

/// Publishes the phase as the `ecars_kafka_spooling` gauge.
fn report_phase(phase: Phase) {
    metrics::gauge!(names::KAFKA_SPOOLING).set(if phase == Phase::Direct { 0.0 } else { 1.0 });
}

struct State {
    phase: Phase,
    /// Direct records librdkafka holds whose delivery report has not come.
    in_flight: usize,
    /// Records published while Diverting, in order.
    held: Vec<(SpooledRecord, Done)>,
}

struct Shared {
    state: Mutex<State>,
    /// The deployment's topic prefix, taken off a purged record's topic to spool it.
    prefix: String,
    /// Full topic names by stream topic, so a record does not build its topic's name.
    topics: RwLock<HashMap<&'static str, Arc<str>>>,
    spool: Option<Spool>,
    /// Poked by librdkafka's error callback when every broker is down.
    outage: tokio::sync::Notify,
    closed: AtomicBool,
}

impl Shared {
    /// The topic after the prefix of one of our full topic names.
    fn stream_topic_of<'t>(&self, topic: &'t str) -> Option<&'t str> {
        topic.strip_prefix(self.prefix.as_str())
    }

    /// The full topic name of a stream.
    fn topic_of(&self, stream: Stream) -> Arc<str> {
        if let Some(name) = self
            .topics
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(stream.topic)
        {
            return Arc::clone(name);
        }
        let name: Arc<str> = format!("{}{}", self.prefix, stream.topic).into();
        self.topics
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(stream.topic, Arc::clone(&name));
        name
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_phase(&self, state: &mut State, phase: Phase) {
        if state.phase != phase {
            tracing::info!(from = ?state.phase, to = ?phase, "Kafka producer phase");
            state.phase = phase;
            report_phase(phase);
        }
    }

    /// Appends to the spool and tells `done` once the record is durable.
    fn spool(&self, record: SpooledRecord, done: Done) {
        match &self.spool {
            Some(spool) => spool.append(
                record,
                Box::new(move |result| {
                    let _ = done.send(result.map_err(BusError::Spool));
                }),
            ),
            None => {
                let _ = done.send(Err(BusError::Unavailable(
                    "Kafka refused the record and there is no spool".into(),
                )));
            }
        }
    }

    /// A Direct record's report came in; the last one while Diverting completes the switch.
    fn direct_done(&self) {
        let mut state = self.lock();
        state.in_flight = state.in_flight.saturating_sub(1);
        if state.phase == Phase::Diverting && state.in_flight == 0 {
            self.finish_diverting(&mut state);
        }
    }

    fn finish_diverting(&self, state: &mut State) {
        for (record, done) in std::mem::take(&mut state.held) {
            self.spool(record, done);
        }
        self.set_phase(state, Phase::Spooling);
    }
}

/// librdkafka callbacks: delivery reports and client errors.
pub(crate) struct ProducerEvents {
    shared: Arc<Shared>,
}

impl ClientContext for ProducerEvents {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            tracing::debug!(reason, "every Kafka broker is unreachable");
            if self.shared.spool.is_some() {
                let mut state = self.shared.lock();
                if state.phase == Phase::Direct {
                    metrics::counter!(names::KAFKA_OUTAGES).increment(1);
                    tracing::warn!(
                        reason,
                        "every Kafka broker is unreachable: accepted readings go to the spool"
                    );
                    self.shared.set_phase(&mut state, Phase::Diverting);
                    if state.in_flight == 0 {
                        self.shared.finish_diverting(&mut state);
                    } else {
                        self.shared.outage.notify_one();
                    }
                }
            }
        } else {
            tracing::warn!(%error, reason, "Kafka client error");
        }
    }
}

impl ProducerContext for ProducerEvents {
    type DeliveryOpaque = Box<Opaque>;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: Box<Opaque>) {
        match (*opaque, result) {
            (Opaque::Publisher(done), Ok(_)) => {
                let _ = done.send(Ok(()));
                self.shared.direct_done();
            }
            (Opaque::Publisher(done), Err((error, message))) => {
                let purged = matches!(
                    error.rdkafka_error_code(),
                    Some(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight)
                );
                match (purged, self.shared.stream_topic_of(message.topic())) {
                    // Purged because Kafka is away: to disk, in the order librdkafka held it.
                    (true, Some(topic)) if self.shared.spool.is_some() => self
                        .shared
                        .spool(spooled_from_message(topic, message), done),
                    _ => {
                        let _ = done.send(Err(BusError::Kafka {
                            context: "the record was not delivered",
                            source: error.clone(),
                        }));
                    }
                }
                self.shared.direct_done();
            }
            (Opaque::Drainer(done), result) => {
                let _ = done.send(result.as_ref().map(|_| ()).map_err(|(e, _)| e.to_string()));
            }
        }
    }
}

fn spooled_from_message<M: Message>(topic: &str, message: &M) -> SpooledRecord {
    let headers = message
        .headers()
        .map(|headers| {
            headers
                .iter()
                .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                .collect()
        })
        .unwrap_or_default();
    SpooledRecord {
        topic: topic.to_owned(),
        key: message.key().unwrap_or_default().to_vec(),
        headers,
        value: message.payload().unwrap_or_default().to_vec(),
    }
}

fn owned_headers(record: &SpooledRecord) -> OwnedHeaders {
    record.headers.iter().fold(
        OwnedHeaders::new_with_capacity(record.headers.len()),
        |headers, (key, value)| {
            headers.insert(Header {
                key,
                value: Some(value),
            })
        },
    )
}

fn is_queue_full(error: &KafkaError) -> bool {
    matches!(
        error,
        KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)
    )
}

/// The producer: Direct to Kafka, or through the spool while Kafka is away.
pub(crate) struct SpoolingProducer {
    producer: Arc<ThreadedProducer<ProducerEvents>>,
    shared: Arc<Shared>,
    config: KafkaConfig,
    stop: CancellationToken,
    tasks: tokio_util::task::TaskTracker,
}

impl SpoolingProducer {
    /// Creates the producer; with `spool_dir`, opens the spool and starts its drainer.
    pub(crate) fn create(
        config: &KafkaConfig,
        client: rdkafka::ClientConfig,
        spool_dir: Option<(PathBuf, u64)>,
    ) -> Result<SpoolingProducer, BusError> {
        let spool = match spool_dir {
            Some((dir, max_bytes)) => Some(Spool::open(&dir, max_bytes)?),
            None => None,
        };
        let phase = match &spool {
            Some(spool) if !spool.is_empty() => Phase::Spooling,
            _ => Phase::Direct,
        };
        report_phase(phase);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                phase,
                in_flight: 0,
                held: Vec::new(),
            }),
            prefix: config.topic_prefix.clone(),
            topics: RwLock::default(),
            spool,
            outage: tokio::sync::Notify::new(),
            closed: AtomicBool::new(false),
        });
        let producer: ThreadedProducer<ProducerEvents> = client
            .create_with_context(ProducerEvents {
                shared: Arc::clone(&shared),
            })
            .map_err(|source| BusError::Kafka {
                context: "cannot create the producer",
                source,
            })?;
        let producer = Arc::new(producer);
        if let Some(spool) = &shared.spool {
            // From the start, so an alert sees 0 rather than no series.
            report_phase(phase);
            metrics::gauge!(names::SPOOL_BYTES).set(spool.bytes() as f64);
            metrics::counter!(names::SPOOL_FULL).increment(0);
        }
        let this = SpoolingProducer {
            producer,
            shared,
            config: config.clone(),
            stop: CancellationToken::new(),
            tasks: tokio_util::task::TaskTracker::new(),
        };
        if this.shared.spool.is_some() {
            this.tasks.spawn(purge_on_outage(
                Arc::clone(&this.producer),
                Arc::clone(&this.shared),
                this.stop.clone(),
            ));
            this.tasks.spawn(drain(
                Arc::clone(&this.producer),
                Arc::clone(&this.shared),
                this.config.clone(),
                this.stop.clone(),
            ));
        }
        Ok(this)
    }

    /// The librdkafka producer, for metadata requests (which block: call them off the runtime).
    pub(crate) fn kafka(&self) -> Arc<ThreadedProducer<ProducerEvents>> {
        Arc::clone(&self.producer)
    }

    /// The spool, when there is one: whether it is in use, how much waits in it, whether it
    /// is full.
    pub(crate) fn spool_health(&self) -> Option<crate::SpoolHealth> {
        let spool = self.shared.spool.as_ref()?;
        Some(crate::SpoolHealth {
            in_use: self.shared.lock().phase != Phase::Direct,
            bytes: spool.bytes(),
            full: spool.is_full(),
            oldest: spool.oldest(),
            dir: spool.dir().to_owned(),
        })
    }

    /// Publishes a record; returns once it is in Kafka or, while Kafka is away, on disk.
    pub(crate) async fn publish(
        &self,
        stream: Stream,
        record: SpooledRecord,
    ) -> Result<(), BusError> {
        let (tx, rx) = oneshot::channel();
        let mut waited = false;
        let topic = self.shared.topic_of(stream);
        let mut next = Some((record, tx));
        while let Some((current, done)) = next.take() {
            if self.shared.closed.load(Ordering::Acquire) {
                return Err(BusError::Closed);
            }
            // `Some` when librdkafka's queue is full and there is no spool: wait and try again.
            let retry = {
                let mut state = self.shared.lock();
                match state.phase {
                    Phase::Direct => {
                        let kafka_record =
                            BaseRecord::with_opaque_to(&topic, Box::new(Opaque::Publisher(done)))
                                .key(&current.key)
                                .payload(&current.value)
                                .headers(owned_headers(&current));
                        match self.producer.send(kafka_record) {
                            Ok(()) => {
                                state.in_flight += 1;
                                None
                            }
                            Err((error, returned)) if is_queue_full(&error) => {
                                let Opaque::Publisher(tx) = *returned.delivery_opaque else {
                                    unreachable!("publish only sends publisher records");
                                };
                                if self.shared.spool.is_some() {
                                    // Memory is full: what is there is older and goes first;
                                    // this record and the ones after it go to disk.
                                    tracing::warn!("Kafka producer queue full; spooling to disk");
                                    self.shared.set_phase(&mut state, Phase::Spooling);
                                    self.shared.spool(current, tx);
                                    None
                                } else {
                                    Some((current, tx))
                                }
                            }
                            Err((source, _)) => {
                                return Err(BusError::Kafka {
                                    context: "cannot queue the record",
                                    source,
                                })
                            }
                        }
                    }
                    Phase::Diverting => {
                        state.held.push((current, done));
                        None
                    }
                    Phase::Spooling => {
                        self.shared.spool(current, done);
                        None
                    }
                }
            };
            if let Some((current, tx)) = retry {
                if !waited {
                    waited = true;
                    metrics::counter!(names::BUS_BACKPRESSURE, "stream" => stream.name)
                        .increment(1);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                next = Some((current, tx));
            }
        }
        rx.await.map_err(|_| BusError::Closed)?
    }

    /// Stops accepting records, gives librdkafka `timeout` to deliver what it holds, and stops
    /// the drainer; the spool keeps what Kafka did not take for the next start.
    pub(crate) async fn close(&self, timeout: Duration) {
        self.shared.closed.store(true, Ordering::Release);
        let deadline = tokio::time::Instant::now() + timeout;
        // Hand the spool to Kafka while it answers, before the drainer stops: a pod that goes
        // away (SIGTERM, a node drain) leaves nothing on a volume that may never come back.
        if let Some(spool) = self.shared.spool.as_ref().filter(|spool| !spool.is_empty()) {
            tracing::info!(
                bytes = spool.bytes(),
                "handing the spool to Kafka before exit"
            );
            let mut poll = tokio::time::interval(Duration::from_millis(100));
            while !spool.is_empty() && tokio::time::Instant::now() < deadline {
                poll.tick().await;
            }
            if spool.is_empty() {
                tracing::info!("Kafka took everything spooled");
            } else {
                tracing::warn!(
                    bytes = spool.bytes(),
                    "Kafka did not take the whole spool in time; the rest stays on disk for the next start"
                );
            }
        }
        let producer = Arc::clone(&self.producer);
        let left = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .max(Duration::from_secs(1));
        let flushed =
            tokio::task::spawn_blocking(move || producer.flush(Timeout::After(left))).await;
        match flushed {
            Ok(Ok(())) => tracing::info!("Kafka producer flushed"),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "Kafka producer could not deliver every record in time; spooled records stay on disk for the next start")
            }
            Err(e) => tracing::error!(error = %e, "Kafka flush task failed"),
        }
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        if let Some(spool) = &self.shared.spool {
            spool.close();
        }
    }
}

/// Purges librdkafka's queue when every broker is lost, so its records move to the spool and
/// the cars that sent them are acknowledged instead of waiting for Kafka.
async fn purge_on_outage(
    producer: Arc<ThreadedProducer<ProducerEvents>>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = shared.outage.notified() => {}
        }
        if shared.lock().phase != Phase::Diverting {
            continue;
        }
        let producer = Arc::clone(&producer);
        let purged = tokio::task::spawn_blocking(move || {
            producer.purge(PurgeConfig::default().queue().inflight())
        })
        .await;
        if let Err(e) = purged {
            tracing::error!(error = %e, "Kafka purge task failed");
        }
    }
}

/// Hands the spool to Kafka, oldest first, one batch at a time; goes back to Direct when it has
/// delivered everything.
async fn drain(
    producer: Arc<ThreadedProducer<ProducerEvents>>,
    shared: Arc<Shared>,
    config: KafkaConfig,
    stop: CancellationToken,
) {
    let Some(spool) = shared.spool.as_ref() else {
        return;
    };
    let mut failures = 0u32;
    loop {
        let batch = tokio::select! {
            _ = stop.cancelled() => return,
            batch = spool.read_batch(1024 * 1024) => batch,
        };
        let batch = match batch {
            Ok(batch) => batch,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the Kafka spool; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => continue,
                }
            }
        };
        let mut reports = Vec::with_capacity(batch.records.len());
        for record in &batch.records {
            let topic = config.topic(&record.topic);
            loop {
                let (tx, rx) = oneshot::channel();
                let kafka_record =
                    BaseRecord::with_opaque_to(&topic, Box::new(Opaque::Drainer(tx)))
                        .key(&record.key)
                        .payload(&record.value)
                        .headers(owned_headers(record));
                match producer.send(kafka_record) {
                    Ok(()) => {
                        reports.push(rx);
                        break;
                    }
                    Err((error, _)) => {
                        if !is_queue_full(&error) {
                            tracing::error!(%error, "cannot hand a spooled record to Kafka; retrying");
                        }
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                        }
                    }
                }
            }
        }
        let mut failed = None;
        for report in reports {
            let result = tokio::select! {
                _ = stop.cancelled() => return,
                result = report => result,
            };
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failed = Some(e),
                Err(_) => failed = Some("delivery report lost".to_owned()),
            }
        }
        if let Some(error) = failed {
            // Read the same batch again: Kafka may hold part of it twice, which event ids make
            // harmless; skipping it would lose readings.
            failures += 1;
            tracing::warn!(
                error,
                failures,
                "Kafka did not take a spooled batch; retrying it"
            );
            let delay = Duration::from_millis(200 * u64::from(failures.min(25)));
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(delay) => continue,
            }
        }
        failures = 0;
        metrics::counter!(names::SPOOL_RECORDS, "op" => "delivered")
            .increment(batch.records.len() as u64);
        if let Err(e) = spool.commit(batch.end) {
            tracing::error!(error = %e, "cannot record spool progress; records may be delivered again");
        }
        let mut state = shared.lock();
        if state.phase == Phase::Spooling && spool.is_empty() {
            tracing::info!("Kafka took everything spooled; publishing straight to Kafka again");
            shared.set_phase(&mut state, Phase::Direct);
        }
    }
}
