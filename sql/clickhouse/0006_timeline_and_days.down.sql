-- Down from version 6 to 5: the timeline, the daily rollups and their views go (the raw rows hold
-- every action not pruned, the hourly rollups every hour). Idempotent.

DROP VIEW IF EXISTS action_metrics_timeline_view;

DROP TABLE IF EXISTS action_metrics_timeline;

DROP VIEW IF EXISTS action_metrics_rollup_daily_view;

DROP TABLE IF EXISTS action_metrics_rollup_daily;

DROP VIEW IF EXISTS action_metrics_rollup_daily_detail_view;

DROP TABLE IF EXISTS action_metrics_rollup_daily_detail;
