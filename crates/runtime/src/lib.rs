//! What every ecars service runs on:
//!
//! - [`writer`]: the batch writer (records from a bus subscription, committed in batches, then
//!   acknowledged);
//! - [`readiness`]: which parts of a process can serve;
//! - [`logging`]: log lines a peer can cause, kept to a budget;
//! - [`metrics`]: the Prometheus recorder;
//! - [`settings`]: logging, durations, secrets from a value or a file, defaults written once;
//! - [`reloading`]: settings files re-read while the process runs (API keys);
//! - [`tls`]: TLS for the listeners, certificates reloaded, client certificates read;
//! - [`supervisor`]: a process's parts, started and stopped in a declared order;
//! - [`signal`]: the shutdown signal.

pub mod accept;
pub mod logging;
pub mod metrics;
pub mod process;
pub mod readiness;
pub mod reloading;
pub mod settings;
pub mod signal;
pub mod supervisor;
pub mod tls;
pub mod writer;

pub use readiness::Readiness;
pub use supervisor::Supervisor;
