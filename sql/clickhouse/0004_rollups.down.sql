-- Down from version 4 to 3: the rollups and their views go (nothing else is kept in them: the raw
-- rows still hold every action not pruned), and the bloom filter on id. Idempotent.

DROP VIEW IF EXISTS action_metrics_rollup_hourly_view;

DROP TABLE IF EXISTS action_metrics_rollup_hourly;

DROP VIEW IF EXISTS action_metrics_rollup_hourly_detail_view;

DROP TABLE IF EXISTS action_metrics_rollup_hourly_detail;

ALTER TABLE action_metrics DROP INDEX IF EXISTS id_index;
