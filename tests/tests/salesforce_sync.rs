//! The Case sync against the Salesforce emulator: batching, the error policy (outage, lock
//! errors, permanent field errors, expired and refused credentials) and update coalescing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use ecars_anomaly::salesforce::{SalesforceClient, SalesforceConfig};
use ecars_anomaly::sync::{CaseSync, SyncPolicy};
use ecars_db::case_outbox::{CaseDraft, CaseOutbox, CaseStatus};
use ecars_db::detector_states::StoredState;
use ecars_db::{Database, DbError};
use ecars_e2e::salesforce::{rsa_key_pair, EmulatorCredentials, SalesforceEmulator};
use ecars_e2e::wait_for;
use ecars_model::Vin;
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;

fn credentials() -> EmulatorCredentials {
    EmulatorCredentials {
        client_id: "3MVG9-ecars-test".into(),
        client_secret: "s3cret".into(),
        username: "integration@ecars.example".into(),
        public_key_pem: None,
    }
}

fn client_credentials(emulator: &SalesforceEmulator) -> SalesforceConfig {
    SalesforceConfig {
        client_id: Some("3MVG9-ecars-test".into()),
        client_secret: Some("s3cret".into()),
        login_url: emulator.base_url.clone(),
        api_version: "62.0".into(),
        ..Default::default()
    }
}

fn fast_policy() -> SyncPolicy {
    SyncPolicy {
        update_interval: Duration::from_millis(200),
        retry_initial: Duration::from_millis(100),
        retry_max: Duration::from_secs(2),
        unknown_window: Duration::from_secs(5),
        rate_limit_wait: Duration::from_secs(2),
        auth_initial: Duration::from_millis(500),
        auth_max: Duration::from_secs(60),
        over_budget_wait: Duration::from_secs(1),
        idle_poll: Duration::from_millis(50),
        ..SyncPolicy::default()
    }
}

fn draft(n: u32, priority: &str) -> CaseDraft {
    let vin = Vin::parse(&ecars_e2e::test_vin(n)).unwrap();
    let started_at = Utc::now();
    let mut fields = Map::new();
    fields.insert(
        "Subject".into(),
        format!("Battery draining fast: car {n}").into(),
    );
    fields.insert("Description".into(), "evidence".into());
    fields.insert("Priority".into(), priority.into());
    fields.insert("Status".into(), "New".into());
    fields.insert("Origin".into(), "Web".into());
    fields.insert("Ecars_Firings__c".into(), 1.into());
    CaseDraft {
        key: format!("{vin}-battery_drain-{n}"),
        vin,
        rule: "battery_drain".into(),
        started_at,
        closed_at: None,
        fields,
    }
}

struct Harness {
    emulator: SalesforceEmulator,
    outbox: CaseOutbox,
    client: Arc<SalesforceClient>,
    ready: Arc<AtomicBool>,
    stop: CancellationToken,
    sync: Option<tokio::task::JoinHandle<Result<(), DbError>>>,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start(config: impl FnOnce(&SalesforceEmulator) -> SalesforceConfig) -> Harness {
        Self::start_with(credentials(), config).await
    }

    async fn start_with(
        credentials: EmulatorCredentials,
        config: impl FnOnce(&SalesforceEmulator) -> SalesforceConfig,
    ) -> Harness {
        let emulator = SalesforceEmulator::start(credentials).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("cases.db").display());
        let db = Database::connect_lazy(&url).unwrap();
        db.migrate().await.unwrap();
        let client = Arc::new(SalesforceClient::new(&config(&emulator)).unwrap());
        Harness {
            emulator,
            outbox: db.case_outbox(),
            client,
            ready: Arc::new(AtomicBool::new(true)),
            stop: CancellationToken::new(),
            sync: None,
            _dir: dir,
        }
    }

    async fn add(&self, drafts: &[CaseDraft]) {
        let no_states: &[StoredState<'_, ()>] = &[];
        self.outbox
            .commit(
                no_states,
                drafts,
                None,
                CaseStatus::Pending,
                200,
                Utc::now(),
            )
            .await
            .unwrap();
    }

    fn run(&mut self, policy: SyncPolicy) {
        let ready = Arc::clone(&self.ready);
        let sync = CaseSync::new(self.outbox.clone(), Arc::clone(&self.client), policy)
            .on_readiness(move |r| ready.store(r, Ordering::SeqCst));
        self.sync = Some(tokio::spawn(sync.run(self.stop.clone())));
    }

    async fn wait_status(&self, key: &str, status: CaseStatus, timeout: Duration) {
        let outbox = self.outbox.clone();
        wait_for(&format!("{key} {status}"), timeout, || {
            let outbox = outbox.clone();
            async move {
                outbox
                    .list(Some(status), 1000)
                    .await
                    .unwrap()
                    .iter()
                    .any(|r| r.key == key)
            }
        })
        .await
        .unwrap();
    }

    async fn wait_all_synced(&self, n: usize, timeout: Duration) {
        let outbox = self.outbox.clone();
        wait_for("every case synced", timeout, || {
            let outbox = outbox.clone();
            async move {
                outbox
                    .list(Some(CaseStatus::Synced), 1000)
                    .await
                    .unwrap()
                    .len()
                    == n
            }
        })
        .await
        .unwrap();
    }

    async fn stop(mut self) {
        self.stop.cancel();
        if let Some(sync) = self.sync.take() {
            sync.await.unwrap().unwrap();
        }
    }
}

#[tokio::test]
async fn cases_go_out_in_one_collections_call_per_200_and_a_vehicle_lookup_is_cached() {
    let mut h = Harness::start(client_credentials).await;
    let vehicle = h.emulator.add_vehicle(&ecars_e2e::test_vin(1));
    let drafts: Vec<_> = (0..450)
        .map(|n| draft(n % 3, "High"))
        .enumerate()
        .map(|(i, mut d)| {
            d.key = format!("{}-{i}", d.key);
            d
        })
        .collect();
    h.add(&drafts).await;
    h.run(fast_policy());
    h.wait_all_synced(450, Duration::from_secs(30)).await;
    let (upserts, queried, tokens, cases) = h.emulator.with(|s| {
        (
            s.upsert_requests,
            s.queried_vins.clone(),
            s.token_requests,
            s.cases.clone(),
        )
    });
    assert_eq!(upserts, 3, "450 Cases in calls of at most 200");
    let mut distinct = queried.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        (queried.len(), distinct.len()),
        (3, 3),
        "each VIN looked up once, then cached"
    );
    assert_eq!(tokens, 1);
    assert_eq!(cases.len(), 450);
    let linked = cases
        .values()
        .filter(|c| c.fields.get("Vehicle__c") == Some(&Value::String(vehicle.clone())))
        .count();
    assert_eq!(
        linked, 150,
        "cars with a Vehicle__c record are linked to it"
    );
    assert!(h
        .emulator
        .with(|s| s.creations_per_key.values().all(|&n| n == 1)));
    h.stop().await;
}

#[tokio::test]
async fn an_update_sends_only_the_changed_fields_and_keeps_the_agents_status() {
    let mut h = Harness::start(client_credentials).await;
    let first = draft(1, "High");
    h.add(std::slice::from_ref(&first)).await;
    h.run(fast_policy());
    h.wait_status(&first.key, CaseStatus::Synced, Duration::from_secs(10))
        .await;
    // An agent works the Case in Salesforce.
    h.emulator.with(|s| {
        s.cases
            .get_mut(&first.key)
            .unwrap()
            .fields
            .insert("Status".into(), "Working".into());
    });
    let mut again = first.clone();
    again.fields.insert("Ecars_Firings__c".into(), 9.into());
    h.add(&[again]).await;
    let emulator = &h.emulator;
    wait_for("the update", Duration::from_secs(10), || async {
        emulator.with(|s| s.cases[&first.key].updates == 1)
    })
    .await
    .unwrap();
    let case = h.emulator.with(|s| s.cases[&first.key].clone());
    assert_eq!(case.fields["Ecars_Firings__c"], json!(9));
    assert_eq!(
        case.fields["Status"],
        json!("Working"),
        "the update did not reset Status"
    );
    assert_eq!(h.emulator.with(|s| s.attempts_per_key[&first.key]), 2);
    h.stop().await;
}

#[tokio::test]
async fn lock_errors_are_retried_until_the_case_is_saved() {
    let mut h = Harness::start(client_credentials).await;
    h.emulator.with(|s| s.faults.lock_errors = 3);
    let case = draft(1, "High");
    h.add(std::slice::from_ref(&case)).await;
    h.run(fast_policy());
    h.wait_status(&case.key, CaseStatus::Synced, Duration::from_secs(20))
        .await;
    assert_eq!(
        h.emulator.with(|s| s.attempts_per_key[&case.key]),
        4,
        "three lock errors, then saved"
    );
    assert_eq!(h.emulator.with(|s| s.creations_per_key[&case.key]), 1);
    h.stop().await;
}

#[tokio::test]
async fn a_permanent_field_error_is_tried_once_then_failed_and_retry_requeues_it() {
    let mut h = Harness::start(client_credentials).await;
    let bad = draft(1, "Urgent"); // not in the restricted Priority picklist
    let good = draft(2, "High");
    h.add(&[bad.clone(), good.clone()]).await;
    h.run(fast_policy());
    h.wait_status(&bad.key, CaseStatus::Failed, Duration::from_secs(10))
        .await;
    h.wait_status(&good.key, CaseStatus::Synced, Duration::from_secs(10))
        .await;
    // Several sync rounds later, still one attempt: no loop.
    let calls = h.emulator.with(|s| s.api_requests);
    let mut later = good.clone();
    later.fields.insert("Ecars_Firings__c".into(), 2.into());
    h.add(&[later]).await;
    let emulator = &h.emulator;
    wait_for("another call", Duration::from_secs(10), || async {
        emulator.with(|s| s.api_requests > calls)
    })
    .await
    .unwrap();
    assert_eq!(h.emulator.with(|s| s.attempts_per_key[&bad.key]), 1);
    let failed = h.outbox.list(Some(CaseStatus::Failed), 10).await.unwrap();
    assert!(failed[0]
        .last_error
        .as_deref()
        .unwrap()
        .contains("INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST"));
    // A person fixes the data; `ecars cases retry KEY` queues it once more.
    let mut fixed = bad.clone();
    fixed.fields.insert("Priority".into(), "High".into());
    h.add(&[fixed]).await;
    assert!(h.outbox.retry(&bad.key, Utc::now()).await.unwrap());
    h.wait_status(&bad.key, CaseStatus::Synced, Duration::from_secs(10))
        .await;
    assert_eq!(h.emulator.with(|s| s.attempts_per_key[&bad.key]), 2);
    h.stop().await;
}

#[tokio::test]
async fn an_expired_session_costs_one_token_refresh_with_the_jwt_bearer_flow() {
    let dir = tempfile::tempdir().unwrap();
    let (key_file, public_pem) = rsa_key_pair(dir.path()).unwrap();
    let creds = EmulatorCredentials {
        public_key_pem: Some(public_pem),
        ..credentials()
    };
    let mut h = Harness::start_with(creds, |e| SalesforceConfig {
        client_id: Some("3MVG9-ecars-test".into()),
        username: Some("integration@ecars.example".into()),
        private_key_file: Some(key_file.clone()),
        login_url: e.base_url.clone(),
        api_version: "62.0".into(),
        ..Default::default()
    })
    .await;
    let first = draft(1, "High");
    h.add(std::slice::from_ref(&first)).await;
    h.run(fast_policy());
    h.wait_status(&first.key, CaseStatus::Synced, Duration::from_secs(10))
        .await;
    assert_eq!(h.emulator.with(|s| s.token_requests), 1);
    h.emulator.expire_tokens();
    let second = draft(2, "High");
    h.add(std::slice::from_ref(&second)).await;
    h.wait_status(&second.key, CaseStatus::Synced, Duration::from_secs(10))
        .await;
    assert_eq!(h.emulator.with(|s| s.token_requests), 2, "one refresh");
    // Query and upsert for the first Case; then the refused query, its one retry, the upsert.
    assert_eq!(h.emulator.with(|s| s.api_requests), 5);
    h.stop().await;
}

#[tokio::test]
async fn refused_client_credentials_pause_the_sync_with_few_token_requests_then_it_resumes() {
    let mut h = Harness::start(client_credentials).await;
    h.emulator.with(|s| s.faults.reject_client = true);
    let cases: Vec<_> = (0..5).map(|n| draft(n, "High")).collect();
    h.add(&cases).await;
    h.run(fast_policy());
    let outbox = h.outbox.clone();
    wait_for("paused rows", Duration::from_secs(10), || {
        let outbox = outbox.clone();
        async move {
            outbox
                .list(Some(CaseStatus::Paused), 10)
                .await
                .unwrap()
                .len()
                == 5
        }
    })
    .await
    .unwrap();
    assert!(
        !h.ready.load(Ordering::SeqCst),
        "readiness reports the pause"
    );
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(8)).await; // the observation window itself
    let tokens = h.emulator.with(|s| s.token_requests);
    // 0.5 s, then doubling: at most ~5 attempts in 8 s, where a retry loop would make hundreds.
    assert!(
        tokens <= 6,
        "{tokens} token requests in {:?}",
        started.elapsed()
    );
    assert_eq!(h.emulator.with(|s| s.upsert_requests), 0);
    h.emulator.with(|s| s.faults.reject_client = false);
    h.wait_all_synced(5, Duration::from_secs(30)).await;
    assert!(h.ready.load(Ordering::SeqCst));
    h.stop().await;
}

#[tokio::test]
async fn the_api_limit_makes_the_sync_wait_instead_of_hammering() {
    let mut h = Harness::start(client_credentials).await;
    h.emulator.with(|s| s.faults.limit_exceeded = true);
    let case = draft(1, "High");
    h.add(std::slice::from_ref(&case)).await;
    h.run(SyncPolicy {
        rate_limit_wait: Duration::from_secs(3),
        ..fast_policy()
    });
    let emulator = &h.emulator;
    wait_for(
        "the first refused call",
        Duration::from_secs(10),
        || async { emulator.with(|s| s.api_requests >= 1) },
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await; // the observation window itself
    assert_eq!(
        h.emulator.with(|s| s.api_requests),
        1,
        "no call before the wait is over"
    );
    h.emulator.with(|s| s.faults.limit_exceeded = false);
    h.wait_status(&case.key, CaseStatus::Synced, Duration::from_secs(10))
        .await;
    h.stop().await;
}

/// The outage: Salesforce answers 503 for two minutes; every Case arrives after, once.
#[tokio::test]
async fn cases_wait_out_two_minutes_of_503_and_arrive_once() {
    let mut h = Harness::start(client_credentials).await;
    h.emulator
        .with(|s| s.faults.unavailable_until = Some(Instant::now() + Duration::from_secs(120)));
    let cases: Vec<_> = (0..50).map(|n| draft(n, "High")).collect();
    h.add(&cases[..25]).await;
    h.run(SyncPolicy {
        retry_max: Duration::from_secs(5),
        ..fast_policy()
    });
    let emulator = &h.emulator;
    wait_for("a refused call", Duration::from_secs(10), || async {
        emulator.with(|s| s.api_requests >= 1)
    })
    .await
    .unwrap();
    // More episodes arrive during the outage.
    h.add(&cases[25..]).await;
    h.wait_all_synced(50, Duration::from_secs(180)).await;
    let (cases_in_sf, creations) = h
        .emulator
        .with(|s| (s.cases.len(), s.creations_per_key.clone()));
    assert_eq!(cases_in_sf, 50);
    assert!(creations.values().all(|&n| n == 1), "none twice");
    let refused = h
        .emulator
        .with(|s| s.api_requests - s.upsert_requests - s.queries);
    assert!(
        refused > 1,
        "the outage was retried ({refused} refused calls)"
    );
    // Backoff from 0.1 s doubling to 5 s: about 30 calls in two minutes, not one per row.
    assert!(
        refused < 60,
        "with backoff, not hammering ({refused} refused calls)"
    );
    h.stop().await;
}

/// Waits for the next Case change on the cases stream (acknowledging it).
async fn next_case_event(
    cases: &mut ecars_bus::Subscription<ecars_model::CaseEvent>,
) -> ecars_model::CaseEvent {
    let delivery = tokio::time::timeout(Duration::from_secs(10), cases.next())
        .await
        .expect("a Case change is published")
        .expect("the bus is open")
        .unwrap();
    cases.ack(&[delivery.receipt]).await.unwrap();
    delivery.record
}

#[tokio::test]
async fn case_changes_go_out_on_the_cases_stream_created_updated_and_failed() {
    use ecars_anomaly::events::EpisodeEventRelay;
    use ecars_bus::Bus;
    use ecars_model::{CaseChange, CaseEvent};

    let mut h = Harness::start(client_credentials).await;
    let bus = Bus::in_process(100);
    let mut cases = bus.subscribe::<CaseEvent>("case-watcher").await.unwrap();
    let relay = EpisodeEventRelay::new(h.outbox.clone(), bus.clone());
    let relay = tokio::spawn(relay.run(h.stop.clone()));

    let good = draft(1, "High");
    let bad = draft(2, "Urgent"); // not in the restricted Priority picklist
    h.add(&[good.clone(), bad.clone()]).await;
    h.run(fast_policy());
    let mut first = [
        next_case_event(&mut cases).await,
        next_case_event(&mut cases).await,
    ];
    first.sort_by_key(|e| e.key != good.key);
    let (created, failed) = (&first[0], &first[1]);

    assert_eq!(
        (created.key.as_str(), created.change, created.sequence),
        (good.key.as_str(), CaseChange::Created, 1)
    );
    let salesforce_id = created.salesforce_id.clone().expect("the Case's Id");
    assert_eq!(
        Some(salesforce_id.as_str()),
        h.outbox.list(Some(CaseStatus::Synced), 10).await.unwrap()[0]
            .salesforce_id
            .as_deref()
    );
    assert_eq!(created.vin, good.vin);
    assert_eq!(created.case_status.as_deref(), Some("New"));
    assert!(created.error.is_none());
    assert_eq!(created.event_id, CaseEvent::id_for(&good.key, 1));

    assert_eq!(
        (
            failed.key.as_str(),
            failed.change,
            failed.salesforce_id.as_deref()
        ),
        (bad.key.as_str(), CaseChange::Failed, None)
    );
    assert!(failed
        .error
        .as_deref()
        .unwrap()
        .contains("INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST"));

    // The episode fires again: the sync sends the change and says so.
    let mut later = good.clone();
    later.fields.insert("Ecars_Firings__c".into(), 2.into());
    h.add(&[later]).await;
    let updated = next_case_event(&mut cases).await;
    assert_eq!(
        (updated.key.as_str(), updated.change, updated.sequence),
        (good.key.as_str(), CaseChange::Updated, 2)
    );
    assert_eq!(
        updated.salesforce_id.as_deref(),
        Some(salesforce_id.as_str())
    );
    assert!(updated.synced_version > created.synced_version);

    // Nothing is published twice.
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), cases.next())
            .await
            .is_err(),
        "no further Case change"
    );
    h.stop.cancel();
    relay.await.unwrap().unwrap();
    h.stop().await;
}
