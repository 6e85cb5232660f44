//! Benchmark of the MQTT edge, `ecars up` (release build, SQLite) side by side with Debian's
//! mosquitto in the same run, driven by the same raw-MQTT load generator in processes of its own
//! (this benchmark's binary, re-executed with `--generator`), so that neither the client library
//! nor the measuring process is what is measured.
//!
//! - idle: as many connected, idle cars as the descriptor limit allows (15,000; keep-alive 300 s):
//!   the broker's resident memory and descriptors per car;
//! - rate: 100 cars publishing a fixed 40,000 QoS 1 readings/s for 60 s with one `#` subscriber
//!   on each broker (64 in flight per car; a car with a full window queues the readings due,
//!   as an MQTT client does): what was acknowledged, delivered and (for ecars) stored; PUBACK
//!   latency (for ecars, publish to committed row) from the PUBLISH and from when the reading was
//!   due, and publish-to-subscriber latency; the broker's CPU per 1,000 readings/s;
//! - overload: 100 cars publishing as fast as they are acknowledged (256 in flight each) for 20 s
//!   to a subscriber that reads slowly: what was acknowledged, delivered and stored, and the
//!   broker's peak memory;
//! - tls: the rate run at 10,000 readings/s for 30 s over TLS and plain TCP on both brokers (CPU
//!   per 1,000 readings/s), and 1,000 cars connecting with mutual TLS (client certificates):
//!   handshakes/s and memory per TLS car. Certificates are made with `openssl` for the run.
//!
//! - soak (only with `--only soak`, not part of the default run): 30 minutes at a fixed 10,000
//!   readings/s from 2,000 cars through `ecars up` on PostgreSQL (anomaly worker on) with 1,000
//!   live-view sockets following those cars; resident memory and descriptors sampled every
//!   10 s, every acknowledged reading checked in the database, the slope of memory reported
//!   (`--quick`: 200 cars, 1,000/s, 100 sockets, 2 minutes).
//!
//! Run: `cargo bench -p ecars --bench edge` (`-- --quick` for shorter runs, `-- --only
//! idle|rate|overload|tls|soak`; `-- --ecars-only` leaves mosquitto out of the rate run, to compare
//! builds of ecars in turns). Needs Debian's `mosquitto` (`apt-get install mosquitto`; installing it
//! starts no daemon) and `prlimit` (util-linux).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ecars_e2e::free_port;

const ECARS: &str = env!("CARGO_BIN_EXE_ecars");

/// A broker under test, in its own process.
struct Broker {
    name: &'static str,
    child: Child,
    /// Plain MQTT (subscribers, and the load unless TLS).
    port: u16,
    /// MQTT over TLS, where the load goes when set.
    tls_port: Option<u16>,
    _dir: tempfile::TempDir,
    database_url: Option<String>,
}

/// A CA, a server certificate for 127.0.0.1 and a car's client certificate, made by `openssl`.
struct Certificates {
    dir: tempfile::TempDir,
    vin: &'static str,
}

impl Certificates {
    fn make() -> Certificates {
        let dir = tempfile::tempdir().unwrap();
        let run = |args: &[&str]| {
            let ok = Command::new("openssl")
                .current_dir(dir.path())
                .args(args)
                .stderr(Stdio::null())
                .status()
                .expect("openssl")
                .success();
            assert!(ok, "openssl {args:?}");
        };
        let key = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        run(&[
            &["req", "-x509"][..],
            &key,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=bench-ca",
            ],
        ]
        .concat());
        let vin = "1BENCH00000000001";
        for (name, cn, ext) in [
            (
                "server",
                "localhost",
                "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
            ),
            ("car", vin, "extendedKeyUsage=clientAuth\n"),
        ] {
            run(&[
                &["req"][..],
                &key,
                &[
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.csr"),
                    "-subj",
                    &format!("/CN={cn}"),
                ],
            ]
            .concat());
            std::fs::write(dir.path().join(format!("{name}.ext")), ext).unwrap();
            run(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
            ]);
        }
        Certificates { dir, vin }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// What the generator needs to connect over TLS (with the car's certificate if `mutual`).
    fn generator_env(&self, mutual: bool) -> Vec<(&'static str, String)> {
        let mut env = vec![("EDGE_TLS_CA", self.path("ca.pem"))];
        if mutual {
            env.push(("EDGE_TLS_CERT", self.path("car.pem")));
            env.push(("EDGE_TLS_KEY", self.path("car.key")));
            // A certified car's client ids start with its VIN.
            env.push(("EDGE_CLIENT_PREFIX", self.vin.to_owned()));
        }
        env
    }
}

impl Broker {
    fn mosquitto() -> Broker {
        Broker::mosquitto_with(None)
    }

    /// mosquitto, also on a TLS listener with `certificates` (client certificates optional).
    fn mosquitto_with(certificates: Option<&Certificates>) -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        let mut text = format!(
            "per_listener_settings false\nallow_anonymous true\npersistence false\nlog_type none\nlistener {port} 127.0.0.1\n"
        );
        let tls_port = certificates.map(|c| {
            let tls = free_port();
            text.push_str(&format!(
                // Started as root, mosquitto drops to its own user, which cannot read the
                // test's private directory: stay root.
                "user root\nlistener {tls} 127.0.0.1\ncertfile {}\nkeyfile {}\ncafile {}\nrequire_certificate false\n",
                c.path("server.pem"),
                c.path("server.key"),
                c.path("ca.pem"),
            ));
            tls
        });
        std::fs::write(&conf, text).unwrap();
        let child = Command::new("prlimit")
            .args(["--nofile=20000:20000", "mosquitto", "-c"])
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto (apt-get install mosquitto) and prlimit");
        let broker = Broker {
            name: if tls_port.is_some() {
                "mosquitto 2.0, TLS"
            } else {
                "mosquitto 2.0"
            },
            child,
            port,
            tls_port,
            _dir: dir,
            database_url: None,
        };
        broker.wait_listening();
        broker
    }

    fn ecars() -> Broker {
        Broker::ecars_with(None)
    }

    /// `ecars up`, also on its TLS listener with `certificates` (client certificates optional).
    fn ecars_with(certificates: Option<&Certificates>) -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let url = format!("sqlite://{}", dir.path().join("edge.db").display());
        let tls_port = certificates.map(|_| free_port());
        let mut command = Command::new(ECARS);
        if let (Some(c), Some(tls)) = (certificates, tls_port) {
            command
                .env("ECARS_MQTT_TLS_ADDR", format!("127.0.0.1:{tls}"))
                .env("ECARS_TLS_CERT_FILE", c.path("server.pem"))
                .env("ECARS_TLS_KEY_FILE", c.path("server.key"))
                .env("ECARS_MQTT_CLIENT_CA_FILE", c.path("ca.pem"));
        }
        let child = command
            .args(["up", "--mqtt-addr", &format!("127.0.0.1:{port}")])
            .args(["--mqtt-ws-addr", &format!("127.0.0.1:{}", free_port())])
            .args(["--http-addr", &format!("127.0.0.1:{}", free_port())])
            .args(["--admin-addr", &format!("127.0.0.1:{}", free_port())])
            .env("DATABASE_URL", &url)
            .env("ECARS_LOG", "warn,rumqttd=off")
            .env_remove("ECARS_DEVICE_SECRET")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the ecars binary");
        let broker = Broker {
            name: if tls_port.is_some() {
                "ecars up (SQLite), TLS"
            } else {
                "ecars up (SQLite)"
            },
            child,
            port,
            tls_port,
            _dir: dir,
            database_url: Some(url),
        };
        broker.wait_listening();
        broker
    }

    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for port in std::iter::once(self.port).chain(self.tls_port) {
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(Instant::now() < deadline, "{} does not listen", self.name);
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // Let the process settle (ecars: migrations, workers, the embedded broker).
        std::thread::sleep(Duration::from_secs(1));
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory, KiB.
    fn rss_kib(&self) -> u64 {
        status_field(self.pid(), "VmRSS:")
    }

    /// Peak resident memory, KiB.
    fn peak_kib(&self) -> u64 {
        status_field(self.pid(), "VmHWM:")
    }

    fn descriptors(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// CPU time used so far (user + system), seconds.
    fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        ticks as f64 / 100.0
    }

    /// Rows in `sensor_data` (ecars only), after the broker stopped.
    fn stored(&self) -> Option<i64> {
        let url = self.database_url.as_ref()?;
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let db = ecars_db::Database::connect_lazy(url).unwrap();
            db.sensor_rows().count().await.ok()
        })
    }

    /// Stops the broker (SIGTERM, so ecars commits what it acknowledged) and waits.
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn status_field(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Starts a generator process of this binary.
fn generator(args: &[String]) -> Child {
    generator_with(args, &[])
}

/// Starts a generator process of this binary with `env` (its TLS settings).
fn generator_with(args: &[String], env: &[(&'static str, String)]) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .arg("--generator")
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// The first line a generator prints.
fn first_line(child: &mut Child) -> String {
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    line.trim().to_owned()
}

fn idle(quick: bool) {
    let cars: usize = if quick { 5_000 } else { 15_000 };
    println!("\n## idle: {cars} connected cars, keep-alive 300 s, sending nothing\n");
    println!("| broker | memory before | memory with the cars | per car | descriptors per car |");
    println!("|---|---|---|---|---|");
    for make in [Broker::mosquitto as fn() -> Broker, Broker::ecars] {
        let mut broker = make();
        let (rss0, fds0) = (broker.rss_kib(), broker.descriptors());
        let mut cars_process = generator(&[
            "idle".into(),
            broker.port.to_string(),
            cars.to_string(),
            "300".into(),
        ]);
        let connected = first_line(&mut cars_process);
        assert_eq!(connected, format!("connected {cars}"), "{}", broker.name);
        std::thread::sleep(Duration::from_secs(3));
        let (rss, fds) = (broker.rss_kib(), broker.descriptors());
        println!(
            "| {} | {:.1} MiB | {:.1} MiB | {:.2} KiB | {:.2} |",
            broker.name,
            rss0 as f64 / 1024.0,
            rss as f64 / 1024.0,
            (rss.saturating_sub(rss0)) as f64 / cars as f64,
            (fds.saturating_sub(fds0)) as f64 / cars as f64,
        );
        drop(cars_process.stdin.take());
        let _ = cars_process.kill();
        let _ = cars_process.wait();
        broker.stop();
    }
}

/// The columns of a fixed-rate run's table ([`run_load`] prints its rows).
fn print_rate_header() {
    println!("| broker | acknowledged | delivered to `#` | stored | PUBACK p50 / p99 | PUBACK p99 / max from due | to subscriber p50 / p99 | CPU | CPU per 1,000/s |");
    println!("|---|---|---|---|---|---|---|---|---|");
}

fn rate(quick: bool, ecars_only: bool) {
    let (cars, rate, seconds) = (100u32, 40_000u32, if quick { 20 } else { 60 });
    println!(
        "\n## rate: {cars} cars, {rate} QoS 1 readings/s for {seconds} s, one `#` subscriber\n"
    );
    print_rate_header();
    if !ecars_only {
        run_load(Broker::mosquitto(), cars, rate, seconds, 64, false, &[]);
    }
    run_load(Broker::ecars(), cars, rate, seconds, 64, false, &[]);
}

fn tls(quick: bool) {
    let certificates = Certificates::make();
    let (cars, rate, seconds) = (100u32, 10_000u32, if quick { 10 } else { 30 });
    println!(
        "\n## tls: {cars} cars, {rate} QoS 1 readings/s for {seconds} s over plain TCP and TLS, one `#` subscriber\n"
    );
    print_rate_header();
    run_load(Broker::mosquitto(), cars, rate, seconds, 64, false, &[]);
    run_load(
        Broker::mosquitto_with(Some(&certificates)),
        cars,
        rate,
        seconds,
        64,
        false,
        &certificates.generator_env(false),
    );
    run_load(Broker::ecars(), cars, rate, seconds, 64, false, &[]);
    run_load(
        Broker::ecars_with(Some(&certificates)),
        cars,
        rate,
        seconds,
        64,
        false,
        &certificates.generator_env(false),
    );

    let cars = 1_000usize;
    println!("\n## tls: {cars} cars connecting with mutual TLS (P-256 certificates, TLS 1.3)\n");
    println!("| broker | connected in | handshakes/s | memory per TLS car | broker CPU |");
    println!("|---|---|---|---|---|");
    for make in [Broker::mosquitto_with, Broker::ecars_with] {
        let mut broker = make(Some(&certificates));
        let (rss0, cpu0) = (broker.rss_kib(), broker.cpu_seconds());
        let started = Instant::now();
        let mut connecting = generator_with(
            &[
                "idle".into(),
                broker.tls_port.unwrap().to_string(),
                cars.to_string(),
                "300".into(),
            ],
            &certificates.generator_env(true),
        );
        let connected = first_line(&mut connecting);
        let took = started.elapsed().as_secs_f64();
        assert_eq!(connected, format!("connected {cars}"), "{}", broker.name);
        let cpu = broker.cpu_seconds() - cpu0;
        std::thread::sleep(Duration::from_secs(2));
        let rss = broker.rss_kib();
        println!(
            "| {} | {:.2} s | {:.0} | {:.1} KiB | {:.2} s |",
            broker.name,
            took,
            cars as f64 / took,
            rss.saturating_sub(rss0) as f64 / cars as f64,
            cpu,
        );
        drop(connecting.stdin.take());
        let _ = connecting.kill();
        let _ = connecting.wait();
        broker.stop();
    }
}

fn overload(quick: bool) {
    let seconds = if quick { 10 } else { 20 };
    println!("\n## overload: 100 cars as fast as acknowledged (256 in flight each) for {seconds} s, a slow `#` subscriber\n");
    println!("| broker | acknowledged | delivered to `#` | stored | PUBACK p50 / p99 | PUBACK p99 / max from due | to subscriber p50 / p99 | CPU | peak memory |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for make in [Broker::mosquitto as fn() -> Broker, Broker::ecars] {
        run_load(make(), 100, 0, seconds, 256, true, &[]);
    }
}

/// One load run; the cars use the broker's TLS port when it has one (with `env` telling the
/// generator how to connect), the subscriber its plain port.
fn run_load(
    mut broker: Broker,
    cars: u32,
    rate: u32,
    seconds: u64,
    window: u32,
    slow: bool,
    env: &[(&'static str, String)],
) {
    let mut subscriber = generator(&[
        "subscribe".into(),
        broker.port.to_string(),
        (seconds + 15).to_string(),
        slow.to_string(),
    ]);
    assert_eq!(first_line(&mut subscriber), "subscribed");
    let cpu0 = broker.cpu_seconds();
    let started = Instant::now();
    let mut load = generator_with(
        &[
            "rate".into(),
            broker.tls_port.unwrap_or(broker.port).to_string(),
            cars.to_string(),
            rate.to_string(),
            seconds.to_string(),
            window.to_string(),
        ],
        env,
    );
    let report: serde_json::Value = serde_json::from_str(&first_line(&mut load)).unwrap();
    let wall = started.elapsed().as_secs_f64();
    let cpu = broker.cpu_seconds() - cpu0;
    let peak = broker.peak_kib();
    let _ = load.wait();
    let delivered: serde_json::Value = serde_json::from_str(&first_line(&mut subscriber)).unwrap();
    let _ = subscriber.kill();
    let _ = subscriber.wait();
    broker.stop();
    let stored = broker.stored().map_or("-".to_owned(), |n| n.to_string());
    let acked = report["acked"].as_f64().unwrap_or(0.0);
    let cores = cpu / wall;
    let last = if slow {
        format!("{:.0} MiB", peak as f64 / 1024.0)
    } else {
        format!("{:.2} % of a core", cores * 100.0 / (acked / wall / 1000.0))
    };
    // At a fixed rate: acknowledged of the readings due, and the wait from when each was due
    // (it includes the time a car held it back for a full window).
    let (acknowledged, from_due) = match report["due"].as_u64() {
        Some(due) => (
            format!("{} of {due}", report["acked"]),
            format!(
                "{:.1} / {:.1} ms",
                report["due_p99_ms"].as_f64().unwrap_or(0.0),
                report["due_max_ms"].as_f64().unwrap_or(0.0)
            ),
        ),
        None => (report["acked"].to_string(), "-".to_owned()),
    };
    println!(
        "| {} | {} | {} | {} | {:.1} / {:.1} ms | {} | {:.1} / {:.1} ms | {:.0} % of a core | {} |",
        broker.name,
        acknowledged,
        delivered["received"],
        stored,
        report["ack_p50_ms"].as_f64().unwrap_or(0.0),
        report["ack_p99_ms"].as_f64().unwrap_or(0.0),
        from_due,
        delivered["p50_ms"].as_f64().unwrap_or(0.0),
        delivered["p99_ms"].as_f64().unwrap_or(0.0),
        cores * 100.0,
        last,
    );
    std::io::stdout().flush().unwrap();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--generator") {
        return load::main(&args[at + 1..]);
    }
    let quick = args.iter().any(|a| a == "--quick");
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let wanted = |name: &str| only.as_deref().is_none_or(|o| o == name);
    println!("# MQTT edge: ecars up and mosquitto, same load generator, same machine");
    if wanted("idle") {
        idle(quick);
    }
    if wanted("rate") {
        rate(quick, args.iter().any(|a| a == "--ecars-only"));
    }
    if wanted("overload") {
        overload(quick);
    }
    if wanted("tls") {
        tls(quick);
    }
    if only.as_deref() == Some("soak") {
        // `--minutes N`: the full load for a shorter (or longer) time.
        let minutes = args
            .iter()
            .position(|a| a == "--minutes")
            .and_then(|i| args.get(i + 1))
            .map(|m| m.parse::<u64>().expect("--minutes takes a whole number"));
        soak(quick, minutes);
    }
}

/// The soak run (see the module's documentation).
fn soak(quick: bool, minutes: Option<u64>) {
    let (cars, rate, seconds, sockets) = if quick {
        (200u32, 1_000u32, 120u64, 100u32)
    } else {
        (2_000, 10_000, 1_800, 1_000)
    };
    let seconds = minutes.map_or(seconds, |m| m * 60);
    println!(
        "\n## soak: {cars} cars, {rate} QoS 1 readings/s for {} min through ecars up on PostgreSQL, {sockets} live-view sockets\n",
        seconds / 60
    );
    let pg = ecars_e2e::PgServer::start().expect("PostgreSQL");
    let logs = tempfile::NamedTempFile::new().unwrap();
    let http = free_port();
    let port = free_port();
    let child = Command::new(ECARS)
        .args(["up", "--mqtt-addr", &format!("127.0.0.1:{port}")])
        .args(["--mqtt-ws-addr", &format!("127.0.0.1:{}", free_port())])
        .args(["--http-addr", &format!("127.0.0.1:{http}")])
        .args(["--admin-addr", &format!("127.0.0.1:{}", free_port())])
        .env("DATABASE_URL", pg.url())
        .env("ECARS_LOG", "warn,rumqttd=off")
        .env_remove("ECARS_DEVICE_SECRET")
        .stdout(Stdio::null())
        .stderr(logs.reopen().unwrap())
        .spawn()
        .expect("the ecars binary");
    let mut broker = Broker {
        name: "ecars up (PostgreSQL)",
        child,
        port,
        tls_port: None,
        _dir: tempfile::tempdir().unwrap(),
        database_url: Some(pg.url()),
    };
    broker.wait_listening();
    let mut watchers = generator(&[
        "sockets".into(),
        http.to_string(),
        sockets.to_string(),
        cars.to_string(),
        (seconds + 20).to_string(),
    ]);
    assert_eq!(first_line(&mut watchers), "connected");

    // Resident memory (MiB) and descriptors every 10 s while the load runs.
    let samples: std::sync::Arc<std::sync::Mutex<Vec<(f64, f64, usize)>>> = Default::default();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (samples, done, pid) = (samples.clone(), done.clone(), broker.pid());
        std::thread::spawn(move || {
            let started = Instant::now();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let at = started.elapsed().as_secs_f64();
                let rss = status_field(pid, "VmRSS:") as f64 / 1024.0;
                let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
                eprintln!("soak: {at:>6.0} s  {rss:>8.1} MiB  {fds:>6} descriptors");
                samples.lock().unwrap().push((at, rss, fds));
                std::thread::sleep(Duration::from_secs(10));
            }
        })
    };
    let mut load = generator(&[
        "rate".into(),
        port.to_string(),
        cars.to_string(),
        rate.to_string(),
        seconds.to_string(),
        "64".into(),
    ]);
    let report: serde_json::Value = serde_json::from_str(&first_line(&mut load)).unwrap();
    let _ = load.wait();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = sampler.join();
    let watched: serde_json::Value = serde_json::from_str(&first_line(&mut watchers)).unwrap();
    let _ = watchers.wait();
    broker.stop();
    let stored = broker.stored().unwrap_or(-1);
    let acked = report["acked"].as_i64().unwrap_or(0);
    let log = std::fs::read_to_string(logs.path()).unwrap_or_default();
    let errors = log.lines().filter(|l| l.contains("ERROR")).count();
    let warnings = log.lines().filter(|l| l.contains("WARN")).count();

    let samples = samples.lock().unwrap().clone();
    let at = |t: f64| {
        samples
            .iter()
            .min_by(|a, b| (a.0 - t).abs().total_cmp(&(b.0 - t).abs()))
            .map_or((0.0, 0), |s| (s.1, s.2))
    };
    // Least-squares slope of memory after the first minute (warm-up), MiB per hour.
    let steady: Vec<_> = samples.iter().filter(|s| s.0 >= 60.0).collect();
    let n = steady.len() as f64;
    let (mean_t, mean_m) = (
        steady.iter().map(|s| s.0).sum::<f64>() / n,
        steady.iter().map(|s| s.1).sum::<f64>() / n,
    );
    let slope = steady
        .iter()
        .map(|s| (s.0 - mean_t) * (s.1 - mean_m))
        .sum::<f64>()
        / steady.iter().map(|s| (s.0 - mean_t).powi(2)).sum::<f64>()
        * 3600.0;
    let (start, ten, end) = (at(0.0), at(600.0), at(seconds as f64));
    println!("| readings acknowledged (per second) | stored | frames to live-view sockets | memory at start / 10 min / end | memory slope after 1 min | descriptors start / end | errors / warnings logged |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| {acked} ({:.0}/s of {rate}/s) | {stored} | {} ({} sockets, {} closed early) | {:.0} / {:.0} / {:.0} MiB | {slope:+.1} MiB/h | {} / {} | {errors} / {warnings} |",
        acked as f64 / seconds as f64,
        watched["frames"], watched["connected"], watched["closed_early"], start.0, ten.0, end.0, start.1, end.1
    );
    // What was logged, by message (the first words after the level), most frequent first, with
    // the first whole line of each.
    let mut messages: std::collections::BTreeMap<String, (usize, String)> = Default::default();
    for line in log
        .lines()
        .filter(|l| l.contains("ERROR") || l.contains("WARN"))
    {
        let text = without_colours(line);
        let message = text
            .split_once("WARN")
            .or_else(|| text.split_once("ERROR"))
            .map_or(text.as_str(), |(_, rest)| rest)
            .split_whitespace()
            .take(8)
            .collect::<Vec<_>>()
            .join(" ");
        messages.entry(message).or_insert((0, text.clone())).0 += 1;
    }
    let mut messages: Vec<_> = messages.into_iter().collect();
    messages.sort_by_key(|(_, (count, _))| std::cmp::Reverse(*count));
    for (_, (count, first)) in messages.iter().take(5) {
        let first: String = first.chars().take(600).collect();
        println!("logged {count} times, first: {first}");
    }
    assert_eq!(stored, acked, "every acknowledged reading is stored");
    std::io::stdout().flush().unwrap();
}

/// A log line without its ANSI colour sequences (`ESC [ … m`).
fn without_colours(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The load generator: raw MQTT 3.1.1 over TCP, pre-encoded packets, little CPU per message.
mod load {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use ecars_e2e::mqtt_wire::put_varint as varint;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio_rustls::rustls;

    /// A connection to the broker, plain or TLS.
    trait Connection: AsyncRead + AsyncWrite + Unpin + Send {}
    impl<T: AsyncRead + AsyncWrite + Unpin + Send> Connection for T {}
    type Stream = Box<dyn Connection>;

    /// TLS from `EDGE_TLS_CA` (and `EDGE_TLS_CERT`/`EDGE_TLS_KEY` for a client certificate);
    /// `None`: plain TCP.
    fn tls_connector() -> Option<tokio_rustls::TlsConnector> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let ca = std::env::var("EDGE_TLS_CA").ok()?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&ca).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let config = match (
            std::env::var("EDGE_TLS_CERT"),
            std::env::var("EDGE_TLS_KEY"),
        ) {
            (Ok(cert), Ok(key)) => builder
                .with_client_auth_cert(
                    CertificateDer::pem_file_iter(&cert)
                        .unwrap()
                        .map(|c| c.unwrap())
                        .collect(),
                    PrivateKeyDer::from_pem_file(&key).unwrap(),
                )
                .unwrap(),
            _ => builder.with_no_client_auth(),
        };
        Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
    }

    /// A client id: `name`, after `EDGE_CLIENT_PREFIX` when set (a certified car's VIN).
    fn client_id(name: &str) -> String {
        match std::env::var("EDGE_CLIENT_PREFIX") {
            Ok(prefix) => format!("{prefix}-{name}"),
            Err(_) => name.to_owned(),
        }
    }

    pub(super) fn main(args: &[String]) {
        // One descriptor per car: take what the hard limit allows.
        let _ = rlimit::increase_nofile_limit(u64::MAX);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let port: u16 = args[1].parse().unwrap();
        match args[0].as_str() {
            "idle" => runtime.block_on(idle(
                port,
                args[2].parse().unwrap(),
                args[3].parse().unwrap(),
            )),
            "rate" => runtime.block_on(rate(
                port,
                args[2].parse().unwrap(),
                args[3].parse().unwrap(),
                args[4].parse().unwrap(),
                args[5].parse().unwrap(),
            )),
            "subscribe" => {
                runtime.block_on(subscribe(port, args[2].parse().unwrap(), args[3] == "true"))
            }
            "sockets" => runtime.block_on(sockets(
                port,
                args[2].parse().unwrap(),
                args[3].parse().unwrap(),
                args[4].parse().unwrap(),
            )),
            other => panic!("unknown generator {other}"),
        }
    }

    fn connect_packet(client_id: &str, keep_alive: u16) -> Vec<u8> {
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02];
        body.extend_from_slice(&keep_alive.to_be_bytes());
        body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
        body.extend_from_slice(client_id.as_bytes());
        let mut out = vec![0x10];
        varint(&mut out, body.len());
        out.extend_from_slice(&body);
        out
    }

    async fn open(port: u16) -> std::io::Result<Stream> {
        static CONNECTOR: std::sync::OnceLock<Option<tokio_rustls::TlsConnector>> =
            std::sync::OnceLock::new();
        let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
        let _ = tcp.set_nodelay(true);
        match CONNECTOR.get_or_init(tls_connector) {
            None => Ok(Box::new(tcp)),
            Some(connector) => {
                let name =
                    rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
                Ok(Box::new(connector.connect(name, tcp).await?))
            }
        }
    }

    async fn connected(port: u16, client_id: &str, keep_alive: u16) -> Stream {
        let client_id = self::client_id(client_id);
        let client_id = client_id.as_str();
        loop {
            if let Ok(mut socket) = open(port).await {
                if socket
                    .write_all(&connect_packet(client_id, keep_alive))
                    .await
                    .is_ok()
                {
                    let mut connack = [0u8; 4];
                    if socket.read_exact(&mut connack).await.is_ok() && connack[3] == 0 {
                        return socket;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn idle(port: u16, cars: usize, keep_alive: u16) {
        let limit = Arc::new(tokio::sync::Semaphore::new(200));
        let mut tasks = Vec::new();
        for n in 0..cars {
            let limit = Arc::clone(&limit);
            tasks.push(tokio::spawn(async move {
                let permit = limit.acquire_owned().await.unwrap();
                let socket = connected(port, &format!("idle-{n}"), keep_alive).await;
                drop(permit);
                socket
            }));
        }
        let mut sockets = Vec::with_capacity(cars);
        for task in tasks {
            sockets.push(task.await.unwrap());
        }
        println!("connected {}", sockets.len());
        // Hold them until the orchestrator closes our stdin.
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 1];
        let _ = stdin.read(&mut buf).await;
        drop(sockets);
    }

    fn publish_packet(topic: &str, pkid: u16, payload: &str) -> Vec<u8> {
        let mut out = vec![0x32];
        varint(&mut out, 2 + topic.len() + 2 + payload.len());
        out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        out.extend_from_slice(topic.as_bytes());
        out.extend_from_slice(&pkid.to_be_bytes());
        out.extend_from_slice(payload.as_bytes());
        out
    }

    fn percentile(sorted: &[f64], p: f64) -> f64 {
        if sorted.is_empty() {
            return 0.0;
        }
        sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
    }

    /// `cars` cars publishing `rate` readings/s in all (0: as fast as acknowledged) for
    /// `seconds`, each with at most `window` unacknowledged.
    ///
    /// At a fixed rate each reading has a time it is due, and a car whose window is full holds
    /// its due readings back until acknowledgements make room, as an MQTT client's queue does:
    /// every reading is sent, and a broker that stalls shows in `due_p99_ms` (due to
    /// acknowledged) instead of in readings never sent or latencies never measured
    /// ("coordinated omission"). The cars stop sending 30 s after `seconds` whatever is left
    /// (`sent` then falls short of `due`).
    async fn rate(port: u16, cars: u32, rate: u32, seconds: u64, window: u32) {
        let latencies: Arc<Mutex<Vec<(f64, f64)>>> = Arc::default();
        let acked = Arc::new(AtomicU64::new(0));
        let sent = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let until = start + Duration::from_secs(seconds);
        let give_up = until + Duration::from_secs(30);
        // Readings per second of each car, and how many each sends in all.
        let per_car = f64::from(rate) / f64::from(cars);
        let total = (per_car * seconds as f64).round() as u64;
        let mut tasks = Vec::new();
        for car in 0..cars {
            let (latencies, acked, sent) = (
                Arc::clone(&latencies),
                Arc::clone(&acked),
                Arc::clone(&sent),
            );
            tasks.push(tokio::spawn(async move {
                let vin = format!("1LOAD0000{car:08}");
                let topic = format!("vehicles/{vin}/telemetry");
                let socket = connected(port, &format!("load-{car}"), 60).await;
                let (mut read, mut write) = tokio::io::split(socket);
                // Packet id → (sent, due).
                let in_flight: Arc<Mutex<std::collections::HashMap<u16, (Instant, Instant)>>> =
                    Arc::default();
                let room = Arc::new(tokio::sync::Semaphore::new(window as usize));
                // Set before the last PUBLISH is written, so the reader that finds nothing in
                // flight after it knows the car is done.
                let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let reader = {
                    let (in_flight, room, latencies, acked, finished) = (
                        Arc::clone(&in_flight),
                        Arc::clone(&room),
                        Arc::clone(&latencies),
                        Arc::clone(&acked),
                        Arc::clone(&finished),
                    );
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        let mut partial = 0usize;
                        let mut mine = Vec::new();
                        loop {
                            let n = match read.read(&mut buf[partial..]).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            let available = partial + n;
                            let whole = available / 4 * 4;
                            let now = Instant::now();
                            {
                                let mut in_flight = in_flight.lock().unwrap();
                                for ack in buf[..whole].chunks_exact(4) {
                                    let pkid = u16::from_be_bytes([ack[2], ack[3]]);
                                    if let Some((at, due)) = in_flight.remove(&pkid) {
                                        let ms = |t: Instant| {
                                            now.duration_since(t).as_secs_f64() * 1000.0
                                        };
                                        mine.push((ms(at), ms(due)));
                                        acked.fetch_add(1, Ordering::Relaxed);
                                        room.add_permits(1);
                                    }
                                }
                                let done = if rate == 0 {
                                    Instant::now() > until
                                } else {
                                    finished.load(Ordering::Acquire)
                                };
                                if in_flight.is_empty() && done {
                                    break;
                                }
                            }
                            buf.copy_within(whole..available, 0);
                            partial = available - whole;
                        }
                        room.close();
                        latencies.lock().unwrap().extend(mine);
                    })
                };
                // Paced in ticks of 10 ms: each tick sends the readings due by then.
                let mut tick = tokio::time::interval(Duration::from_millis(10));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut n: u64 = 0;
                let mut out = Vec::with_capacity(64 * 1024);
                'send: loop {
                    let now = Instant::now();
                    let due = if rate == 0 {
                        if now >= until {
                            break;
                        }
                        n + 1
                    } else {
                        if n >= total || now >= give_up {
                            break;
                        }
                        let by_now = (now.duration_since(start).as_secs_f64() * per_car) as u64;
                        if by_now <= n {
                            tick.tick().await;
                            continue;
                        }
                        by_now.min(total)
                    };
                    out.clear();
                    let mut window_full = false;
                    while n < due {
                        let permit = if rate == 0 {
                            match room.clone().acquire_owned().await {
                                Ok(p) => p,
                                Err(_) => break 'send,
                            }
                        } else {
                            match room.clone().try_acquire_owned() {
                                Ok(p) => p,
                                Err(tokio::sync::TryAcquireError::NoPermits) => {
                                    window_full = true;
                                    break;
                                }
                                Err(tokio::sync::TryAcquireError::Closed) => break 'send,
                            }
                        };
                        permit.forget();
                        // When this reading was due (as fast as acknowledged: now).
                        let due_at = if rate == 0 {
                            Instant::now()
                        } else {
                            start + Duration::from_secs_f64(n as f64 / per_car)
                        };
                        n += 1;
                        let pkid = (n % 65_535 + 1) as u16;
                        let date = chrono::Utc::now()
                            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
                        let payload = format!(
                            r#"{{"vin":"{vin}","battery":{:.2},"speed":42,"latitude":37.77,"longitude":-122.42,"date":"{date}"}}"#,
                            80.0 - (n % 5000) as f64 / 100.0
                        );
                        in_flight
                            .lock()
                            .unwrap()
                            .insert(pkid, (Instant::now(), due_at));
                        out.extend_from_slice(&publish_packet(&topic, pkid, &payload));
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    if rate > 0 && n >= total {
                        finished.store(true, Ordering::Release);
                    }
                    if !out.is_empty() && write.write_all(&out).await.is_err() {
                        break;
                    }
                    if window_full {
                        // Wait for room (and give it back: the next pass takes it).
                        match tokio::time::timeout_at(
                            give_up.into(),
                            room.clone().acquire_owned(),
                        )
                        .await
                        {
                            Ok(Ok(permit)) => drop(permit),
                            Ok(Err(_)) | Err(_) => break,
                        }
                    }
                }
                finished.store(true, Ordering::Release);
                // The last acknowledgements, for at most 30 s.
                let _ = tokio::time::timeout(Duration::from_secs(30), reader).await;
                let _ = write.write_all(&[0xE0, 0]).await;
            }));
        }
        for task in tasks {
            let _ = task.await;
        }
        let (mut from_sent, mut from_due): (Vec<f64>, Vec<f64>) =
            std::mem::take(&mut *latencies.lock().unwrap())
                .into_iter()
                .unzip();
        from_sent.sort_by(f64::total_cmp);
        from_due.sort_by(f64::total_cmp);
        println!(
            "{}",
            serde_json::json!({
                "due": if rate == 0 { serde_json::Value::Null } else { (total * u64::from(cars)).into() },
                "sent": sent.load(Ordering::Relaxed),
                "acked": acked.load(Ordering::Relaxed),
                "ack_p50_ms": percentile(&from_sent, 0.50),
                "ack_p99_ms": percentile(&from_sent, 0.99),
                "due_p99_ms": percentile(&from_due, 0.99),
                "due_max_ms": from_due.last().copied().unwrap_or(0.0),
            })
        );
    }

    /// Opens `count` live-view sockets on the relay at `http`, each following one of the rate
    /// generator's `cars`, prints "connected", counts frames for `seconds`, then prints what
    /// it saw.
    async fn sockets(http: u16, count: u32, cars: u32, seconds: u64) {
        use futures_util::StreamExt;
        let opened = futures_util::stream::iter(0..count)
            .map(|i| {
                let url = format!(
                    "ws://127.0.0.1:{http}/v1/vehicles/1LOAD0000{:08}/live",
                    i % cars.max(1)
                );
                async move { tokio_tungstenite::connect_async(url).await.map(|(s, _)| s) }
            })
            .buffer_unordered(64)
            .collect::<Vec<_>>()
            .await;
        let connected = opened.iter().filter(|s| s.is_ok()).count();
        println!("connected");
        let frames = Arc::new(AtomicU64::new(0));
        let closed_early = Arc::new(AtomicU64::new(0));
        let until = tokio::time::Instant::now() + Duration::from_secs(seconds);
        let mut readers = Vec::new();
        for mut socket in opened.into_iter().flatten() {
            let (frames, closed_early) = (Arc::clone(&frames), Arc::clone(&closed_early));
            readers.push(tokio::spawn(async move {
                loop {
                    match tokio::time::timeout_at(until, socket.next()).await {
                        Err(_) => return,
                        Ok(Some(Ok(_))) => {
                            frames.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {
                            closed_early.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                }
            }));
        }
        for reader in readers {
            let _ = reader.await;
        }
        println!(
            "{}",
            serde_json::json!({
                "connected": connected,
                "frames": frames.load(Ordering::Relaxed),
                "closed_early": closed_early.load(Ordering::Relaxed),
            })
        );
    }

    /// Subscribes to `#` and reads for `seconds`; each reading's `date` is when it was sent.
    async fn subscribe(port: u16, seconds: u64, slow: bool) {
        let mut socket = connected(port, "watcher", 60).await;
        let mut body = vec![0, 1, 0, 1, b'#', 0];
        let mut subscribe = vec![0x82];
        varint(&mut subscribe, body.len());
        subscribe.append(&mut body);
        socket.write_all(&subscribe).await.unwrap();
        let mut suback = [0u8; 5];
        socket.read_exact(&mut suback).await.unwrap();
        println!("subscribed");
        let until = Instant::now() + Duration::from_secs(seconds);
        let mut latencies = Vec::new();
        let mut buf: Vec<u8> = Vec::with_capacity(256 * 1024);
        let mut chunk = vec![0u8; 64 * 1024];
        while Instant::now() < until {
            let read = tokio::time::timeout(Duration::from_secs(1), socket.read(&mut chunk)).await;
            let n = match read {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => n,
                Err(_) => continue,
            };
            buf.extend_from_slice(&chunk[..n]);
            let now = chrono::Utc::now();
            let mut at = 0;
            // Fixed header: type byte, remaining length (variable).
            while let Some(&first) = buf.get(at) {
                let mut len = 0usize;
                let mut shift = 0;
                let mut i = at + 1;
                let mut complete = false;
                while let Some(&b) = buf.get(i) {
                    len |= usize::from(b & 0x7f) << shift;
                    shift += 7;
                    i += 1;
                    if b & 0x80 == 0 {
                        complete = true;
                        break;
                    }
                }
                if !complete || buf.len() < i + len {
                    break;
                }
                if first >> 4 == 3 {
                    let packet = &buf[i..i + len];
                    let topic_len = usize::from(u16::from_be_bytes([packet[0], packet[1]]));
                    let qos = (first >> 1) & 3;
                    let start = 2 + topic_len + if qos > 0 { 2 } else { 0 };
                    if let Some(payload) = packet.get(start..) {
                        if let Some(date) = std::str::from_utf8(payload)
                            .ok()
                            .and_then(|p| p.split("\"date\":\"").nth(1))
                            .and_then(|d| d.split('"').next())
                            .and_then(|d| chrono::DateTime::parse_from_rfc3339(d).ok())
                        {
                            let ms = (now - date.with_timezone(&chrono::Utc))
                                .num_microseconds()
                                .unwrap_or(0) as f64
                                / 1000.0;
                            latencies.push(ms);
                        }
                    }
                    if slow {
                        tokio::time::sleep(Duration::from_micros(200)).await;
                    }
                }
                at = i + len;
            }
            buf.drain(..at);
        }
        latencies.sort_by(f64::total_cmp);
        println!(
            "{}",
            serde_json::json!({
                "received": latencies.len(),
                "p50_ms": percentile(&latencies, 0.50),
                "p99_ms": percentile(&latencies, 0.99),
            })
        );
    }
}
