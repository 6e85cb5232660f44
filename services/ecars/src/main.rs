//! `ecars`: one binary for every service of ecars-realtime. It parses the command line and
//! hands the settings to the composition ([`ecars_app::App`]) or to a one-shot command.

use clap::{Args, Parser, Subcommand};
use ecars_app::anomaly::AnomalyConfig;
use ecars_app::api::HttpConfig;
use ecars_app::bus::kafka::KafkaConfig;
use ecars_app::db::case_outbox::CaseStatus;
use ecars_app::db::DatabaseConfig;
use ecars_app::ingest::IngestConfig;
use ecars_app::model::api_key::Scope;
use ecars_app::persist::PersistConfig;
use ecars_app::relay::RelayConfig;
use ecars_app::runtime::settings::LogConfig;
use ecars_app::runtime::signal::shutdown;
use ecars_app::runtime::tls::TlsConfig;
use ecars_app::simulator::SimulatorConfig;
use ecars_app::{commands, App, InProcessBusConfig, Settings, SimulationConfig};

/// mimalloc: glibc's allocator spent a fifth of ingest's CPU on fragmentation and page faults
/// (MQTT → Kafka went from 46,600 to 58,000 readings/s in the benchmark). The
/// `system-allocator` feature keeps glibc's, which heap profilers (heaptrack, dhat) can see.
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// ecars-realtime: car telemetry over MQTT, stored, watched and streamed.
#[derive(Debug, Parser)]
#[command(name = "ecars", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    log: LogConfig,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run everything in one process: MQTT broker, bus (in process, or Kafka with
    /// --kafka-brokers), persistence, anomaly detection, the live relay and HTTP.
    Up(Box<UpArgs>),
    /// Scale-out: the MQTT broker, publishing accepted readings to Kafka.
    Ingest(IngestArgs),
    /// Scale-out: the persistence worker, consuming Kafka as group `ecars-persist`.
    Persist(PersistArgs),
    /// Scale-out: the anomaly worker (detection and Salesforce Cases), consuming Kafka as group
    /// `ecars-anomaly`.
    Anomaly(AnomalyArgs),
    /// Scale-out: the live relay (WebSockets on the HTTP port) and the dashboard, following
    /// Kafka on its own.
    Relay(RelayArgs),
    /// Show or re-queue the Cases of the case outbox.
    Cases(CasesArgs),
    /// Print the Kafka topics other services can consume: partitions, keys, value schemas.
    Topics(TopicsArgs),
    /// Apply the database migrations and exit.
    Migrate(MigrateArgs),
    /// Create API keys for the HTTP API.
    ApiKey(ApiKeyArgs),
    /// Create MQTT service accounts (subscribers that are not cars).
    MqttAccount(MqttAccountArgs),
    /// Drive simulated cars against a broker.
    Simulate(SimulatorConfig),
}

#[derive(Debug, Args)]
struct UpArgs {
    #[command(flatten)]
    ingest: IngestConfig,
    #[command(flatten)]
    tls: TlsConfig,
    #[command(flatten)]
    http: HttpConfig,
    #[command(flatten)]
    database: DatabaseConfig,
    #[command(flatten)]
    persist: PersistConfig,
    #[command(flatten)]
    kafka: KafkaConfig,
    #[command(flatten)]
    bus: InProcessBusConfig,
    #[command(flatten)]
    anomaly: AnomalyConfig,
    #[command(flatten)]
    relay: RelayConfig,
    #[command(flatten)]
    simulation: SimulationConfig,
}

#[derive(Debug, Args)]
struct IngestArgs {
    #[command(flatten)]
    ingest: IngestConfig,
    #[command(flatten)]
    tls: TlsConfig,
    #[command(flatten)]
    http: HttpConfig,
    #[command(flatten)]
    kafka: KafkaConfig,
}

#[derive(Debug, Args)]
struct PersistArgs {
    #[command(flatten)]
    database: DatabaseConfig,
    #[command(flatten)]
    persist: PersistConfig,
    #[command(flatten)]
    http: HttpConfig,
    #[command(flatten)]
    kafka: KafkaConfig,
}

#[derive(Debug, Args)]
struct AnomalyArgs {
    #[command(flatten)]
    database: DatabaseConfig,
    #[command(flatten)]
    anomaly: AnomalyConfig,
    #[command(flatten)]
    http: HttpConfig,
    #[command(flatten)]
    kafka: KafkaConfig,
}

#[derive(Debug, Args)]
struct RelayArgs {
    #[command(flatten)]
    relay: RelayConfig,
    #[command(flatten)]
    tls: TlsConfig,
    #[command(flatten)]
    database: DatabaseConfig,
    #[command(flatten)]
    http: HttpConfig,
    #[command(flatten)]
    kafka: KafkaConfig,
}

#[derive(Debug, Args)]
struct CasesArgs {
    #[command(subcommand)]
    action: CasesAction,
}

#[derive(Debug, Subcommand)]
enum CasesAction {
    /// List outbox rows, newest first: key, VIN, rule, status, Salesforce Id, attempts, error.
    List {
        #[command(flatten)]
        database: DatabaseConfig,
        /// Only rows in this status: pending, synced, failed, paused, not_configured.
        #[arg(long = "status")]
        status: Option<CaseStatus>,
        /// Most rows shown.
        #[arg(long = "limit", default_value_t = 100)]
        limit: i64,
        /// Print JSON instead of a table.
        #[arg(long = "json")]
        json: bool,
    },
    /// Send a failed Case again (after fixing what Salesforce refused).
    Retry {
        #[command(flatten)]
        database: DatabaseConfig,
        /// The Case's `Ecars_Anomaly_Key__c`.
        key: String,
    },
}

#[derive(Debug, Args)]
struct TopicsArgs {
    #[command(flatten)]
    kafka: KafkaConfig,
    /// Print JSON instead of text.
    #[arg(long = "json")]
    json: bool,
}

#[derive(Debug, Args)]
struct ApiKeyArgs {
    #[command(subcommand)]
    action: ApiKeyAction,
}

#[derive(Debug, Subcommand)]
enum ApiKeyAction {
    /// Print a new key (give it to its holder) and its line for ECARS_API_KEYS_FILE (which keeps
    /// only its hash; the running services pick the line up within seconds).
    Create {
        /// Who holds the key (logs and metrics name it): letters, digits, - _ . @.
        #[arg(long = "name")]
        name: String,
        /// What it may do, repeated or comma-separated: fleet:read, dead-letters:read,
        /// cases:read, cases:write, relay-tokens:mint, status:read.
        #[arg(long = "scope", value_delimiter = ',', required = true)]
        scopes: Vec<Scope>,
    },
}

#[derive(Debug, Args)]
struct MqttAccountArgs {
    #[command(subcommand)]
    action: MqttAccountAction,
}

#[derive(Debug, Subcommand)]
enum MqttAccountAction {
    /// Print a new account's password (give it to the subscriber) and its line for
    /// ECARS_MQTT_ACCOUNTS_FILE (which keeps only an argon2 hash; running brokers pick it up
    /// within seconds). The subscriber logs in with username = the name and a client id that is
    /// the name or starts with `name-`.
    Create {
        /// The account's name (its MQTT username): letters, digits, - _ . (not a VIN).
        #[arg(long = "name")]
        name: String,
        /// Topic filters it may subscribe to (or narrower ones), repeated or comma-separated,
        /// for example `vehicles/+/telemetry`.
        #[arg(long = "filter", value_delimiter = ',', required = true)]
        filters: Vec<String>,
    },
}

#[derive(Debug, Args)]
struct MigrateArgs {
    #[command(flatten)]
    database: DatabaseConfig,
}

/// Treats an empty `ECARS_*`, `SALESFORCE_*` or `DATABASE_URL` variable as unset, as a `.env`
/// file with `NAME=` means: an empty secret must not count as a (too short) secret.
fn unset_empty_settings() {
    let empty: Vec<String> = std::env::vars_os()
        .filter_map(|(name, value)| {
            let name = name.into_string().ok()?;
            let ours = name.starts_with("ECARS_")
                || name.starts_with("SALESFORCE_")
                || name == "DATABASE_URL";
            (ours && value.is_empty()).then_some(name)
        })
        .collect();
    for name in empty {
        // Single-threaded here: before the runtime and any thread start.
        std::env::remove_var(name);
    }
}

fn main() -> anyhow::Result<()> {
    unset_empty_settings();
    let cli = Cli::parse();
    cli.log.init()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(cli.command))
}

async fn run(command: Command) -> anyhow::Result<()> {
    let settings = match command {
        Command::Up(args) => {
            let args = *args;
            let tls = args.tls;
            let settings = Settings::everything(
                args.http,
                args.kafka,
                args.bus,
                args.database,
                args.ingest,
                args.persist,
                args.anomaly,
                args.relay,
                args.simulation,
            );
            Settings { tls, ..settings }
        }
        Command::Ingest(args) => Settings {
            ingest: Some(args.ingest),
            tls: args.tls,
            ..Settings::service(args.http, args.kafka)
        },
        Command::Persist(args) => Settings {
            database: Some(args.database),
            persist: Some(args.persist),
            ..Settings::service(args.http, args.kafka)
        },
        Command::Anomaly(args) => Settings {
            database: Some(args.database),
            anomaly: Some(args.anomaly),
            ..Settings::service(args.http, args.kafka)
        },
        Command::Relay(args) => Settings {
            database: Some(args.database),
            relay: Some(args.relay),
            tls: args.tls,
            ..Settings::service(args.http, args.kafka)
        },
        Command::Cases(args) => return cases(args.action).await,
        Command::Topics(args) => {
            let topics = commands::topics(&args.kafka).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&topics)?);
            } else {
                print!("{}", commands::topics_text(&topics));
            }
            return Ok(());
        }
        Command::Migrate(args) => return Ok(commands::migrate(&args.database).await?),
        Command::ApiKey(ApiKeyArgs {
            action: ApiKeyAction::Create { name, scopes },
        }) => {
            let created = commands::create_api_key(&name, scopes.into_iter().collect())?;
            // The key on stdout alone, for scripts; the line for the file on stderr.
            eprintln!("# append to ECARS_API_KEYS_FILE:\n{}", created.line);
            println!("{}", created.key);
            return Ok(());
        }
        Command::MqttAccount(MqttAccountArgs {
            action: MqttAccountAction::Create { name, filters },
        }) => {
            let created = commands::create_mqtt_account(&name, &filters)?;
            eprintln!("# append to ECARS_MQTT_ACCOUNTS_FILE:\n{}", created.line);
            println!("{}", created.password);
            return Ok(());
        }
        Command::Simulate(config) => {
            let report = commands::simulate(config, shutdown()).await?;
            // The report on stdout, for scripts; the logs go to stderr.
            println!("{}", serde_json::to_string(&report)?);
            return Ok(());
        }
    };
    Ok(App::build(settings).await?.run(shutdown()).await?)
}

async fn cases(action: CasesAction) -> anyhow::Result<()> {
    match action {
        CasesAction::List {
            database,
            status,
            limit,
            json,
        } => {
            let rows = commands::list_cases(&database, status, limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", commands::cases_table(&rows));
            }
        }
        CasesAction::Retry { database, key } => {
            anyhow::ensure!(
                commands::retry_case(&database, &key).await?,
                "no failed case with key {key:?} (see `ecars cases list --status failed`)"
            );
            println!("{key}: queued for sync");
        }
    }
    Ok(())
}
