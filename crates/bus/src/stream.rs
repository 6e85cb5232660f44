//! What the bus knows of a stream: the [`Record`] type's names and how to decode its values.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use ecars_model::Record;

use crate::record::AnyRecord;

/// Decodes a stream's JSON value into its record.
type Decode = fn(&[u8]) -> Result<Arc<dyn AnyRecord>, serde_json::Error>;

/// A stream, derived from its [`Record`] type by [`Stream::of`]. Two streams are the same when
/// their names are.
#[derive(Clone, Copy)]
pub struct Stream {
    /// [`Record::STREAM`]: metric labels, logs.
    pub name: &'static str,
    /// [`Record::TOPIC`]: the Kafka topic after the prefix.
    pub topic: &'static str,
    /// [`Record::EVENT_TYPE`].
    pub event_type: &'static str,
    /// [`Record::SOURCE`].
    pub source: &'static str,
    decode: Decode,
}

fn decode_as<T: Record>(value: &[u8]) -> Result<Arc<dyn AnyRecord>, serde_json::Error> {
    Ok(Arc::new(serde_json::from_slice::<T>(value)?))
}

impl Stream {
    /// The stream of records of type `T`.
    pub fn of<T: Record>() -> Stream {
        Stream {
            name: T::STREAM,
            topic: T::TOPIC,
            event_type: T::EVENT_TYPE,
            source: T::SOURCE,
            decode: decode_as::<T>,
        }
    }

    /// Decodes a JSON value of this stream (what a transport that carries bytes receives).
    pub fn decode(&self, value: &[u8]) -> Result<Arc<dyn AnyRecord>, serde_json::Error> {
        (self.decode)(value)
    }
}

impl PartialEq for Stream {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for Stream {}

impl Hash for Stream {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.name.hash(state);
    }
}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Stream({})", self.name)
    }
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}
