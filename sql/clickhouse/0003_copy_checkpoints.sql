-- action-metrics on ClickHouse, schema version 3: where `db copy` into this database has got to.
--
-- One row per source (its URL without the password): the (timestamp, id) of the last action
-- copied in the source's order and how many were sent. It is written after each batch's insert,
-- so a copy stopped between the two re-sends that batch when run again; ReplacingMergeTree and
-- FINAL make the re-sent actions count once. Idempotent, as version 1.

CREATE TABLE IF NOT EXISTS copy_checkpoints
(
    source String,
    last_timestamp DateTime64(6, 'UTC'),
    last_id String,
    copied UInt64,
    set_at DateTime64(6, 'UTC') DEFAULT now64(6)
)
ENGINE = ReplacingMergeTree(set_at)
ORDER BY source;
