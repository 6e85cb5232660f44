-- Each car's latest state: its newest reading by event time and when a reading last arrived
-- (written in the same transaction as each batch of sensor rows), and whether it is connected,
-- since when and why (from the connectivity stream, by session). "Where is my fleet" reads one
-- row per car instead of ranking every reading it ever sent. A car that connected but sent no
-- reading yet has no reading columns; one whose readings predate connectivity events has no
-- connectivity columns.
CREATE TABLE IF NOT EXISTS vehicle_state (
    vin         TEXT PRIMARY KEY,
    event_id    UUID,
    received_at TIMESTAMPTZ,
    name        TEXT,
    profile     TEXT,
    "range"     DOUBLE PRECISION,
    mpge        DOUBLE PRECISION,
    battery     DOUBLE PRECISION,
    malfunction BOOLEAN,
    speed       DOUBLE PRECISION,
    latitude    DOUBLE PRECISION,
    longitude   DOUBLE PRECISION,
    date        TIMESTAMPTZ,
    last_seen   TIMESTAMPTZ,
    online      BOOLEAN,
    session_id  UUID,
    connectivity_changed_at TIMESTAMPTZ,
    connectivity_reason     TEXT,
    node        TEXT
-- Every batch updates a row per car: room on each page lets PostgreSQL update in place (HOT,
-- no index entry per update).
) WITH (fillfactor = 50);

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
