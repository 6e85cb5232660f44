//! Readiness: which parts of a process can serve. `/readyz` is 200 only when every part says so
//! (and the process's dependencies answer).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// The readiness of a process's parts; cheap to clone, shared by every part.
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    parts: Arc<Mutex<BTreeMap<&'static str, bool>>>,
}

impl Readiness {
    /// Records whether a part (a worker, the broker, `draining`) is ready.
    pub fn set(&self, part: &'static str, ready: bool) {
        self.parts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(part, ready);
    }

    /// Every part and whether it is ready.
    pub fn snapshot(&self) -> BTreeMap<&'static str, bool> {
        self.parts.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether every part is ready.
    pub fn all_ready(&self) -> bool {
        self.snapshot().values().all(|ready| *ready)
    }
}
