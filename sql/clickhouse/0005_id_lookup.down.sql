-- Down from version 5 to 4: the ids table and its view go (the raw rows hold every id not pruned),
-- and the bloom filter on id that version 4's lookup reads comes back. Idempotent.

DROP VIEW IF EXISTS action_metrics_ids_view;

DROP TABLE IF EXISTS action_metrics_ids;

ALTER TABLE action_metrics ADD INDEX IF NOT EXISTS id_index id TYPE bloom_filter GRANULARITY 4;

ALTER TABLE action_metrics MATERIALIZE INDEX id_index;
