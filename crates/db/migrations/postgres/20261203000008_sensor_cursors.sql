-- How far a reader of sensor_data in id order got: every row up to `through_id` is handled.
-- In `ecars up` the anomaly worker reads the rows the persistence worker committed (one writer,
-- so ids grow in commit order) and stores its cursor in the transaction of its states; after a
-- crash it reads the rows after the cursor again.
CREATE TABLE IF NOT EXISTS sensor_cursors (
    consumer   TEXT PRIMARY KEY,
    through_id BIGINT NOT NULL
);
