-- Down from version 6 to 5: the timeline, the daily rollups and their views go (the raw rows hold
-- every action not pruned, the hourly rollups every hour), and the hourly detail rollup's
-- projection. Idempotent.

DROP VIEW IF EXISTS action_metrics_timeline_view;

DROP TABLE IF EXISTS action_metrics_timeline;

DROP VIEW IF EXISTS action_metrics_rollup_daily_view;

DROP TABLE IF EXISTS action_metrics_rollup_daily;

DROP VIEW IF EXISTS action_metrics_rollup_daily_detail_view;

DROP TABLE IF EXISTS action_metrics_rollup_daily_detail;

ALTER TABLE action_metrics_rollup_hourly_detail DROP PROJECTION IF EXISTS by_time;

ALTER TABLE action_metrics_rollup_hourly_detail RESET SETTING deduplicate_merge_projection_mode;
