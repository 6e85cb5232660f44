//! PostgreSQL keeps `sensor_data` in one partition per UTC day of the readings' `date`
//! (`sensor_data_YYYYMMDD`, and `sensor_data_default` for the days without one): retention
//! drops a whole day instead of deleting its rows one by one, and a car's history reads only
//! the days it asks for. The day arithmetic is here, apart from the catalog queries.

use std::sync::atomic::{AtomicI32, Ordering};

use chrono::{DateTime, Datelike, NaiveDate, TimeDelta, Utc};
use sqlx::PgPool;

use crate::DbError;

/// The partitioned table.
pub(crate) const TABLE: &str = "sensor_data";

/// The partition of readings dated on no day of its own: the days before the partitions were
/// made, or outside the days prepared.
pub(crate) const DEFAULT_PARTITION: &str = "sensor_data_default";

/// What [`crate::SensorRows::prepare_days`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PreparedDays {
    /// The days whose partition it created.
    pub created: Vec<NaiveDate>,
    /// The days it could not make a partition for: readings of that day are in the default
    /// partition already (they stay there until retention deletes them).
    pub blocked: Vec<NaiveDate>,
}

/// The name of `day`'s partition.
pub(crate) fn partition_name(day: NaiveDate) -> String {
    format!("{TABLE}_{}", day.format("%Y%m%d"))
}

/// The day whose partition is `name`; `None` for any other table (the default partition).
pub(crate) fn day_of(name: &str) -> Option<NaiveDate> {
    let digits = name.strip_prefix(TABLE)?.strip_prefix('_')?;
    if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    NaiveDate::parse_from_str(digits, "%Y%m%d").ok()
}

/// The day all of `dates` fall on (UTC), if they fall on one; `None` for none or several.
pub(crate) fn one_day(mut dates: impl Iterator<Item = DateTime<Utc>>) -> Option<NaiveDate> {
    let day = dates.next()?.date_naive();
    dates.all(|date| date.date_naive() == day).then_some(day)
}

/// The last day a writer of this process found without a partition, so the batches of a day
/// that has none (readings older than the partitions kept) go to the parent at once instead of
/// each failing on the missing table first (an error in the server's log every time). Only a
/// hint: a partition made later by another process is used again once another day is found
/// missing.
#[derive(Debug)]
pub(crate) struct MissingDay(AtomicI32);

/// [`MissingDay`]'s value when no day is: `num_days_from_ce` of a day no reading has.
const NO_DAY: i32 = i32::MIN;

impl MissingDay {
    /// A hint that knows no missing day.
    pub(crate) fn new() -> MissingDay {
        MissingDay(AtomicI32::new(NO_DAY))
    }

    /// Whether `day` was found without a partition.
    pub(crate) fn is(&self, day: NaiveDate) -> bool {
        self.0.load(Ordering::Relaxed) == day.num_days_from_ce()
    }

    /// `day` has no partition.
    pub(crate) fn set(&self, day: NaiveDate) {
        self.0.store(day.num_days_from_ce(), Ordering::Relaxed);
    }

    /// `day` has a partition now.
    pub(crate) fn clear(&self, day: NaiveDate) {
        let _ = self.0.compare_exchange(
            day.num_days_from_ce(),
            NO_DAY,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
}

/// When `day` starts (UTC midnight).
fn start_of(day: NaiveDate) -> DateTime<Utc> {
    day.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc()
}

/// When `day` ends (the next UTC midnight); `None` for the last day chrono knows.
fn end_of(day: NaiveDate) -> Option<DateTime<Utc>> {
    day.checked_add_signed(TimeDelta::days(1)).map(start_of)
}

/// Whether every reading of `day` is dated before `cutoff`, so retention may drop its
/// partition. The day `cutoff` falls in is kept whole: a reading is kept up to a day longer
/// than the retention, never shorter.
pub(crate) fn expired(day: NaiveDate, cutoff: DateTime<Utc>) -> bool {
    end_of(day).is_some_and(|end| end <= cutoff)
}

/// The days from `first` to `last`, both included.
pub(crate) fn days(first: NaiveDate, last: NaiveDate) -> impl Iterator<Item = NaiveDate> {
    first.iter_days().take_while(move |day| *day <= last)
}

/// The days that have a partition now.
async fn existing(pool: &PgPool) -> Result<Vec<NaiveDate>, DbError> {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'sensor_data'::regclass",
    )
    .fetch_all(pool)
    .await?;
    Ok(names.iter().filter_map(|name| day_of(name)).collect())
}

/// Creates the partitions of the days from `first` to `last` that have none.
pub(crate) async fn prepare(
    pool: &PgPool,
    first: NaiveDate,
    last: NaiveDate,
    missing: &MissingDay,
) -> Result<PreparedDays, DbError> {
    let have = existing(pool).await?;
    let mut prepared = PreparedDays::default();
    for day in days(first, last).filter(|day| !have.contains(day)) {
        let Some(end) = end_of(day) else {
            continue;
        };
        let sql = format!(
            "CREATE TABLE IF NOT EXISTS {} PARTITION OF {TABLE} FOR VALUES FROM ('{}') TO ('{}')",
            partition_name(day),
            start_of(day).to_rfc3339(),
            end.to_rfc3339(),
        );
        match sqlx::query(sqlx::AssertSqlSafe(sql)).execute(pool).await {
            Ok(_) => {
                missing.clear(day);
                prepared.created.push(day)
            }
            // 23514: the default partition holds readings of that day. 42P07 and 23505:
            // another worker created it just now.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23514") => {
                prepared.blocked.push(day)
            }
            Err(sqlx::Error::Database(e))
                if matches!(e.code().as_deref(), Some("42P07") | Some("23505")) =>
            {
                missing.clear(day)
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(prepared)
}

/// Drops the partitions of the days that ended by `cutoff`; returns how many. Dropping takes a
/// brief exclusive lock on the table: a drop that would wait more than a moment for it (a long
/// query) is left for the next pass rather than queueing every writer behind it.
pub(crate) async fn drop_expired(pool: &PgPool, cutoff: DateTime<Utc>) -> Result<u64, DbError> {
    let mut dropped = 0;
    for day in existing(pool).await? {
        if !expired(day, cutoff) {
            continue;
        }
        let mut tx = pool.begin().await?;
        sqlx::query("SET LOCAL lock_timeout = '2s'")
            .execute(&mut *tx)
            .await?;
        let sql = format!("DROP TABLE IF EXISTS {}", partition_name(day));
        match sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut *tx)
            .await
        {
            Ok(_) => {
                tx.commit().await?;
                dropped += 1;
            }
            // 55P03: lock_timeout.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03") => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(text: &str) -> NaiveDate {
        NaiveDate::parse_from_str(text, "%Y-%m-%d").unwrap()
    }

    #[test]
    fn a_partition_is_named_by_its_day_and_only_those_names_are_days() {
        let d = day("2026-12-02");
        assert_eq!(partition_name(d), "sensor_data_20261202");
        assert_eq!(day_of(&partition_name(d)), Some(d));
        for other in [
            "sensor_data_default",
            "sensor_data",
            "sensor_data_2026120",
            "sensor_data_202612021",
            "sensor_data_20261302",
            "sensor_data_2026-12-",
            "rollup_1m_20261202",
        ] {
            assert_eq!(day_of(other), None, "{other}");
        }
    }

    #[test]
    fn a_day_expires_once_it_has_ended_by_the_cutoff() {
        let d = day("2026-11-01");
        let midnight_after = start_of(day("2026-11-02"));
        assert!(expired(d, midnight_after));
        assert!(!expired(d, midnight_after - TimeDelta::microseconds(1)));
        assert!(!expired(d, start_of(d)), "the cutoff's own day is kept");
        assert!(!expired(NaiveDate::MAX, midnight_after));
    }

    #[test]
    fn a_batch_has_one_day_only_when_every_date_is_on_it() {
        let at = |text: &str| DateTime::parse_from_rfc3339(text).unwrap().to_utc();
        let d = day("2026-12-02");
        assert_eq!(one_day([at("2026-12-02T00:00:00Z")].into_iter()), Some(d));
        assert_eq!(
            one_day([at("2026-12-02T23:59:59.999Z"), at("2026-12-02T08:00:00Z")].into_iter()),
            Some(d)
        );
        assert_eq!(
            one_day([at("2026-12-02T23:59:59Z"), at("2026-12-03T00:00:00Z")].into_iter()),
            None,
            "midnight UTC starts the next day"
        );
        assert_eq!(
            one_day([at("2026-12-02T23:30:00-01:00")].into_iter()),
            Some(day("2026-12-03")),
            "the day is UTC's"
        );
        assert_eq!(one_day(std::iter::empty()), None);
    }

    #[test]
    fn the_missing_day_is_one_day_until_cleared_or_replaced() {
        let missing = MissingDay::new();
        let (a, b) = (day("2026-10-01"), day("2026-10-02"));
        assert!(!missing.is(a));
        missing.set(a);
        assert!(missing.is(a) && !missing.is(b));
        missing.clear(b);
        assert!(missing.is(a), "clearing another day leaves it");
        missing.set(b);
        assert!(!missing.is(a) && missing.is(b));
        missing.clear(b);
        assert!(!missing.is(b));
    }

    #[test]
    fn days_run_from_first_to_last_inclusive() {
        let all: Vec<_> = days(day("2026-12-30"), day("2027-01-02")).collect();
        assert_eq!(
            all,
            ["2026-12-30", "2026-12-31", "2027-01-01", "2027-01-02"].map(day)
        );
        assert_eq!(days(day("2026-12-02"), day("2026-12-01")).count(), 0);
    }
}
