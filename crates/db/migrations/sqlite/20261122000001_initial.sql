-- eCars' sensor_data columns, plus the idempotence key (event_id) and ingest time.
-- Times are RFC 3339 text with fixed microseconds and a Z, so text order is time order.
CREATE TABLE IF NOT EXISTS sensor_data (
    id          INTEGER PRIMARY KEY,
    event_id    TEXT NOT NULL UNIQUE,
    received_at TEXT NOT NULL,
    vin         TEXT NOT NULL,
    name        TEXT,
    profile     TEXT,
    "range"     REAL,
    mpge        REAL,
    battery     REAL,
    malfunction INTEGER,
    speed       REAL,
    latitude    REAL,
    longitude   REAL,
    date        TEXT NOT NULL
);

-- "Newest readings of one VIN".
CREATE INDEX IF NOT EXISTS sensor_data_vin_date ON sensor_data (vin, date DESC);

CREATE TABLE IF NOT EXISTS dead_letters (
    id          TEXT PRIMARY KEY,
    received_at TEXT NOT NULL,
    topic       TEXT NOT NULL,
    client_id   TEXT NOT NULL,
    reason      TEXT NOT NULL,
    payload     BLOB NOT NULL
);

CREATE INDEX IF NOT EXISTS dead_letters_received_at ON dead_letters (received_at DESC);
