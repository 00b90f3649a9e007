-- action-metrics on ClickHouse, schema version 6: what makes the dashboard's questions cheap at
-- millions of actions: the actions again, narrow and ordered by time, and rollups per UTC day.
--
-- Without `exact=True` a question reads the whole UTC days of its window from a daily rollup, the
-- whole UTC hours around them from an hourly one, and the rest (the partial hours at its edges, the
-- hours holding a price change, the hours a local bucket cuts) from raw rows.
--
-- action_metrics_timeline: action_metrics is ordered by town, action type, hour and id, so at
-- millions of actions each granule holds several towns' rows of every hour of its month and one edge
-- hour read a whole month there (FINAL included). Here the same actions, without their ids,
-- metadata and error texts, are ordered by time: an hour is a granule or two. Two projections order
-- them by user and by citizen, so a question about one user or citizen reads that one's rows only (a
-- projection is never used with FINAL, hence a table of its own rather than one on action_metrics).
-- It is fed by a materialized view from what the repository inserts (first id wins), as the rollups
-- are: an action counts here exactly as in the rollups, which it completes; no FINAL is needed.
-- `db prune` removes from it what it removes from the raw rows (its DELETE rebuilds the projections).
--
-- action_metrics_rollup_daily and _daily_detail: the hourly rollups' sums and histograms per UTC
-- day (a day holding a price change is read by the hour around it). At 10M actions over 90 days
-- the hourly detail rollup holds about half as many rows as there are actions; per day, ~250,000.
-- They are filled from the hourly rollups, which keep what `db prune` removed.
--
-- Upgrading from version 5 creates each view, then fills its table (emptied first: running it again
-- after an interruption is safe). Stop the writers while upgrading: an action written between a
-- view's creation and its fill is counted twice, one written during a fill before its view missed.

CREATE TABLE IF NOT EXISTS action_metrics_timeline
(
    timestamp DateTime64(6, 'UTC'),
    action_type LowCardinality(String),
    user_id String,
    town_id String,
    citizen_id Nullable(String),
    model LowCardinality(String),
    tokens_in UInt64,
    tokens_out UInt64,
    cache_read_tokens UInt64,
    cache_write_tokens UInt64,
    reasoning_tokens UInt64,
    latency_ms Float64,
    credits_charged UInt64,
    succeeded Bool,
    PROJECTION by_user (SELECT * ORDER BY user_id, timestamp),
    PROJECTION by_citizen (SELECT * ORDER BY citizen_id, timestamp)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(timestamp)
ORDER BY timestamp
SETTINGS allow_nullable_key = 1, lightweight_mutation_projection_mode = 'rebuild';

CREATE MATERIALIZED VIEW IF NOT EXISTS action_metrics_timeline_view TO action_metrics_timeline AS
SELECT
    timestamp, action_type, user_id, town_id, citizen_id, model, tokens_in, tokens_out,
    cache_read_tokens, cache_write_tokens, reasoning_tokens, latency_ms, credits_charged,
    error IS NULL AS succeeded
FROM action_metrics;

TRUNCATE TABLE IF EXISTS action_metrics_timeline;

INSERT INTO action_metrics_timeline
SELECT
    timestamp, action_type, user_id, town_id, citizen_id, model, tokens_in, tokens_out,
    cache_read_tokens, cache_write_tokens, reasoning_tokens, latency_ms, credits_charged,
    error IS NULL AS succeeded
FROM action_metrics FINAL
-- In time order, so that the parts the fill writes do not each span all of time (an hour read then
-- touches one part, not every one); the sort spills to disk past half the memory.
ORDER BY timestamp;

CREATE TABLE IF NOT EXISTS action_metrics_rollup_daily
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
PARTITION BY toYYYYMM(start)
ORDER BY (start, model, credits);

CREATE MATERIALIZED VIEW IF NOT EXISTS action_metrics_rollup_daily_view TO action_metrics_rollup_daily AS
SELECT
    -- The UTC day, from 1900 on (toStartOfDay stops at 1970).
    fromUnixTimestamp64Micro(
        toUnixTimestamp64Micro(timestamp) - positiveModulo(toUnixTimestamp64Micro(timestamp), 86400000000), 'UTC'
    ) AS start,
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

TRUNCATE TABLE IF EXISTS action_metrics_rollup_daily;

-- From the hourly rollup, which keeps what `db prune` removed from the raw rows.
INSERT INTO action_metrics_rollup_daily
SELECT
    -- The UTC day, from 1900 on (toStartOfDay stops at 1970).
    fromUnixTimestamp64Micro(
        toUnixTimestamp64Micro(start) - positiveModulo(toUnixTimestamp64Micro(start), 86400000000), 'UTC'
    ) AS day,
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
FROM action_metrics_rollup_hourly
GROUP BY day, model, credits;

CREATE TABLE IF NOT EXISTS action_metrics_rollup_daily_detail
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
PARTITION BY toYYYYMM(start)
-- Action type first (11 of them), so that one action type's rows lie together and a town's in one
-- run per action type; small granules, as each row carries a histogram of a day's latencies.
ORDER BY (action_type, town_id, start, model, credits)
SETTINGS index_granularity = 1024;

CREATE MATERIALIZED VIEW IF NOT EXISTS action_metrics_rollup_daily_detail_view TO action_metrics_rollup_daily_detail AS
SELECT
    -- The UTC day, from 1900 on (toStartOfDay stops at 1970).
    fromUnixTimestamp64Micro(
        toUnixTimestamp64Micro(timestamp) - positiveModulo(toUnixTimestamp64Micro(timestamp), 86400000000), 'UTC'
    ) AS start,
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

TRUNCATE TABLE IF EXISTS action_metrics_rollup_daily_detail;

-- From the hourly rollup, which keeps what `db prune` removed from the raw rows.
INSERT INTO action_metrics_rollup_daily_detail
SELECT
    -- The UTC day, from 1900 on (toStartOfDay stops at 1970).
    fromUnixTimestamp64Micro(
        toUnixTimestamp64Micro(start) - positiveModulo(toUnixTimestamp64Micro(start), 86400000000), 'UTC'
    ) AS day,
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
FROM action_metrics_rollup_hourly_detail
GROUP BY day, town_id, action_type, model, credits;
