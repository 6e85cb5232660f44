-- Each car's readings summarised per minute and per hour, for charts of long ranges: the count,
-- and for battery, speed and range the count of values, their sum (the mean is sum / n), least
-- and greatest; the first and last battery and the last position with the event time (date,
-- event id) that chose them. Maintained from each batch of sensor rows through rollup_batches;
-- the readings stored before this migration are summarised by the persistence worker from
-- rollup_backfill.
CREATE TABLE IF NOT EXISTS rollup_1m (
    vin                 TEXT NOT NULL,
    bucket              TIMESTAMPTZ NOT NULL,
    readings            BIGINT NOT NULL,
    battery_n           BIGINT NOT NULL,
    battery_sum         DOUBLE PRECISION NOT NULL,
    battery_min         DOUBLE PRECISION,
    battery_max         DOUBLE PRECISION,
    speed_n             BIGINT NOT NULL,
    speed_sum           DOUBLE PRECISION NOT NULL,
    speed_min           DOUBLE PRECISION,
    speed_max           DOUBLE PRECISION,
    range_n             BIGINT NOT NULL,
    range_sum           DOUBLE PRECISION NOT NULL,
    range_min           DOUBLE PRECISION,
    range_max           DOUBLE PRECISION,
    first_battery_date  TIMESTAMPTZ,
    first_battery_event UUID,
    first_battery       DOUBLE PRECISION,
    last_battery_date   TIMESTAMPTZ,
    last_battery_event  UUID,
    last_battery        DOUBLE PRECISION,
    position_date       TIMESTAMPTZ,
    position_event      UUID,
    latitude            DOUBLE PRECISION,
    longitude           DOUBLE PRECISION,
    PRIMARY KEY (vin, bucket)
) WITH (fillfactor = 70);

CREATE TABLE IF NOT EXISTS rollup_1h (LIKE rollup_1m INCLUDING ALL);

-- The sensor rows each committed batch added, by id, appended in the batch's transaction (one
-- row per batch, not per reading) and taken (deleted) by the persistence worker in the
-- transaction that adds them to the rollups: exactly once, whatever order batches commit in.
CREATE TABLE IF NOT EXISTS rollup_batches (
    id      BIGSERIAL PRIMARY KEY,
    row_ids BIGINT[] NOT NULL
);

-- Retention walks buckets by age.
CREATE INDEX IF NOT EXISTS rollup_1m_bucket ON rollup_1m (bucket);
CREATE INDEX IF NOT EXISTS rollup_1h_bucket ON rollup_1h (bucket);

-- The sensor rows stored before the rollups existed, still to be summarised: ids up to
-- `last_id`, from `next_id` on.
CREATE TABLE IF NOT EXISTS rollup_backfill (
    next_id BIGINT NOT NULL,
    last_id BIGINT NOT NULL
);
INSERT INTO rollup_backfill (next_id, last_id)
SELECT MIN(id), MAX(id) FROM sensor_data HAVING COUNT(*) > 0;
