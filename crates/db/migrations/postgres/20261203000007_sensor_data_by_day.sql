-- sensor_data partitioned by the day (UTC) of each reading's date: retention drops a day's
-- partition instead of deleting its rows one by one, and a car's history reads only the days
-- it asks for. A unique constraint of a partitioned table includes the partition key, so the
-- idempotence key becomes (event_id, date): the same, since a reading's event id is derived
-- from its date (a redelivered record carries both unchanged).
--
-- Existing rows are copied into the new table, with one partition per day they cover in the
-- last 90 days; older (or far-future) ones land in the default partition, which retention
-- empties in batches. The persistence worker creates the partitions of the days ahead.

ALTER TABLE sensor_data RENAME TO sensor_data_unpartitioned;
ALTER TABLE sensor_data_unpartitioned RENAME CONSTRAINT sensor_data_pkey TO sensor_data_unpartitioned_pkey;
ALTER TABLE sensor_data_unpartitioned RENAME CONSTRAINT sensor_data_event_id_key TO sensor_data_unpartitioned_event_id_key;
ALTER INDEX sensor_data_vin_date RENAME TO sensor_data_unpartitioned_vin_date;

CREATE TABLE sensor_data (
    id          BIGINT NOT NULL DEFAULT nextval('sensor_data_id_seq'),
    event_id    UUID NOT NULL,
    received_at TIMESTAMPTZ NOT NULL,
    vin         TEXT NOT NULL,
    name        TEXT,
    profile     TEXT,
    "range"     DOUBLE PRECISION,
    mpge        DOUBLE PRECISION,
    battery     DOUBLE PRECISION,
    malfunction BOOLEAN,
    speed       DOUBLE PRECISION,
    latitude    DOUBLE PRECISION,
    longitude   DOUBLE PRECISION,
    date        TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (id, date),
    UNIQUE (event_id, date)
) PARTITION BY RANGE (date);

-- The ids go on from where they were (the rollup queue and backfill refer to them); the
-- sequence now belongs to the new table, so dropping the old one keeps it.
ALTER SEQUENCE sensor_data_id_seq OWNED BY sensor_data.id;

CREATE INDEX sensor_data_vin_date ON sensor_data (vin, date DESC);

CREATE TABLE sensor_data_default PARTITION OF sensor_data DEFAULT;

DO $$
DECLARE
    day DATE;
    today DATE := (now() AT TIME ZONE 'UTC')::date;
BEGIN
    FOR day IN
        SELECT DISTINCT (date AT TIME ZONE 'UTC')::date FROM sensor_data_unpartitioned
        WHERE date >= now() - interval '90 days' AND date < now() + interval '8 days'
        UNION
        SELECT today + ahead FROM generate_series(-1, 7) AS ahead
    LOOP
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF sensor_data FOR VALUES FROM (%L) TO (%L)',
            'sensor_data_' || to_char(day, 'YYYYMMDD'),
            day::timestamp AT TIME ZONE 'UTC',
            (day + 1)::timestamp AT TIME ZONE 'UTC');
    END LOOP;
END $$;

INSERT INTO sensor_data (id, event_id, received_at, vin, name, profile, "range", mpge, battery,
                         malfunction, speed, latitude, longitude, date)
SELECT id, event_id, received_at, vin, name, profile, "range", mpge, battery,
       malfunction, speed, latitude, longitude, date
FROM sensor_data_unpartitioned;

DROP TABLE sensor_data_unpartitioned;

ANALYZE sensor_data;

-- The dates of the rows each queued batch added: reading them back for the rollups then looks
-- only in the partitions of those days.
ALTER TABLE rollup_batches ADD COLUMN first_date TIMESTAMPTZ, ADD COLUMN last_date TIMESTAMPTZ;
