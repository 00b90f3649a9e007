-- action-metrics on ClickHouse, schema version 2: what the price catalogue and `db prune` keep.
--
-- model_prices gains the catalogue's tier threshold (its prices are the base tier's below it).
-- raw_kept_from records each `db prune` cut-off before any row goes: ClickHouse keeps no rollups,
-- so a read that reaches before max(kept_from) is refused (RawRowsPruned) rather than answered
-- from half a period. Idempotent, as version 1.

ALTER TABLE model_prices ADD COLUMN IF NOT EXISTS tiered_above_tokens Nullable(UInt64);

CREATE TABLE IF NOT EXISTS raw_kept_from
(
    kept_from DateTime64(6, 'UTC'),
    set_at DateTime64(6, 'UTC') DEFAULT now64(6)
)
ENGINE = MergeTree
ORDER BY kept_from;
