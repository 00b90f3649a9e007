-- action-metrics on ClickHouse, schema version 8: rollups per user.
--
-- A question about users (by user, the top users by loss, one user's figures) read every action of
-- its window from the timeline: at 10M actions by user over all time 2.3-2.7 s, most of it the
-- latency histograms of 10M rows. These hold the sums and histograms per user, model and credit
-- charge, per UTC day and per UTC month (1,000 users over 90 days: ~120,000 month rows), and the
-- question reads its whole UTC months and days there, the rest of its window (the hours around them,
-- the days holding a price change) from the timeline. There is no hourly level: one would hold
-- about as many rows as the actions.
--
-- They are fed by materialized views from what the repository inserts (first id wins), as the other
-- rollups are, and filled from the timeline, which holds every action not pruned. What a prune
-- removed before this version is in no user rollup: user_rollups_from records that cut-off (the last
-- prune's, none if never pruned), and a question about users reaching before it is refused
-- (RawRowsPruned) as it was. A prune from now on keeps them, as it keeps the other rollups.
--
-- Upgrading from version 7 creates each view, then fills its table (emptied first: running it again
-- after an interruption is safe). Stop the writers while upgrading: an action written between a
-- view's creation and its fill is counted twice, one written during a fill before its view missed.

CREATE TABLE IF NOT EXISTS user_rollups_from
(
    kept_from DateTime64(6, 'UTC')
)
ENGINE = MergeTree
ORDER BY kept_from;

TRUNCATE TABLE IF EXISTS user_rollups_from;

INSERT INTO user_rollups_from SELECT max(kept_from) FROM raw_kept_from HAVING count() > 0;

CREATE TABLE IF NOT EXISTS action_metrics_rollup_daily_user
(
    start DateTime64(6, 'UTC'),
    user_id String,
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
PARTITION BY toYYYYMM(start)
-- A user's rows together (a question about one user reads a granule or two); small granules, as
-- each row carries a histogram.
ORDER BY (user_id, start, model, credits)
SETTINGS index_granularity = 1024;

CREATE MATERIALIZED VIEW IF NOT EXISTS action_metrics_rollup_daily_user_view TO action_metrics_rollup_daily_user AS
SELECT
    -- The UTC day, from 1900 on (toStartOfDay stops at 1970).
    fromUnixTimestamp64Micro(
        toUnixTimestamp64Micro(timestamp) - positiveModulo(toUnixTimestamp64Micro(timestamp), 86400000000), 'UTC'
    ) AS start,
    user_id, model,
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
GROUP BY start, user_id, model, credits;

TRUNCATE TABLE IF EXISTS action_metrics_rollup_daily_user;

-- From the timeline: every action not pruned, each once.
INSERT INTO action_metrics_rollup_daily_user
SELECT
    -- The UTC day, from 1900 on (toStartOfDay stops at 1970).
    fromUnixTimestamp64Micro(
        toUnixTimestamp64Micro(timestamp) - positiveModulo(toUnixTimestamp64Micro(timestamp), 86400000000), 'UTC'
    ) AS start,
    user_id, model,
    credits_charged AS credits,
    count() AS count,
    sum(toUInt128(tokens_in)) AS tokens_in,
    sum(toUInt128(tokens_out)) AS tokens_out,
    sum(toUInt128(cache_read_tokens)) AS cache_read_tokens,
    sum(toUInt128(cache_write_tokens)) AS cache_write_tokens,
    sum(toUInt128(reasoning_tokens)) AS reasoning_tokens,
    sum(toDecimal256(latency_ms, 30)) AS latency_ms_sum,
    countIf(t.succeeded) AS succeeded,
    sumMap(
        [if(latency_ms > 0, toInt32(ceil(log(latency_ms) / 0.018000486023620893)), toInt32(-2147483648))],
        [toUInt64(t.succeeded)]
    ) AS latency_bins
FROM action_metrics_timeline AS t
GROUP BY start, user_id, model, credits;

CREATE TABLE IF NOT EXISTS action_metrics_rollup_monthly_user
(
    start DateTime64(6, 'UTC'),
    user_id String,
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
-- As the daily rollup per user: a user's rows together.
ORDER BY (user_id, start, model, credits)
SETTINGS index_granularity = 1024;

CREATE MATERIALIZED VIEW IF NOT EXISTS action_metrics_rollup_monthly_user_view TO action_metrics_rollup_monthly_user AS
SELECT
    -- The UTC month, from 1900 on (Date32 reaches back that far; toStartOfMonth's Date does not).
    toDateTime64(makeDate32(toYear(timestamp), toMonth(timestamp), 1), 6, 'UTC') AS start,
    user_id, model,
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
GROUP BY start, user_id, model, credits;

TRUNCATE TABLE IF EXISTS action_metrics_rollup_monthly_user;

-- From the daily rollup per user.
INSERT INTO action_metrics_rollup_monthly_user
SELECT
    toDateTime64(makeDate32(toYear(start), toMonth(start), 1), 6, 'UTC') AS month,
    user_id, model,
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
FROM action_metrics_rollup_daily_user
GROUP BY month, user_id, model, credits;
