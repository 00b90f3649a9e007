-- action-metrics on ClickHouse, schema version 7: rollups per UTC month.
--
-- A question over all time read every UTC day of it from a daily rollup: at 10M actions over 90
-- days the daily detail rollup holds ~250,000 rows, and merging their latency histograms was most of
-- what everything, an action type or a town over all time cost (150-190 ms). Its whole UTC months now
-- come from these (a month holding a price change is read by the day around it, as a day holding one
-- is read by the hour), the days and hours around them as before.
--
-- action_metrics_rollup_monthly and _monthly_detail: the daily rollups' sums and histograms per UTC
-- month, fed by materialized views from what the repository inserts (first id wins), as the other
-- rollups are, and filled from the daily rollups, which keep what `db prune` removed.
--
-- Upgrading from version 6 creates each view, then fills its table (emptied first: running it again
-- after an interruption is safe). Stop the writers while upgrading: an action written between a
-- view's creation and its fill is counted twice, one written during a fill before its view missed.

CREATE TABLE IF NOT EXISTS action_metrics_rollup_monthly
(
    start DateTime64(6, 'UTC'),
    model LowCardinality(String),
    credits UInt64,
    count SimpleAggregateFunction(sum, UInt64),
    tokens_in SimpleAggregateFunction(sum, UInt128),
    tokens_out SimpleAggregateFunction(sum, UInt128),
    cache_read_tokens SimpleAggregateFunction(sum, UInt128),
    cache_write_tokens SimpleAggregateFunction(sum, UInt128),
    reasoning_tokens SimpleAggregateFunction(sum, UInt128),
    latency_ms_sum SimpleAggregateFunction(sum, Decimal256(30)),
    succeeded SimpleAggregateFunction(sum, UInt64),
    latency_bins SimpleAggregateFunction(sumMap, Tuple(Array(Int32), Array(UInt64)))
)
ENGINE = AggregatingMergeTree
PARTITION BY toYear(start)
ORDER BY (start, model, credits);

CREATE MATERIALIZED VIEW IF NOT EXISTS action_metrics_rollup_monthly_view TO action_metrics_rollup_monthly AS
SELECT
    -- The UTC month, from 1900 on (Date32 reaches back that far; toStartOfMonth's Date does not).
    toDateTime64(makeDate32(toYear(timestamp), toMonth(timestamp), 1), 6, 'UTC') AS start,
    model,
    credits_charged AS credits,
    count() AS count,
    sum(toUInt128(tokens_in)) AS tokens_in,
    sum(toUInt128(tokens_out)) AS tokens_out,
    sum(toUInt128(cache_read_tokens)) AS cache_read_tokens,
    sum(toUInt128(cache_write_tokens)) AS cache_write_tokens,
    sum(toUInt128(reasoning_tokens)) AS reasoning_tokens,
    sum(toDecimal256(latency_ms, 30)) AS latency_ms_sum,
    countIf(error IS NULL) AS succeeded,
    sumMap(
        [if(latency_ms > 0, toInt32(ceil(log(latency_ms) / 0.018000486023620893)), toInt32(-2147483648))],
        [toUInt64(error IS NULL)]
    ) AS latency_bins
FROM action_metrics
GROUP BY start, model, credits;

TRUNCATE TABLE IF EXISTS action_metrics_rollup_monthly;

-- From the daily rollup, which keeps what `db prune` removed from the raw rows.
INSERT INTO action_metrics_rollup_monthly
SELECT
    toDateTime64(makeDate32(toYear(start), toMonth(start), 1), 6, 'UTC') AS month,
    model,
    credits,
    sum(count) AS count,
    sum(tokens_in) AS tokens_in,
    sum(tokens_out) AS tokens_out,
    sum(cache_read_tokens) AS cache_read_tokens,
    sum(cache_write_tokens) AS cache_write_tokens,
    sum(reasoning_tokens) AS reasoning_tokens,
    sum(latency_ms_sum) AS latency_ms_sum,
    sum(succeeded) AS succeeded,
    sumMap(latency_bins) AS latency_bins
FROM action_metrics_rollup_daily
GROUP BY month, model, credits;

CREATE TABLE IF NOT EXISTS action_metrics_rollup_monthly_detail
(
    start DateTime64(6, 'UTC'),
    town_id String,
    action_type LowCardinality(String),
    model LowCardinality(String),
    credits UInt64,
    count SimpleAggregateFunction(sum, UInt64),
    tokens_in SimpleAggregateFunction(sum, UInt128),
    tokens_out SimpleAggregateFunction(sum, UInt128),
    cache_read_tokens SimpleAggregateFunction(sum, UInt128),
    cache_write_tokens SimpleAggregateFunction(sum, UInt128),
    reasoning_tokens SimpleAggregateFunction(sum, UInt128),
    latency_ms_sum SimpleAggregateFunction(sum, Decimal256(30)),
    succeeded SimpleAggregateFunction(sum, UInt64),
    latency_bins SimpleAggregateFunction(sumMap, Tuple(Array(Int32), Array(UInt64)))
)
ENGINE = AggregatingMergeTree
PARTITION BY toYear(start)
-- As the daily detail rollup: an action type's rows together, a town's in one run per action type.
ORDER BY (action_type, town_id, start, model, credits)
SETTINGS index_granularity = 1024;

CREATE MATERIALIZED VIEW IF NOT EXISTS action_metrics_rollup_monthly_detail_view TO action_metrics_rollup_monthly_detail AS
SELECT
    -- The UTC month, from 1900 on (Date32 reaches back that far; toStartOfMonth's Date does not).
    toDateTime64(makeDate32(toYear(timestamp), toMonth(timestamp), 1), 6, 'UTC') AS start,
    town_id, action_type, model,
    credits_charged AS credits,
    count() AS count,
    sum(toUInt128(tokens_in)) AS tokens_in,
    sum(toUInt128(tokens_out)) AS tokens_out,
    sum(toUInt128(cache_read_tokens)) AS cache_read_tokens,
    sum(toUInt128(cache_write_tokens)) AS cache_write_tokens,
    sum(toUInt128(reasoning_tokens)) AS reasoning_tokens,
    sum(toDecimal256(latency_ms, 30)) AS latency_ms_sum,
    countIf(error IS NULL) AS succeeded,
    sumMap(
        [if(latency_ms > 0, toInt32(ceil(log(latency_ms) / 0.018000486023620893)), toInt32(-2147483648))],
        [toUInt64(error IS NULL)]
    ) AS latency_bins
FROM action_metrics
GROUP BY start, town_id, action_type, model, credits;

TRUNCATE TABLE IF EXISTS action_metrics_rollup_monthly_detail;

-- From the daily rollup, which keeps what `db prune` removed from the raw rows.
INSERT INTO action_metrics_rollup_monthly_detail
SELECT
    toDateTime64(makeDate32(toYear(start), toMonth(start), 1), 6, 'UTC') AS month,
    town_id, action_type, model,
    credits,
    sum(count) AS count,
    sum(tokens_in) AS tokens_in,
    sum(tokens_out) AS tokens_out,
    sum(cache_read_tokens) AS cache_read_tokens,
    sum(cache_write_tokens) AS cache_write_tokens,
    sum(reasoning_tokens) AS reasoning_tokens,
    sum(latency_ms_sum) AS latency_ms_sum,
    sum(succeeded) AS succeeded,
    sumMap(latency_bins) AS latency_bins
FROM action_metrics_rollup_daily_detail
GROUP BY month, town_id, action_type, model, credits;
