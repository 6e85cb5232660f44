-- Which version of each outbox row went out on the anomalies stream: rows whose version is
-- newer are published (at least once) by the anomaly worker's event relay.
ALTER TABLE case_outbox ADD COLUMN published_version BIGINT NOT NULL DEFAULT 0;

CREATE INDEX IF NOT EXISTS case_outbox_updated ON case_outbox (updated_ms);
