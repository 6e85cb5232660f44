-- Each car's latest state: its newest reading by event time and when a reading last arrived
-- (written in the same transaction as each batch of sensor rows), and whether it is connected,
-- since when and why (from the connectivity stream, by session). "Where is my fleet" reads one
-- row per car instead of ranking every reading it ever sent. A car that connected but sent no
-- reading yet has no reading columns; one whose readings predate connectivity events has no
-- connectivity columns.
CREATE TABLE IF NOT EXISTS vehicle_state (
    vin         TEXT PRIMARY KEY,
    event_id    TEXT,
    received_at TEXT,
    name        TEXT,
    profile     TEXT,
    "range"     REAL,
    mpge        REAL,
    battery     REAL,
    malfunction INTEGER,
    speed       REAL,
    latitude    REAL,
    longitude   REAL,
    date        TEXT,
    last_seen   TEXT,
    online      INTEGER,
    session_id  TEXT,
    connectivity_changed_at TEXT,
    connectivity_reason     TEXT,
    node        TEXT
-- One B-tree keyed by VIN: every batch upserts a row per car, and a rowid table would keep a
-- second one for the key.
) WITHOUT ROWID;

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
