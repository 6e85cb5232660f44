-- eCars' sensor_data columns, plus the idempotence key (event_id) and ingest time.
CREATE TABLE IF NOT EXISTS sensor_data (
    id          BIGSERIAL PRIMARY KEY,
    event_id    UUID NOT NULL UNIQUE,
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
    date        TIMESTAMPTZ NOT NULL
);

-- "Newest readings of one VIN".
CREATE INDEX IF NOT EXISTS sensor_data_vin_date ON sensor_data (vin, date DESC);

CREATE TABLE IF NOT EXISTS dead_letters (
    id          UUID PRIMARY KEY,
    received_at TIMESTAMPTZ NOT NULL,
    topic       TEXT NOT NULL,
    client_id   TEXT NOT NULL,
    reason      TEXT NOT NULL,
    payload     BYTEA NOT NULL
);

CREATE INDEX IF NOT EXISTS dead_letters_received_at ON dead_letters (received_at DESC);
