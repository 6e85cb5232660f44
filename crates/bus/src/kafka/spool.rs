//! A bounded, append-only spool on disk for records that cannot go to Kafka now.
//!
//! Ingest writes here while Kafka is unreachable (or slower than the cars), acknowledges the cars
//! once a record is on disk, and a drainer hands the records to Kafka in order when it returns.
//!
//! - Segments `{seq:020}.seg` of frames `[len u32][crc32 u32][payload]`; a `head` file records how
//!   far Kafka has acknowledged. Delivered segments are deleted.
//! - One writer thread groups concurrent appends into one write and one `fsync` (group commit).
//! - Bounded: when `max_bytes` are waiting, appends wait for the drainer to free a segment, which
//!   is backpressure up to the cars. A log line and a metric say so.
//! - After a crash, a torn frame at the end of the last segment is cut off; everything before it
//!   is delivered at the next start (at least once: a record Kafka acknowledged just before the
//!   crash may be delivered again, and its event id makes that harmless downstream).

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use crate::metrics as names;

/// Largest frame accepted when reading back (a record is at most an MQTT packet, 1 MiB, plus
/// headers); a longer length field means corruption.
const MAX_FRAME_BYTES: u32 = 8 * 1024 * 1024;
/// Most records and bytes written with one `fsync`.
const GROUP_RECORDS: usize = 4096;
const GROUP_BYTES: usize = 4 * 1024 * 1024;

/// Errors of the spool.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The spool's directory or files could not be used.
    #[error("spool {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// A frame failed its checksum or length check in the middle of a segment.
    #[error("spool {path} is corrupt at byte {offset}: {detail}")]
    Corrupt {
        /// The segment.
        path: PathBuf,
        /// Where.
        offset: u64,
        /// What is wrong.
        detail: String,
    },
    /// The spool was closed.
    #[error("the spool is closed")]
    Closed,
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Tag of a frame that names its topic (the frames of earlier versions carried a one-byte
/// stream number instead, [`LEGACY_TOPICS`]).
const NAMED_TOPIC: u8 = 0xFF;

/// The topics (after the prefix) of the stream numbers 0 to 3 of earlier spools, which are still
/// read so an upgrade delivers what an older version spooled.
const LEGACY_TOPICS: [&str; 4] = ["telemetry", "telemetry.dlq", "anomalies", "cases"];

/// A record in the form it goes to Kafka: its topic, key, headers and value bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpooledRecord {
    /// The topic after the prefix ([`ecars_model::Record::TOPIC`]); the prefix is added when the
    /// record is delivered.
    pub topic: String,
    /// The Kafka key.
    pub key: Vec<u8>,
    /// The Kafka headers.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The Kafka value.
    pub value: Vec<u8>,
}

impl SpooledRecord {
    fn encoded_len(&self) -> usize {
        1 + 2
            + self.topic.len()
            + 4
            + self.key.len()
            + 2
            + self
                .headers
                .iter()
                .map(|(k, v)| 2 + k.len() + 4 + v.len())
                .sum::<usize>()
            + 4
            + self.value.len()
    }

    fn encode_frame(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; 8]);
        out.push(NAMED_TOPIC);
        out.extend_from_slice(&(self.topic.len() as u16).to_le_bytes());
        out.extend_from_slice(self.topic.as_bytes());
        out.extend_from_slice(&(self.key.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.key);
        out.extend_from_slice(&(self.headers.len() as u16).to_le_bytes());
        for (k, v) in &self.headers {
            out.extend_from_slice(&(k.len() as u16).to_le_bytes());
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            out.extend_from_slice(v);
        }
        out.extend_from_slice(&(self.value.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.value);
        let payload_len = (out.len() - start - 8) as u32;
        let crc = crc32fast::hash(&out[start + 8..]);
        out[start..start + 4].copy_from_slice(&payload_len.to_le_bytes());
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    }

    fn decode(payload: &[u8]) -> Option<SpooledRecord> {
        let mut at = 0usize;
        let mut take = |n: usize| -> Option<&[u8]> {
            let slice = payload.get(at..at + n)?;
            at += n;
            Some(slice)
        };
        let topic = match take(1)?[0] {
            NAMED_TOPIC => {
                let len = u16::from_le_bytes(take(2)?.try_into().ok()?) as usize;
                String::from_utf8(take(len)?.to_vec()).ok()?
            }
            legacy => (*LEGACY_TOPICS.get(usize::from(legacy))?).to_owned(),
        };
        let key_len = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
        let key = take(key_len)?.to_vec();
        let count = u16::from_le_bytes(take(2)?.try_into().ok()?);
        let mut headers = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let k_len = u16::from_le_bytes(take(2)?.try_into().ok()?) as usize;
            let k = String::from_utf8(take(k_len)?.to_vec()).ok()?;
            let v_len = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
            headers.push((k, take(v_len)?.to_vec()));
        }
        let value_len = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
        let value = take(value_len)?.to_vec();
        (at == payload.len()).then_some(SpooledRecord {
            topic,
            key,
            headers,
            value,
        })
    }
}

/// A place in the spool: segment and byte offset in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SpoolPosition {
    segment: u64,
    offset: u64,
}

/// Records read from the head of the spool, to deliver and then [`Spool::commit`].
#[derive(Debug)]
pub struct SpoolBatch {
    /// The records, oldest first.
    pub records: Vec<SpooledRecord>,
    /// Where the spool's head moves once they are delivered.
    pub end: SpoolPosition,
}

/// Called once an appended record is durable (or could not be written).
pub type AppendDone = Box<dyn FnOnce(Result<(), SpoolError>) + Send>;

enum WriterMessage {
    Append(SpooledRecord, AppendDone),
    Stop,
}

/// A segment on disk.
#[derive(Clone, Copy, Debug)]
struct SegmentFile {
    seq: u64,
    /// Its durable length.
    len: u64,
    /// When its first frame was written (for a segment a previous run left, its last write:
    /// the run's start is unknown); `None` while it is empty.
    since: Option<SystemTime>,
}

struct Positions {
    /// The oldest record not yet delivered.
    head: SpoolPosition,
    /// Segments on disk, oldest first.
    segments: VecDeque<SegmentFile>,
    /// Records handed to `append` and not yet durable.
    pending: u64,
}

impl Positions {
    fn tail(&self) -> SpoolPosition {
        let (segment, offset) = self
            .segments
            .back()
            .map_or((self.head.segment, 0), |file| (file.seq, file.len));
        SpoolPosition { segment, offset }
    }

    fn bytes(&self) -> u64 {
        let total: u64 = self.segments.iter().map(|file| file.len).sum();
        total.saturating_sub(self.head.offset)
    }

    fn segment_len(&self, segment: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|file| file.seq == segment)
            .map(|file| file.len)
    }

    /// When the oldest record still waiting was written (to within its segment), `None` when
    /// nothing waits.
    fn oldest(&self) -> Option<SystemTime> {
        if self.bytes() == 0 {
            return None;
        }
        self.segments
            .iter()
            .filter(|file| {
                file.len > 0 && (file.seq > self.head.segment || file.len > self.head.offset)
            })
            .find_map(|file| file.since)
    }
}

struct Shared {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    positions: Mutex<Positions>,
    /// Signalled when the drainer frees space.
    space: Condvar,
    /// Signalled when records become durable.
    data: tokio::sync::Notify,
    /// Bytes on disk, for the metric and status.
    bytes: AtomicU64,
    /// Unix milliseconds of [`Positions::oldest`], 0 when nothing waits.
    oldest_ms: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Positions> {
        self.positions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn segment_path(&self, segment: u64) -> PathBuf {
        segment_path(&self.dir, segment)
    }

    fn publish_bytes(&self, positions: &Positions) {
        let bytes = positions.bytes();
        self.bytes.store(bytes, Ordering::Relaxed);
        metrics::gauge!(names::SPOOL_BYTES).set(bytes as f64);
        let oldest_ms = positions
            .oldest()
            .and_then(|time| time.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |since| since.as_millis() as u64);
        if self.oldest_ms.swap(oldest_ms, Ordering::Relaxed) != oldest_ms {
            metrics::gauge!(names::SPOOL_OLDEST).set(oldest_ms as f64 / 1000.0);
        }
    }
}

fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:020}.seg"))
}

/// The on-disk spool. Cheap to share behind an `Arc`.
pub struct Spool {
    shared: Arc<Shared>,
    writer: Mutex<Option<(mpsc::Sender<WriterMessage>, std::thread::JoinHandle<()>)>>,
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, holding at most `max_bytes`; recovers what a
    /// previous process left.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Spool, SpoolError> {
        fs::create_dir_all(dir).map_err(io_error(dir))?;
        let segment_bytes = (max_bytes / 4).clamp(64 * 1024, 64 * 1024 * 1024);
        let mut segments: Vec<u64> = fs::read_dir(dir)
            .map_err(io_error(dir))?
            .filter_map(|entry| {
                let name = entry.ok()?.file_name().into_string().ok()?;
                name.strip_suffix(".seg")?.parse().ok()
            })
            .collect();
        segments.sort_unstable();
        let head_path = dir.join("head");
        let mut head = match fs::read_to_string(&head_path) {
            Ok(text) => parse_head(&text).ok_or_else(|| SpoolError::Corrupt {
                path: head_path.clone(),
                offset: 0,
                detail: format!("unreadable head {text:?}"),
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => SpoolPosition {
                segment: segments.first().copied().unwrap_or(0),
                offset: 0,
            },
            Err(e) => return Err(io_error(&head_path)(e)),
        };
        // Segments before the head were delivered; a crash may have left them.
        for seq in segments.iter().filter(|s| **s < head.segment) {
            let path = segment_path(dir, *seq);
            fs::remove_file(&path).map_err(io_error(&path))?;
        }
        segments.retain(|s| *s >= head.segment);
        if segments.first() != Some(&head.segment) {
            // The head segment is gone (everything was delivered): start from the next one.
            head = SpoolPosition {
                segment: segments.first().copied().unwrap_or(head.segment),
                offset: 0,
            };
        }
        let mut lengths = VecDeque::new();
        let last = segments.last().copied();
        for seq in &segments {
            let path = segment_path(dir, *seq);
            let len = if Some(*seq) == last {
                // Only the last segment can end in a torn write.
                let valid = valid_length(&path)?;
                let file = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_error(&path))?;
                file.set_len(valid).map_err(io_error(&path))?;
                valid
            } else {
                fs::metadata(&path).map_err(io_error(&path))?.len()
            };
            let since = if len > 0 {
                fs::metadata(&path).and_then(|meta| meta.modified()).ok()
            } else {
                None
            };
            lengths.push_back(SegmentFile {
                seq: *seq,
                len,
                since,
            });
        }
        if lengths.is_empty() {
            let path = segment_path(dir, head.segment);
            File::create(&path).map_err(io_error(&path))?;
            lengths.push_back(SegmentFile {
                seq: head.segment,
                len: 0,
                since: None,
            });
        }
        head.offset = head.offset.min(lengths.front().map_or(0, |file| file.len));
        let positions = Positions {
            head,
            segments: lengths,
            pending: 0,
        };
        let shared = Arc::new(Shared {
            dir: dir.to_owned(),
            max_bytes,
            segment_bytes,
            bytes: AtomicU64::new(0),
            oldest_ms: AtomicU64::new(u64::MAX),
            positions: Mutex::new(positions),
            space: Condvar::new(),
            data: tokio::sync::Notify::new(),
        });
        {
            let positions = shared.lock();
            shared.publish_bytes(&positions);
            if positions.bytes() > 0 {
                tracing::warn!(
                    dir = %dir.display(),
                    bytes = positions.bytes(),
                    "the Kafka spool holds records from a previous run; they go to Kafka first"
                );
            }
        }
        let (tx, rx) = mpsc::channel();
        let writer_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("ecars-spool-writer".into())
            .spawn(move || write_loop(&writer_shared, &rx))
            .map_err(io_error(dir))?;
        Ok(Spool {
            shared,
            writer: Mutex::new(Some((tx, thread))),
        })
    }

    /// Appends a record; `done` runs once it is durable. Appends are written in call order.
    pub fn append(&self, record: SpooledRecord, done: AppendDone) {
        let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let Some((tx, _)) = writer.as_ref() else {
            done(Err(SpoolError::Closed));
            return;
        };
        self.shared.lock().pending += 1;
        if let Err(mpsc::SendError(WriterMessage::Append(_, done))) =
            tx.send(WriterMessage::Append(record, done))
        {
            self.shared.lock().pending -= 1;
            done(Err(SpoolError::Closed));
        }
    }

    /// True when every appended record was delivered and committed.
    pub fn is_empty(&self) -> bool {
        let positions = self.shared.lock();
        positions.pending == 0 && positions.head == positions.tail()
    }

    /// Bytes waiting on disk.
    pub fn bytes(&self) -> u64 {
        self.shared.bytes.load(Ordering::Relaxed)
    }

    /// When the oldest record still waiting was written (to within one segment: the first
    /// write into its segment), `None` when nothing waits.
    pub fn oldest(&self) -> Option<SystemTime> {
        match self.shared.oldest_ms.load(Ordering::Relaxed) {
            0 | u64::MAX => None,
            ms => Some(SystemTime::UNIX_EPOCH + Duration::from_millis(ms)),
        }
    }

    /// Whether the spool is (within 1 %) full: appends wait for the drainer, so publishers
    /// (the cars) are held back.
    pub fn is_full(&self) -> bool {
        let max = self.shared.max_bytes;
        self.bytes() >= max - max / 100
    }

    /// The spool's directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Waits until records are waiting, then reads up to about `max_bytes` of them from the
    /// head. The head only moves on [`Spool::commit`], so an undelivered batch is read again.
    pub async fn read_batch(&self, max_bytes: usize) -> Result<SpoolBatch, SpoolError> {
        loop {
            let notified = self.shared.data.notified();
            let (head, end) = {
                let mut positions = self.shared.lock();
                // Step over fully delivered segments.
                while positions.head.offset
                    >= positions.segment_len(positions.head.segment).unwrap_or(0)
                    && positions.head < positions.tail()
                {
                    self.retire_head_segment(&mut positions)?;
                }
                let head = positions.head;
                let end = positions.segment_len(head.segment).unwrap_or(0);
                (head, end)
            };
            if head.offset < end {
                let path = self.shared.segment_path(head.segment);
                return tokio::task::spawn_blocking(move || {
                    read_frames(&path, head, end, max_bytes)
                })
                .await
                .map_err(|e| SpoolError::Io {
                    path: PathBuf::new(),
                    source: io::Error::other(e),
                })?;
            }
            notified.await;
        }
    }

    /// Records that everything before `end` was delivered; frees delivered segments.
    pub fn commit(&self, end: SpoolPosition) -> Result<(), SpoolError> {
        let mut positions = self.shared.lock();
        positions.head = end;
        if positions.head.offset >= positions.segment_len(end.segment).unwrap_or(0)
            && positions.head < positions.tail()
        {
            self.retire_head_segment(&mut positions)?;
        }
        let head_path = self.shared.dir.join("head");
        let tmp = self.shared.dir.join("head.tmp");
        // Not fsynced: a stale head after a crash only means records delivered again.
        fs::write(
            &tmp,
            format!("{} {}\n", positions.head.segment, positions.head.offset),
        )
        .map_err(io_error(&tmp))?;
        fs::rename(&tmp, &head_path).map_err(io_error(&head_path))?;
        self.shared.publish_bytes(&positions);
        Ok(())
    }

    fn retire_head_segment(&self, positions: &mut Positions) -> Result<(), SpoolError> {
        let old = positions.head.segment;
        positions.segments.pop_front();
        let next = positions.segments.front().map_or(old + 1, |file| file.seq);
        positions.head = SpoolPosition {
            segment: next,
            offset: 0,
        };
        let path = self.shared.segment_path(old);
        fs::remove_file(&path).map_err(io_error(&path))?;
        self.shared.publish_bytes(positions);
        self.shared.space.notify_all();
        Ok(())
    }

    /// Stops the writer once the records already appended are durable.
    pub fn close(&self) {
        let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((tx, thread)) = writer {
            let _ = tx.send(WriterMessage::Stop);
            self.shared.space.notify_all();
            if thread.join().is_err() {
                tracing::error!("the spool writer panicked");
            }
        }
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        self.close();
    }
}

fn parse_head(text: &str) -> Option<SpoolPosition> {
    let mut parts = text.split_whitespace();
    let segment = parts.next()?.parse().ok()?;
    let offset = parts.next()?.parse().ok()?;
    Some(SpoolPosition { segment, offset })
}

/// Length of the valid prefix of a segment: frames up to the first torn or corrupt one.
fn valid_length(path: &Path) -> Result<u64, SpoolError> {
    let file = File::open(path).map_err(io_error(path))?;
    let mut reader = BufReader::new(file);
    let mut valid = 0u64;
    let mut header = [0u8; 8];
    let mut payload = Vec::new();
    loop {
        if reader.read_exact(&mut header).is_err() {
            return Ok(valid);
        }
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len > MAX_FRAME_BYTES {
            break;
        }
        payload.resize(len as usize, 0);
        if reader.read_exact(&mut payload).is_err() || crc32fast::hash(&payload) != crc {
            break;
        }
        valid += 8 + u64::from(len);
    }
    tracing::warn!(path = %path.display(), valid, "cut a torn write off the end of the spool");
    Ok(valid)
}

fn read_frames(
    path: &Path,
    start: SpoolPosition,
    end: u64,
    max_bytes: usize,
) -> Result<SpoolBatch, SpoolError> {
    let mut file = File::open(path).map_err(io_error(path))?;
    file.seek(SeekFrom::Start(start.offset))
        .map_err(io_error(path))?;
    let mut reader = BufReader::with_capacity(256 * 1024, file);
    let mut at = start.offset;
    let mut records = Vec::new();
    let mut read = 0usize;
    let corrupt = |offset: u64, detail: &str| SpoolError::Corrupt {
        path: path.to_owned(),
        offset,
        detail: detail.to_owned(),
    };
    while at < end && (read < max_bytes || records.is_empty()) {
        let mut header = [0u8; 8];
        reader.read_exact(&mut header).map_err(io_error(path))?;
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len > MAX_FRAME_BYTES {
            return Err(corrupt(at, "frame length out of range"));
        }
        let mut payload = vec![0u8; len as usize];
        reader.read_exact(&mut payload).map_err(io_error(path))?;
        if crc32fast::hash(&payload) != crc {
            return Err(corrupt(at, "checksum mismatch"));
        }
        let record = SpooledRecord::decode(&payload).ok_or_else(|| corrupt(at, "bad record"))?;
        records.push(record);
        at += 8 + u64::from(len);
        read += 8 + len as usize;
    }
    Ok(SpoolBatch {
        records,
        end: SpoolPosition {
            segment: start.segment,
            offset: at,
        },
    })
}

struct Segment {
    seq: u64,
    len: u64,
    out: BufWriter<File>,
}

fn open_tail(shared: &Shared) -> Result<Segment, SpoolError> {
    let tail = shared.lock().tail();
    let (seq, len) = (tail.segment, tail.offset);
    let path = shared.segment_path(seq);
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(io_error(&path))?;
    Ok(Segment {
        seq,
        len,
        out: BufWriter::with_capacity(1024 * 1024, file),
    })
}

fn write_loop(shared: &Shared, rx: &mpsc::Receiver<WriterMessage>) {
    let mut segment = match open_tail(shared) {
        Ok(segment) => Some(segment),
        Err(e) => {
            tracing::error!(error = %e, "cannot open the spool's last segment");
            None
        }
    };
    let mut stopping = false;
    let mut frames = Vec::with_capacity(GROUP_BYTES);
    while !stopping {
        let mut group: Vec<AppendDone> = Vec::new();
        frames.clear();
        match rx.recv() {
            Ok(WriterMessage::Append(record, done)) => {
                record.encode_frame(&mut frames);
                group.push(done);
            }
            Ok(WriterMessage::Stop) | Err(_) => break,
        }
        // At most a segment per group, so a group always fits once the drainer frees space.
        let group_bytes = GROUP_BYTES.min(shared.segment_bytes as usize);
        while group.len() < GROUP_RECORDS && frames.len() + 8 * 1024 < group_bytes {
            match rx.try_recv() {
                Ok(WriterMessage::Append(record, done)) => {
                    frames.reserve(record.encoded_len() + 8);
                    record.encode_frame(&mut frames);
                    group.push(done);
                }
                Ok(WriterMessage::Stop) => {
                    stopping = true;
                    break;
                }
                Err(_) => break,
            }
        }
        wait_for_space(shared, frames.len() as u64);
        let result = match segment.as_mut() {
            Some(current) => write_group(shared, current, &frames),
            None => Err(SpoolError::Closed),
        };
        let count = group.len() as u64;
        {
            let mut positions = shared.lock();
            positions.pending -= count;
            if let (Ok(()), Some(current)) = (&result, segment.as_ref()) {
                let now = SystemTime::now();
                match positions.segments.back_mut() {
                    Some(file) if file.seq == current.seq => {
                        file.len = current.len;
                        file.since.get_or_insert(now);
                    }
                    _ => positions.segments.push_back(SegmentFile {
                        seq: current.seq,
                        len: current.len,
                        since: Some(now),
                    }),
                }
            }
            shared.publish_bytes(&positions);
        }
        match &result {
            Ok(()) => {
                metrics::counter!(names::SPOOL_RECORDS, "op" => "written").increment(count);
                shared.data.notify_one();
            }
            Err(e) => tracing::error!(error = %e, records = count, "cannot write to the spool"),
        }
        for done in group {
            done(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(SpoolError::Io {
                    path: shared.dir.clone(),
                    source: io::Error::other(e.to_string()),
                }),
            });
        }
        if let Some(current) = segment.as_ref() {
            if current.len >= shared.segment_bytes {
                let next = current.seq + 1;
                let path = shared.segment_path(next);
                segment = match OpenOptions::new().create(true).append(true).open(&path) {
                    Ok(file) => {
                        shared.lock().segments.push_back(SegmentFile {
                            seq: next,
                            len: 0,
                            since: None,
                        });
                        Some(Segment {
                            seq: next,
                            len: 0,
                            out: BufWriter::with_capacity(1024 * 1024, file),
                        })
                    }
                    Err(e) => {
                        tracing::error!(error = %e, path = %path.display(), "cannot start a spool segment");
                        None
                    }
                };
            }
        }
    }
}

fn write_group(shared: &Shared, segment: &mut Segment, frames: &[u8]) -> Result<(), SpoolError> {
    let path = shared.segment_path(segment.seq);
    segment.out.write_all(frames).map_err(io_error(&path))?;
    segment.out.flush().map_err(io_error(&path))?;
    segment.out.get_ref().sync_data().map_err(io_error(&path))?;
    segment.len += frames.len() as u64;
    Ok(())
}

/// Blocks while the spool is full. The wait holds back every publisher behind this group, which
/// is the backpressure that reaches the cars once memory and disk are both full.
fn wait_for_space(shared: &Shared, need: u64) {
    let mut positions = shared.lock();
    let mut warned = false;
    while positions.bytes() > 0 && positions.bytes() + need > shared.max_bytes {
        if !warned {
            warned = true;
            metrics::counter!(names::SPOOL_FULL).increment(1);
            tracing::warn!(
                dir = %shared.dir.display(),
                bytes = positions.bytes(),
                max_bytes = shared.max_bytes,
                "the Kafka spool is full: MQTT publishers wait until Kafka takes records again"
            );
        }
        positions = shared
            .space
            .wait_timeout(positions, Duration::from_secs(1))
            .map(|(guard, _)| guard)
            .unwrap_or_else(|p| p.into_inner().0);
    }
    if warned {
        tracing::info!("the Kafka spool has room again");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: u32) -> SpooledRecord {
        SpooledRecord {
            topic: if i.is_multiple_of(7) {
                "telemetry.dlq".into()
            } else {
                "telemetry".into()
            },
            key: format!("VIN{i:05}").into_bytes(),
            headers: vec![("ce_id".into(), format!("id-{i}").into_bytes())],
            value: vec![b'x'; (i % 50) as usize * 10],
        }
    }

    fn append_all(spool: &Spool, records: impl IntoIterator<Item = SpooledRecord>) {
        let (tx, rx) = mpsc::channel();
        let mut n = 0;
        for r in records {
            let tx = tx.clone();
            spool.append(
                r,
                Box::new(move |result| {
                    let _ = tx.send(result.is_ok());
                }),
            );
            n += 1;
        }
        for _ in 0..n {
            assert!(rx.recv().unwrap(), "append is durable");
        }
    }

    async fn drain(spool: &Spool) -> Vec<SpooledRecord> {
        let mut out = Vec::new();
        while !spool.is_empty() {
            let batch = spool.read_batch(4096).await.unwrap();
            out.extend(batch.records);
            spool.commit(batch.end).unwrap();
        }
        out
    }

    #[test]
    fn frames_round_trip() {
        for i in 0..60 {
            let mut buf = Vec::new();
            record(i).encode_frame(&mut buf);
            assert_eq!(buf.len(), record(i).encoded_len() + 8);
            assert_eq!(SpooledRecord::decode(&buf[8..]), Some(record(i)));
        }
    }

    /// A frame as versions before named topics wrote it: stream number 1 (dead letters).
    #[test]
    fn frames_of_earlier_versions_still_decode() {
        let mut payload = vec![1u8];
        payload.extend_from_slice(&3u32.to_le_bytes());
        payload.extend_from_slice(b"key");
        payload.extend_from_slice(&0u16.to_le_bytes());
        payload.extend_from_slice(&2u32.to_le_bytes());
        payload.extend_from_slice(b"{}");
        let record = SpooledRecord::decode(&payload).unwrap();
        assert_eq!(record.topic, "telemetry.dlq");
        assert_eq!(record.key, b"key");
        assert_eq!(record.value, b"{}");
        let mut unknown = payload.clone();
        unknown[0] = 9;
        assert_eq!(SpooledRecord::decode(&unknown), None);
    }

    #[tokio::test]
    async fn delivers_in_order_across_segments_and_frees_them() {
        let dir = tempfile::tempdir().unwrap();
        // 256 KiB: segments of 64 KiB, so 3,000 records span several.
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(spool.oldest(), None, "nothing waits");
        let before = SystemTime::now() - Duration::from_millis(1);
        append_all(&spool, (0..3000).map(record));
        assert!(spool.bytes() > 64 * 1024);
        let oldest = spool.oldest().expect("records wait");
        assert!(
            oldest >= before && oldest <= SystemTime::now(),
            "{oldest:?}"
        );
        let out = drain(&spool).await;
        assert_eq!(out, (0..3000).map(record).collect::<Vec<_>>());
        assert_eq!(spool.bytes(), 0);
        assert_eq!(spool.oldest(), None, "everything was delivered");
        let segments = fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension() == Some("seg".as_ref()))
            .count();
        assert_eq!(segments, 1, "delivered segments are deleted");
    }

    #[tokio::test]
    async fn reopening_resumes_after_the_committed_head() {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = Spool::open(dir.path(), 1 << 20).unwrap();
            append_all(&spool, (0..100).map(record));
            let batch = spool.read_batch(1).await.unwrap();
            assert_eq!(
                batch.records,
                vec![record(0)],
                "one record when the limit is tiny"
            );
            spool.commit(batch.end).unwrap();
        }
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert!(!spool.is_empty());
        assert!(
            spool.oldest().is_some(),
            "records a previous run left are dated by their segment"
        );
        append_all(&spool, (100..110).map(record));
        assert_eq!(
            drain(&spool).await,
            (1..110).map(record).collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn a_torn_write_is_cut_off_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = Spool::open(dir.path(), 1 << 20).unwrap();
            append_all(&spool, (0..10).map(record));
        }
        let path = segment_path(dir.path(), 0);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        let mut frame = Vec::new();
        record(10).encode_frame(&mut frame);
        file.write_all(&frame[..frame.len() / 2]).unwrap();
        drop(file);
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(drain(&spool).await, (0..10).map(record).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_full_spool_holds_appends_until_the_drainer_frees_space() {
        let dir = tempfile::tempdir().unwrap();
        // 256 KiB at most, in 64 KiB segments.
        let spool = Arc::new(Spool::open(dir.path(), 256 * 1024).unwrap());
        let big = |i: u32| SpooledRecord {
            value: vec![b'y'; 16 * 1024],
            ..record(i)
        };
        append_all(&spool, (0..14).map(big));
        let waiting = {
            let spool = Arc::clone(&spool);
            std::thread::spawn(move || append_all(&spool, (14..40).map(big)))
        };
        // The writer is blocked, so the spool never exceeds its bound while it waits.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !waiting.is_finished(),
            "appends wait while the spool is full"
        );
        assert!(spool.bytes() <= 256 * 1024);
        let mut out = Vec::new();
        while out.len() < 40 {
            let batch = spool.read_batch(32 * 1024).await.unwrap();
            out.extend(batch.records);
            spool.commit(batch.end).unwrap();
            assert!(spool.bytes() <= 256 * 1024);
        }
        waiting.join().unwrap();
        assert_eq!(out, (0..40).map(big).collect::<Vec<_>>());
    }
}
