-- Down from version 9 to 8: the tables keep no insert tokens (version 8's defaults). Idempotent.

ALTER TABLE action_metrics RESET SETTING non_replicated_deduplication_window;

ALTER TABLE action_metrics_ids RESET SETTING non_replicated_deduplication_window;

ALTER TABLE action_metrics_timeline RESET SETTING non_replicated_deduplication_window;

ALTER TABLE action_metrics_rollup_hourly RESET SETTING non_replicated_deduplication_window;

ALTER TABLE action_metrics_rollup_hourly_detail RESET SETTING non_replicated_deduplication_window;

ALTER TABLE action_metrics_rollup_daily RESET SETTING non_replicated_deduplication_window;

ALTER TABLE action_metrics_rollup_daily_detail RESET SETTING non_replicated_deduplication_window;

ALTER TABLE action_metrics_rollup_monthly RESET SETTING non_replicated_deduplication_window;

ALTER TABLE action_metrics_rollup_monthly_detail RESET SETTING non_replicated_deduplication_window;

ALTER TABLE action_metrics_rollup_daily_user RESET SETTING non_replicated_deduplication_window;

ALTER TABLE action_metrics_rollup_monthly_user RESET SETTING non_replicated_deduplication_window;
