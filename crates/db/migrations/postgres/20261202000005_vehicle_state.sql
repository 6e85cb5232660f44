-- Each car's latest state: its newest reading by event time and when it was last heard from,
-- written in the same transaction as each batch of sensor rows, so "where is my fleet" reads one
-- row per car instead of ranking every reading it ever sent.
CREATE TABLE IF NOT EXISTS vehicle_state (
    vin         TEXT PRIMARY KEY,
    event_id    UUID NOT NULL,
    received_at TIMESTAMPTZ NOT NULL,
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
    last_seen   TIMESTAMPTZ NOT NULL
);

-- The cars that have readings already.
INSERT INTO vehicle_state (vin, event_id, received_at, name, profile, "range", mpge, battery,
                           malfunction, speed, latitude, longitude, date, last_seen)
SELECT vin, event_id, received_at, name, profile, "range", mpge, battery,
       malfunction, speed, latitude, longitude, date, last_seen
FROM (SELECT s.*,
             ROW_NUMBER() OVER (PARTITION BY vin ORDER BY date DESC, event_id DESC) AS rn,
             MAX(received_at) OVER (PARTITION BY vin) AS last_seen
      FROM sensor_data s) newest
WHERE rn = 1;

-- A car's open anomalies (the fleet list shows them and filters by them).
CREATE INDEX IF NOT EXISTS case_outbox_open ON case_outbox (vin) WHERE episode_closed_ms IS NULL;
