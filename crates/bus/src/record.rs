//! Records with their type erased, as backends carry them: a backend routes by [`Stream`] and
//! encodes through [`AnyRecord`] without knowing the record types.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use ecars_model::Record;
use uuid::Uuid;

use crate::Stream;

/// A [`Record`] of any type, as a backend handles it.
pub trait AnyRecord: Any + Send + Sync + fmt::Debug {
    /// [`Record::key`].
    fn key(&self) -> &str;
    /// [`Record::id`].
    fn id(&self) -> Uuid;
    /// [`Record::time`].
    fn time(&self) -> DateTime<Utc>;
    /// [`Record::subject`].
    fn subject(&self) -> &str;
    /// The record as JSON.
    fn encode(&self) -> Result<Vec<u8>, serde_json::Error>;
    /// The record as [`Any`], to be downcast to its type again.
    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
}

impl<T: Record> AnyRecord for T {
    fn key(&self) -> &str {
        Record::key(self)
    }

    fn id(&self) -> Uuid {
        Record::id(self)
    }

    fn time(&self) -> DateTime<Utc> {
        Record::time(self)
    }

    fn subject(&self) -> &str {
        Record::subject(self)
    }

    fn encode(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }

    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }
}

/// A record on its way to a backend, with its stream.
#[derive(Clone, Debug)]
pub struct Envelope {
    /// The record's stream.
    pub stream: Stream,
    /// The record (shared: an in-process backend hands one copy to every group).
    pub record: Arc<dyn AnyRecord>,
}

impl Envelope {
    /// Wraps a typed record.
    pub fn new<T: Record>(record: T) -> Envelope {
        Envelope {
            stream: Stream::of::<T>(),
            record: Arc::new(record),
        }
    }
}
