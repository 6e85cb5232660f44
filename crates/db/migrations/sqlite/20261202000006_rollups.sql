-- Each car's readings summarised per minute and per hour, for charts of long ranges: the count,
-- and for battery, speed and range the count of values, their sum (the mean is sum / n), least
-- and greatest; the first and last battery and the last position with the event time (date,
-- event id) that chose them (times are text, as in sensor_data). Maintained from each batch of
-- sensor rows through rollup_batches; the readings stored before this migration are summarised
-- by the persistence worker from rollup_backfill.
CREATE TABLE IF NOT EXISTS rollup_1m (
    vin                 TEXT NOT NULL,
    bucket              TEXT NOT NULL,
    readings            INTEGER NOT NULL,
    battery_n           INTEGER NOT NULL,
    battery_sum         REAL NOT NULL,
    battery_min         REAL,
    battery_max         REAL,
    speed_n             INTEGER NOT NULL,
    speed_sum           REAL NOT NULL,
    speed_min           REAL,
    speed_max           REAL,
    range_n             INTEGER NOT NULL,
    range_sum           REAL NOT NULL,
    range_min           REAL,
    range_max           REAL,
    first_battery_date  TEXT,
    first_battery_event TEXT,
    first_battery       REAL,
    last_battery_date   TEXT,
    last_battery_event  TEXT,
    last_battery        REAL,
    position_date       TEXT,
    position_event      TEXT,
    latitude            REAL,
    longitude           REAL,
    PRIMARY KEY (vin, bucket)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS rollup_1h (
    vin                 TEXT NOT NULL,
    bucket              TEXT NOT NULL,
    readings            INTEGER NOT NULL,
    battery_n           INTEGER NOT NULL,
    battery_sum         REAL NOT NULL,
    battery_min         REAL,
    battery_max         REAL,
    speed_n             INTEGER NOT NULL,
    speed_sum           REAL NOT NULL,
    speed_min           REAL,
    speed_max           REAL,
    range_n             INTEGER NOT NULL,
    range_sum           REAL NOT NULL,
    range_min           REAL,
    range_max           REAL,
    first_battery_date  TEXT,
    first_battery_event TEXT,
    first_battery       REAL,
    last_battery_date   TEXT,
    last_battery_event  TEXT,
    last_battery        REAL,
    position_date       TEXT,
    position_event      TEXT,
    latitude            REAL,
    longitude           REAL,
    PRIMARY KEY (vin, bucket)
) WITHOUT ROWID;

-- The sensor rows each committed batch added, by id range (one writer at a time: a batch's
-- rows are the ids from its first to its last), appended in the batch's transaction and taken
-- (deleted) by the persistence worker in the transaction that adds them to the rollups.
CREATE TABLE IF NOT EXISTS rollup_batches (
    id        INTEGER PRIMARY KEY,
    first_row INTEGER NOT NULL,
    last_row  INTEGER NOT NULL
);


-- Retention walks buckets by age.
CREATE INDEX IF NOT EXISTS rollup_1m_bucket ON rollup_1m (bucket);
CREATE INDEX IF NOT EXISTS rollup_1h_bucket ON rollup_1h (bucket);

-- The sensor rows stored before the rollups existed, still to be summarised: ids up to
-- `last_id`, from `next_id` on.
CREATE TABLE IF NOT EXISTS rollup_backfill (
    next_id INTEGER NOT NULL,
    last_id INTEGER NOT NULL
);
INSERT INTO rollup_backfill (next_id, last_id)
SELECT MIN(id), MAX(id) FROM sensor_data HAVING COUNT(*) > 0;
