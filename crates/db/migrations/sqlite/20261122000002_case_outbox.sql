-- The anomaly worker's state and its durable case outbox. Written once for PostgreSQL and
-- SQLite: times are Unix milliseconds, JSON documents are text.

-- What the detector remembers of each car (its open episodes, its battery window), written in
-- the same transaction as the outbox rows its readings produced.
CREATE TABLE IF NOT EXISTS anomaly_vehicle_state (
    vin          TEXT PRIMARY KEY,
    state        TEXT NOT NULL,
    last_date_ms BIGINT NOT NULL
);

CREATE INDEX IF NOT EXISTS anomaly_vehicle_state_last_date ON anomaly_vehicle_state (last_date_ms);

-- One row per episode: the Case as it should be in Salesforce, and how far its sync got.
CREATE TABLE IF NOT EXISTS case_outbox (
    anomaly_key        TEXT PRIMARY KEY,          -- Case.Ecars_Anomaly_Key__c
    vin                TEXT NOT NULL,
    rule               TEXT NOT NULL,
    episode_started_ms BIGINT NOT NULL,
    episode_closed_ms  BIGINT,
    fields             TEXT NOT NULL,             -- the Case fields wanted, a JSON object
    version            BIGINT NOT NULL,           -- bumped whenever fields change
    synced_fields      TEXT,                      -- the fields Salesforce has, a JSON object
    synced_version     BIGINT NOT NULL DEFAULT 0,
    status             TEXT NOT NULL,             -- pending, synced, failed, paused, not_configured
    salesforce_id      TEXT,
    attempts           BIGINT NOT NULL DEFAULT 0,
    first_error_ms     BIGINT,
    last_error         TEXT,
    next_attempt_ms    BIGINT NOT NULL,
    lease_until_ms     BIGINT NOT NULL DEFAULT 0,
    synced_ms          BIGINT,
    created_ms         BIGINT NOT NULL,
    updated_ms         BIGINT NOT NULL
);

CREATE INDEX IF NOT EXISTS case_outbox_due ON case_outbox (status, next_attempt_ms);
CREATE INDEX IF NOT EXISTS case_outbox_created ON case_outbox (created_ms);
