//! Limits on retained messages, without I/O: the broker keeps a retained message per topic for
//! as long as it runs, so what clients may leave there is bounded in size and in topics, or one
//! client could fill the broker's memory (150 retained messages of 1 MB once took 263 MB).
//!
//! The gateway admits a retained PUBLISH here before anything else; one over a limit is refused
//! (MQTT 5: 0x97 "quota exceeded"; MQTT 3.1.1 has no refusal and closes the connection). An
//! empty retained payload clears its topic and frees its place. Where ACLs apply, only what the
//! client may publish reaches this check at all.

use std::collections::HashSet;
use std::sync::Mutex;

/// Why a retained message was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetainedRefusal {
    /// Its payload is over the size limit.
    TooLarge,
    /// Its topic would be one retained topic too many.
    TooManyTopics,
}

impl RetainedRefusal {
    /// Stable code for metric labels and logs.
    pub fn code(self) -> &'static str {
        match self {
            RetainedRefusal::TooLarge => "too_large",
            RetainedRefusal::TooManyTopics => "too_many_topics",
        }
    }
}

/// The topics holding a retained message, and the limits.
#[derive(Debug)]
pub struct RetainedTopics {
    max_bytes: usize,
    max_topics: usize,
    topics: Mutex<HashSet<String>>,
}

impl RetainedTopics {
    /// Retained payloads of at most `max_bytes`, on at most `max_topics` topics.
    pub fn new(max_bytes: usize, max_topics: usize) -> RetainedTopics {
        RetainedTopics {
            max_bytes,
            max_topics,
            topics: Mutex::default(),
        }
    }

    /// Admits a retained message of `payload_len` bytes on `topic`, or says why not.
    pub fn admit(&self, topic: &str, payload_len: usize) -> Result<(), RetainedRefusal> {
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        if payload_len == 0 {
            topics.remove(topic);
            return Ok(());
        }
        if payload_len > self.max_bytes {
            return Err(RetainedRefusal::TooLarge);
        }
        if topics.contains(topic) {
            return Ok(());
        }
        if topics.len() >= self.max_topics {
            return Err(RetainedRefusal::TooManyTopics);
        }
        topics.insert(topic.to_owned());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_and_topics_are_bounded_and_clearing_frees_a_place() {
        let retained = RetainedTopics::new(10, 2);
        assert_eq!(retained.admit("a", 11), Err(RetainedRefusal::TooLarge));
        assert_eq!(retained.admit("a", 10), Ok(()));
        assert_eq!(retained.admit("b", 1), Ok(()));
        assert_eq!(
            retained.admit("a", 5),
            Ok(()),
            "replacing takes no new place"
        );
        assert_eq!(retained.admit("c", 1), Err(RetainedRefusal::TooManyTopics));
        assert_eq!(retained.admit("a", 0), Ok(()), "an empty payload clears");
        assert_eq!(retained.admit("c", 1), Ok(()));
        assert_eq!(retained.admit("nothing-there", 0), Ok(()));
    }
}
