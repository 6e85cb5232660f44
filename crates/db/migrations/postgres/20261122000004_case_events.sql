-- Changes of each Case's Salesforce sync (created, updated, failed) for the cases stream: the
-- sync writes the change in the same transaction as its outcome, and the anomaly worker's event
-- relay publishes rows whose sequence is newer than the one it published (at least once).
ALTER TABLE case_outbox ADD COLUMN case_event TEXT;
ALTER TABLE case_outbox ADD COLUMN case_event_seq BIGINT NOT NULL DEFAULT 0;
ALTER TABLE case_outbox ADD COLUMN case_event_ms BIGINT;
ALTER TABLE case_outbox ADD COLUMN case_published_seq BIGINT NOT NULL DEFAULT 0;
