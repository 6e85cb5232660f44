//! The process's own resources as Prometheus' standard `process_*` metrics (what the Go and
//! Java clients export, so existing dashboards work): resident memory, open descriptors, CPU
//! time and start time, read from Linux's `/proc/self` when `/metrics` is scraped.

/// Resident memory, bytes.
pub const RESIDENT_MEMORY: &str = "process_resident_memory_bytes";
/// Open file descriptors.
pub const OPEN_FDS: &str = "process_open_fds";
/// The most descriptors the process may open (its soft limit).
pub const MAX_FDS: &str = "process_max_fds";
/// User and system CPU time, seconds.
pub const CPU_SECONDS: &str = "process_cpu_seconds_total";
/// When the process started, Unix seconds.
pub const START_TIME: &str = "process_start_time_seconds";

/// Clock ticks per second of `/proc/self/stat`'s times (`sysconf(_SC_CLK_TCK)`, 100 on every
/// Linux architecture we build for).
const TICKS_PER_SECOND: f64 = 100.0;

/// What `/proc/self/stat` says: CPU ticks (user + system) and the start in ticks after boot.
#[derive(Debug, PartialEq, Eq)]
struct Stat {
    cpu_ticks: u64,
    start_ticks: u64,
}

/// Parses `/proc/self/stat`. The command name (field 2) is in parentheses and may hold spaces
/// and parentheses itself, so fields are counted from the last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, so field n is fields[n - 3].
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        cpu_ticks: field(14)? + field(15)?,
        start_ticks: field(22)?,
    })
}

/// The value of `key` (in kB) in `/proc/self/status`, in bytes.
fn status_kb(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|line| line.starts_with(key))?;
    let kb = line[key.len()..].trim().trim_end_matches("kB").trim();
    kb.parse::<u64>().ok().map(|kb| kb * 1024)
}

/// The soft limit of open files in `/proc/self/limits`.
fn max_open_files(text: &str) -> Option<u64> {
    let line = text
        .lines()
        .find(|line| line.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The system's boot time, Unix seconds (`btime` of `/proc/stat`).
fn boot_time(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// Unix time, in seconds, at which the process started.
fn start_seconds(stat: &Stat) -> Option<f64> {
    let boot = read("/proc/stat").as_deref().and_then(boot_time)?;
    Some(boot as f64 + stat.start_ticks as f64 / TICKS_PER_SECOND)
}

/// The process's resident memory in bytes (`None` without `/proc`).
pub fn resident_bytes() -> Option<u64> {
    read("/proc/self/status")
        .as_deref()
        .and_then(|text| status_kb(text, "VmRSS:"))
}

/// When the process started (`None` without `/proc`).
pub fn start_time() -> Option<std::time::SystemTime> {
    let stat = read("/proc/self/stat").as_deref().and_then(parse_stat)?;
    let seconds = start_seconds(&stat)?;
    std::time::Duration::try_from_secs_f64(seconds)
        .ok()
        .map(|since| std::time::UNIX_EPOCH + since)
}

/// Reads the process's resources and records them; on a system without `/proc` it records
/// nothing.
pub fn record() {
    if let Some(stat) = read("/proc/self/stat").as_deref().and_then(parse_stat) {
        metrics::counter!(CPU_SECONDS).absolute((stat.cpu_ticks as f64 / TICKS_PER_SECOND) as u64);
        if let Some(start) = start_seconds(&stat) {
            metrics::gauge!(START_TIME).set(start);
        }
    }
    if let Some(rss) = resident_bytes() {
        metrics::gauge!(RESIDENT_MEMORY).set(rss as f64);
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        metrics::gauge!(OPEN_FDS).set(fds.count() as f64);
    }
    if let Some(max) = read("/proc/self/limits")
        .as_deref()
        .and_then(max_open_files)
    {
        metrics::gauge!(MAX_FDS).set(max as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_count_from_the_end_of_the_name() {
        // A name with spaces and a parenthesis, as a thread may be called.
        let line = "4242 (ecars (up) x) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 75 0 0 20 0 \
                    6 0 123456 1000000 500 18446744073709551615";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                cpu_ticks: 325,
                start_ticks: 123_456
            })
        );
        assert_eq!(parse_stat("4242 (ecars) S 1"), None);
    }

    #[test]
    fn status_limits_and_boot_time_parse() {
        let status = "Name:\tecars\nVmPeak:\t  200000 kB\nVmRSS:\t   71234 kB\n";
        assert_eq!(status_kb(status, "VmRSS:"), Some(71_234 * 1024));
        assert_eq!(status_kb(status, "VmSwap:"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            20000                1048576              files\n";
        assert_eq!(max_open_files(limits), Some(20_000));
        assert_eq!(
            boot_time("cpu 1 2 3\nbtime 1764633600\nprocesses 5\n"),
            Some(1_764_633_600)
        );
    }

    #[test]
    fn this_process_reads_itself() {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(parse_stat(&stat).is_some(), "{stat}");
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(status_kb(&status, "VmRSS:").unwrap() > 1024 * 1024);
        let started = start_time().expect("a start time");
        let age = std::time::SystemTime::now()
            .duration_since(started)
            .expect("started in the past");
        assert!(age < std::time::Duration::from_secs(3600), "{age:?}");
    }
}
