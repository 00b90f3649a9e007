-- Down from version 8 to 7: the rollups per user, their views and the cut-off they hold from go
-- (the timeline holds every action not pruned). Idempotent.

DROP VIEW IF EXISTS action_metrics_rollup_daily_user_view;

DROP TABLE IF EXISTS action_metrics_rollup_daily_user;

DROP VIEW IF EXISTS action_metrics_rollup_monthly_user_view;

DROP TABLE IF EXISTS action_metrics_rollup_monthly_user;

DROP TABLE IF EXISTS user_rollups_from;
