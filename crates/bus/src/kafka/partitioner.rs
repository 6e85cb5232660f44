//! Which partition a keyed record goes to: the Java client's rule, so a Java (or Kafka
//! Streams, or ksqlDB) service that produces or joins by VIN finds each car in the partition we
//! put it in. librdkafka computes it (`partitioner=murmur2_random`); this is the rule written
//! out, for the AsyncAPI document's promise and for tests that check librdkafka keeps it.

/// The partitioner librdkafka is configured with: murmur2 of the key as the Java client hashes
/// it (records without a key, which we never send, go to a random partition).
pub const LIBRDKAFKA_PARTITIONER: &str = "murmur2_random";

/// Kafka's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`): MurmurHash2, seed
/// `0x9747b28c`, little-endian 4-byte blocks.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h = SEED ^ data.len() as u32;
    let mut blocks = data.chunks_exact(4);
    for block in &mut blocks {
        let mut k = u32::from_le_bytes([block[0], block[1], block[2], block[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = blocks.remainder();
    if !tail.is_empty() {
        for (i, byte) in tail.iter().enumerate().rev() {
            h ^= u32::from(*byte) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition of `key` among `partitions` (more than zero), as the Java client's default
/// partitioner chooses it: `toPositive(murmur2(key)) % partitions`.
pub fn java_partition(key: &[u8], partitions: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Java client's own values (Kafka's `UtilsTest.testMurmur2`, and the vectors other
    /// ports check against it).
    #[test]
    fn murmur2_equals_the_java_clients() {
        for (key, hash) in [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            ("abc", 479_470_107),
            ("1", -1_993_445_489),
            ("12", 126_087_238),
            ("123", -267_702_483),
            ("1234", -1_614_185_708),
            ("12345", -1_188_365_604),
        ] {
            assert_eq!(murmur2(key.as_bytes()), hash, "{key}");
        }
    }

    #[test]
    fn a_partition_is_the_positive_hash_modulo_the_count() {
        // murmur2("foobar") is negative: its sign bit is dropped, not its absolute value taken.
        let positive = -790_332_482_i32 & 0x7fff_ffff;
        assert_eq!(java_partition(b"foobar", 12), positive % 12);
        for partitions in 1..20 {
            let p = java_partition(b"5YJ3E1EA7JF000316", partitions);
            assert!((0..partitions).contains(&p));
        }
    }
}
