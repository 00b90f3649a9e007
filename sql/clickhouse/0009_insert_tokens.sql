-- action-metrics on ClickHouse, schema version 9: a batch inserted twice at once counts once.
--
-- First id wins: the repository looks up which of a batch's ids are stored, then inserts the others
-- (one step per process). Two processes sending the same new batch at once (a retry sent to another
-- worker while the first is still writing) both found nothing stored, and both inserted it: the raw
-- rows, read with FINAL, counted it once, but the materialized views saw both inserts, and every
-- rollup counted it twice.
--
-- Each insert now carries a deduplication token naming what it inserts (a hash of the kept
-- actions' keys: id, town, action type, UTC hour), and these settings keep the tokens of each
-- table's last 1,000 inserts: the second insert of the same actions is dropped, by the raw table
-- and, with deduplicate_blocks_in_dependent_materialized_views, by every table its views feed (each
-- view's block deduplicated by a token derived from the insert's). Replicated tables (db upgrade
-- --sql --cluster) keep their tokens in Keeper by default (replicated_deduplication_window).
-- Not covered: two batches that share some actions but not all (their tokens differ).
--
-- With a window set, an insert without a token is deduplicated by its content: the package's own
-- INSERT ... SELECT into these tables (prune's split hours, a later version's fill) says
-- insert_deduplicate = 0.

ALTER TABLE action_metrics MODIFY SETTING non_replicated_deduplication_window = 1000;

ALTER TABLE action_metrics_ids MODIFY SETTING non_replicated_deduplication_window = 1000;

ALTER TABLE action_metrics_timeline MODIFY SETTING non_replicated_deduplication_window = 1000;

ALTER TABLE action_metrics_rollup_hourly MODIFY SETTING non_replicated_deduplication_window = 1000;

ALTER TABLE action_metrics_rollup_hourly_detail MODIFY SETTING non_replicated_deduplication_window = 1000;

ALTER TABLE action_metrics_rollup_daily MODIFY SETTING non_replicated_deduplication_window = 1000;

ALTER TABLE action_metrics_rollup_daily_detail MODIFY SETTING non_replicated_deduplication_window = 1000;

ALTER TABLE action_metrics_rollup_monthly MODIFY SETTING non_replicated_deduplication_window = 1000;

ALTER TABLE action_metrics_rollup_monthly_detail MODIFY SETTING non_replicated_deduplication_window = 1000;

ALTER TABLE action_metrics_rollup_daily_user MODIFY SETTING non_replicated_deduplication_window = 1000;

ALTER TABLE action_metrics_rollup_monthly_user MODIFY SETTING non_replicated_deduplication_window = 1000;
