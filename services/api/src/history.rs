//! `GET /v1/vehicles/{vin}/history?from=&to=&resolution=raw|1m|1h|auto`: one car's readings
//! over a time range, raw or from the per-minute and per-hour rollups, as JSON or CSV
//! (`Accept: text/csv`). The answer is streamed a page at a time: each page is one short
//! query, so a long range neither sits in memory nor holds a database connection while a slow
//! client reads.

use std::collections::HashMap;
use std::fmt::Write as _;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, TimeDelta, Utc};
use ecars_db::rollups::{Rollup, Stats, Width};
use ecars_db::{Database, DbError};
use ecars_model::telemetry::format_timestamp;
use ecars_model::{TelemetryReading, Vin};
use serde::Serialize;
use uuid::Uuid;

/// How finely a history is sampled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Every reading.
    Raw,
    /// A bucket per minute or per hour.
    Rollup(Width),
}

impl Resolution {
    fn name(self) -> &'static str {
        match self {
            Resolution::Raw => "raw",
            Resolution::Rollup(Width::Minute) => "1m",
            Resolution::Rollup(Width::Hour) => "1h",
        }
    }

    /// The longest range one request may ask for at this resolution: a day of raw readings
    /// (86,400 at one a second), a month of minutes (44,640), ten years of hours (87,660).
    pub fn max_range(self) -> TimeDelta {
        match self {
            Resolution::Raw => TimeDelta::days(1),
            Resolution::Rollup(Width::Minute) => TimeDelta::days(31),
            Resolution::Rollup(Width::Hour) => TimeDelta::days(3_653),
        }
    }

    /// What `auto` picks for a range: raw up to two hours, minutes up to a week, hours beyond
    /// (a chart of a few thousand points at most, at one reading a second).
    pub fn auto(range: TimeDelta) -> Resolution {
        if range <= TimeDelta::hours(2) {
            Resolution::Raw
        } else if range <= TimeDelta::days(7) {
            Resolution::Rollup(Width::Minute)
        } else {
            Resolution::Rollup(Width::Hour)
        }
    }
}

/// A checked history request.
#[derive(Clone, Debug, PartialEq)]
pub struct HistoryQuery {
    /// The range's start (included).
    pub from: DateTime<Utc>,
    /// The range's end (excluded).
    pub to: DateTime<Utc>,
    /// The resolution, `auto` resolved.
    pub resolution: Resolution,
}

/// The range when the request names none: the last hour.
const DEFAULT_RANGE: TimeDelta = TimeDelta::hours(1);

impl HistoryQuery {
    /// Checks a request's parameters at time `now`; the error says what is wrong, for a 400.
    pub fn parse(params: &HashMap<String, String>, now: DateTime<Utc>) -> Result<Self, String> {
        let time = |name: &str| -> Result<Option<DateTime<Utc>>, String> {
            params
                .get(name)
                .map(|text| {
                    DateTime::parse_from_rfc3339(text)
                        .map(|t| t.with_timezone(&Utc))
                        .map_err(|e| {
                            format!("{name} must be an RFC 3339 time like 2026-12-01T08:00:00Z, got {text:?}: {e}")
                        })
                })
                .transpose()
        };
        if let Some(other) = params
            .keys()
            .find(|k| !["from", "to", "resolution"].contains(&k.as_str()))
        {
            return Err(format!(
                "unknown parameter {other:?}: expected from, to or resolution"
            ));
        }
        let (from, to) = match (time("from")?, time("to")?) {
            (Some(from), Some(to)) => (from, to),
            (Some(from), None) => (from, now),
            (None, Some(to)) => (to - DEFAULT_RANGE, to),
            (None, None) => (now - DEFAULT_RANGE, now),
        };
        if from >= to {
            return Err(format!("from ({from:?}) must be before to ({to:?})"));
        }
        let range = to - from;
        let resolution = match params.get("resolution").map(String::as_str) {
            None | Some("auto") => Resolution::auto(range),
            Some("raw") => Resolution::Raw,
            Some("1m") => Resolution::Rollup(Width::Minute),
            Some("1h") => Resolution::Rollup(Width::Hour),
            Some(other) => {
                return Err(format!(
                    "resolution must be raw, 1m, 1h or auto, got {other:?}"
                ))
            }
        };
        if range > resolution.max_range() {
            return Err(format!(
                "a range of {} days is too long at resolution {}: at most {} days; ask a coarser \
                 resolution or a shorter range",
                range.num_days(),
                resolution.name(),
                resolution.max_range().num_days()
            ));
        }
        Ok(HistoryQuery {
            from,
            to,
            resolution,
        })
    }
}

/// The body's format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `{"vin": …, "resolution": …, "from": …, "to": …, "points": [ … ]}`.
    Json,
    /// A header line, then a line per point.
    Csv,
}

impl Format {
    /// CSV when the request accepts `text/csv`, JSON otherwise.
    pub fn of(headers: &HeaderMap) -> Format {
        let csv = headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|media| media.split(';').next().map(str::trim) == Some("text/csv"));
        if csv {
            Format::Csv
        } else {
            Format::Json
        }
    }
}

/// The JSON answer, as its schema describes it (the body is written a page at a time by
/// [`respond`], not serialised from this type).
#[derive(schemars::JsonSchema)]
#[allow(dead_code)]
pub(crate) struct HistoryDocument {
    /// The car.
    vin: Vin,
    /// `raw`, `1m` or `1h`.
    resolution: String,
    /// The range's start.
    from: DateTime<Utc>,
    /// The range's end.
    to: DateTime<Utc>,
    /// Oldest first: readings at `raw`, buckets otherwise.
    points: Points,
}

/// The points of a history.
#[derive(schemars::JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)]
enum Points {
    /// Every reading.
    Raw(Vec<RawPoint>),
    /// A bucket per minute or hour.
    Rollups(Vec<RollupPoint>),
}

/// Rows one page query reads.
const PAGE_ROWS: i64 = 2_000;
/// Pages formatted ahead of a slow client.
const PAGES_AHEAD: usize = 2;

/// The streamed answer to a checked request.
pub fn respond(db: Database, vin: Vin, query: HistoryQuery, format: Format) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(PAGES_AHEAD);
    let resolution = query.resolution.name();
    let filename = format!("attachment; filename=\"{vin}-{resolution}.csv\"");
    tokio::spawn(async move {
        if let Err(error) = produce(&db, &vin, &query, format, &tx).await {
            // Headers are sent already: ending the body with an error makes the client see a
            // truncated answer rather than a short one that looks complete.
            tracing::warn!(%error, %vin, "history query failed while streaming");
            let _ = tx.send(Err(std::io::Error::other(error.to_string()))).await;
        }
    });
    let body = Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    }));
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    let content_type = match format {
        Format::Json => "application/json",
        Format::Csv => "text/csv; charset=utf-8; header=present",
    };
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert("ecars-resolution", HeaderValue::from_static(resolution));
    if format == Format::Csv {
        if let Ok(value) = HeaderValue::from_str(&filename) {
            headers.insert(header::CONTENT_DISPOSITION, value);
        }
    }
    response
}

/// A page of points, formatted. Returns `Ok(())` when the client went away too.
async fn produce(
    db: &Database,
    vin: &Vin,
    query: &HistoryQuery,
    format: Format,
    tx: &tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
) -> Result<(), DbError> {
    let mut out = Writer::new(format);
    out.start(vin, query);
    match query.resolution {
        Resolution::Raw => {
            let rows = db.sensor_rows();
            let mut after = (query.from, Uuid::nil());
            loop {
                let page = rows.history_page(vin, after, query.to, PAGE_ROWS).await?;
                for reading in &page {
                    out.point(&RawPoint::of(reading));
                }
                if !out.send(tx).await {
                    return Ok(());
                }
                match page.last() {
                    Some(last) if page.len() as i64 == PAGE_ROWS => {
                        after = (last.date, last.event_id)
                    }
                    _ => break,
                }
            }
        }
        Resolution::Rollup(width) => {
            let rollups = db.rollups();
            let mut from = width.bucket(query.from);
            loop {
                let page = rollups
                    .history_page(width, vin, from, query.to, PAGE_ROWS)
                    .await?;
                for rollup in &page {
                    out.point(&RollupPoint::of(rollup));
                }
                if !out.send(tx).await {
                    return Ok(());
                }
                match page.last() {
                    Some(last) if page.len() as i64 == PAGE_ROWS => {
                        from = last.bucket + width.length()
                    }
                    _ => break,
                }
            }
        }
    }
    out.finish();
    out.send(tx).await;
    Ok(())
}

/// A point's fields, for JSON (serde) and CSV (its header and a line).
trait Point: Serialize {
    /// The CSV header line.
    const CSV_HEADER: &'static str;
    /// Appends the point's CSV line.
    fn csv(&self, out: &mut String);
}

/// A reading, as a raw history point.
#[derive(Serialize, schemars::JsonSchema)]
struct RawPoint {
    time: DateTime<Utc>,
    event_id: Uuid,
    battery: Option<f64>,
    speed: Option<f64>,
    range: Option<f64>,
    mpge: Option<f64>,
    malfunction: Option<bool>,
    latitude: Option<f64>,
    longitude: Option<f64>,
}

impl RawPoint {
    fn of(r: &TelemetryReading) -> RawPoint {
        RawPoint {
            time: r.date,
            event_id: r.event_id,
            battery: r.battery,
            speed: r.speed,
            range: r.range,
            mpge: r.mpge,
            malfunction: r.malfunction,
            latitude: r.latitude,
            longitude: r.longitude,
        }
    }
}

impl Point for RawPoint {
    const CSV_HEADER: &'static str =
        "time,event_id,battery,speed,range,mpge,malfunction,latitude,longitude\r\n";

    fn csv(&self, out: &mut String) {
        let _ = write!(out, "{},{}", format_timestamp(&self.time), self.event_id);
        for value in [self.battery, self.speed, self.range, self.mpge] {
            number(out, value);
        }
        out.push(',');
        if let Some(m) = self.malfunction {
            let _ = write!(out, "{m}");
        }
        number(out, self.latitude);
        number(out, self.longitude);
        out.push_str("\r\n");
    }
}

/// A bucket, as a history point: the bucket's start as `time`.
#[derive(Serialize, schemars::JsonSchema)]
struct RollupPoint {
    time: DateTime<Utc>,
    readings: i64,
    battery_min: Option<f64>,
    battery_mean: Option<f64>,
    battery_max: Option<f64>,
    battery_first: Option<f64>,
    battery_last: Option<f64>,
    speed_min: Option<f64>,
    speed_mean: Option<f64>,
    speed_max: Option<f64>,
    range_min: Option<f64>,
    range_mean: Option<f64>,
    range_max: Option<f64>,
    latitude: Option<f64>,
    longitude: Option<f64>,
}

impl RollupPoint {
    fn of(r: &Rollup) -> RollupPoint {
        let min = |s: &Stats| s.min;
        let mean = |s: &Stats| s.mean();
        let max = |s: &Stats| s.max;
        RollupPoint {
            time: r.bucket,
            readings: r.readings,
            battery_min: min(&r.battery),
            battery_mean: mean(&r.battery),
            battery_max: max(&r.battery),
            battery_first: r.first_battery.map(|s| s.value),
            battery_last: r.last_battery.map(|s| s.value),
            speed_min: min(&r.speed),
            speed_mean: mean(&r.speed),
            speed_max: max(&r.speed),
            range_min: min(&r.range),
            range_mean: mean(&r.range),
            range_max: max(&r.range),
            latitude: r.position.map(|p| p.value.0),
            longitude: r.position.map(|p| p.value.1),
        }
    }
}

impl Point for RollupPoint {
    const CSV_HEADER: &'static str = "time,readings,battery_min,battery_mean,battery_max,\
        battery_first,battery_last,speed_min,speed_mean,speed_max,range_min,range_mean,\
        range_max,latitude,longitude\r\n";

    fn csv(&self, out: &mut String) {
        let _ = write!(out, "{},{}", format_timestamp(&self.time), self.readings);
        for value in [
            self.battery_min,
            self.battery_mean,
            self.battery_max,
            self.battery_first,
            self.battery_last,
            self.speed_min,
            self.speed_mean,
            self.speed_max,
            self.range_min,
            self.range_mean,
            self.range_max,
            self.latitude,
            self.longitude,
        ] {
            number(out, value);
        }
        out.push_str("\r\n");
    }
}

/// `,` and the number (nothing when absent).
fn number(out: &mut String, value: Option<f64>) {
    out.push(',');
    if let Some(v) = value {
        let _ = write!(out, "{v}");
    }
}

/// The body being written, a page at a time.
struct Writer {
    format: Format,
    buffer: String,
    /// Points written so far (JSON needs commas between them; CSV its header before the
    /// first).
    points: u64,
}

impl Writer {
    fn new(format: Format) -> Writer {
        Writer {
            format,
            buffer: String::new(),
            points: 0,
        }
    }

    fn start(&mut self, vin: &Vin, query: &HistoryQuery) {
        if self.format == Format::Json {
            let _ = write!(
                self.buffer,
                r#"{{"vin":"{vin}","resolution":"{}","from":"{}","to":"{}","points":["#,
                query.resolution.name(),
                format_timestamp(&query.from),
                format_timestamp(&query.to)
            );
        } else {
            let header = match query.resolution {
                Resolution::Raw => RawPoint::CSV_HEADER,
                Resolution::Rollup(_) => RollupPoint::CSV_HEADER,
            };
            self.buffer.push_str(header);
        }
    }

    fn point<P: Point>(&mut self, point: &P) {
        match self.format {
            Format::Json => {
                if self.points > 0 {
                    self.buffer.push(',');
                }
                // Serialising plain numbers, times and UUIDs cannot fail.
                if let Ok(json) = serde_json::to_string(point) {
                    self.buffer.push_str(&json);
                }
            }
            Format::Csv => point.csv(&mut self.buffer),
        }
        self.points += 1;
    }

    fn finish(&mut self) {
        if self.format == Format::Json {
            self.buffer.push_str("]}");
        }
    }

    /// Sends what is written; `false` when the client went away.
    async fn send(
        &mut self,
        tx: &tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    ) -> bool {
        if self.buffer.is_empty() {
            return true;
        }
        let chunk = Bytes::from(std::mem::take(&mut self.buffer));
        tx.send(Ok(chunk)).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_default()
    }

    fn parse(pairs: &[(&str, &str)]) -> Result<HistoryQuery, String> {
        let params = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        HistoryQuery::parse(&params, at("2026-12-02T12:00:00Z"))
    }

    #[test]
    fn auto_picks_raw_minutes_or_hours_by_the_length_of_the_range() {
        let resolution = |from: &str| parse(&[("from", from)]).map(|q| q.resolution);
        assert_eq!(resolution("2026-12-02T11:00:00Z"), Ok(Resolution::Raw));
        assert_eq!(
            resolution("2026-11-30T12:00:00Z"),
            Ok(Resolution::Rollup(Width::Minute))
        );
        assert_eq!(
            resolution("2026-10-01T00:00:00Z"),
            Ok(Resolution::Rollup(Width::Hour))
        );
        let default = parse(&[]).unwrap();
        assert_eq!(default.to - default.from, TimeDelta::hours(1));
        assert_eq!(default.resolution, Resolution::Raw);
    }

    #[test]
    fn bad_ranges_and_parameters_are_refused_with_a_reason() {
        for (pairs, says) in [
            (vec![("from", "yesterday")], "RFC 3339"),
            (
                vec![
                    ("from", "2026-12-02T10:00:00Z"),
                    ("to", "2026-12-02T09:00:00Z"),
                ],
                "before",
            ),
            (
                vec![("from", "2026-11-01T00:00:00Z"), ("resolution", "raw")],
                "too long",
            ),
            (vec![("from", "2016-11-01T00:00:00Z")], "too long"),
            (vec![("resolution", "5m")], "resolution"),
            (vec![("limit", "5")], "unknown parameter"),
        ] {
            let err = parse(&pairs).unwrap_err();
            assert!(err.contains(says), "{pairs:?}: {err}");
        }
    }

    #[test]
    fn csv_is_asked_for_by_accept() {
        let mut headers = HeaderMap::new();
        assert_eq!(Format::of(&headers), Format::Json);
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/json;q=0.5, text/csv"),
        );
        assert_eq!(Format::of(&headers), Format::Csv);
    }
}
