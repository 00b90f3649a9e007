-- Down from version 7 to 6: the monthly rollups and their views go (the daily rollups hold every
-- day). Idempotent.

DROP VIEW IF EXISTS action_metrics_rollup_monthly_view;

DROP TABLE IF EXISTS action_metrics_rollup_monthly;

DROP VIEW IF EXISTS action_metrics_rollup_monthly_detail_view;

DROP TABLE IF EXISTS action_metrics_rollup_monthly_detail;
