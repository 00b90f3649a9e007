-- action-metrics on ClickHouse, schema version 4: rollups kept by materialized views, and "first id
-- wins" on insert.
--
-- Each rollup holds, per UTC hour, model and credit charge (and per town and action type in the
-- detail table), the sums of the raw rows and a histogram of the successful actions' latencies in
-- our DDSketch bins: bin = ceil(ln(latency_ms) / ln(GAMMA)), GAMMA = 1.009 / 0.991 (rollup.bin_of;
-- -2147483648 for a latency of 0), so percentiles merged from any rows are within 1% and the same
-- every time. Money is not stored: tokens and credits are priced when read, per (hour, model), by
-- the price in force at the hour's start; an hour holding a price change is read from raw rows
-- (once they are pruned, from these rows, which `db prune` splits at the change first).
-- A materialized view sees every insert, FINAL or not: the repository inserts only ids not stored
-- yet (found by the bloom filter on id), so a re-sent action is counted once here too.
-- `db prune` drops raw rows and keeps these. Upgrading from version 3 fills the rollups from the
-- raw rows (FINAL); the fill starts from empty tables, so running it again after an interruption
-- counts nothing twice. Stop the writers while upgrading: an action written between the view's
-- creation and the fill is counted twice, one written during the fill before the view is not.

ALTER TABLE action_metrics ADD INDEX IF NOT EXISTS id_index id TYPE bloom_filter GRANULARITY 4;

ALTER TABLE action_metrics MATERIALIZE INDEX id_index;

CREATE TABLE IF NOT EXISTS action_metrics_rollup_hourly
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

CREATE TABLE IF NOT EXISTS action_metrics_rollup_hourly_detail
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
ORDER BY (town_id, action_type, start, model, credits);

TRUNCATE TABLE IF EXISTS action_metrics_rollup_hourly;

INSERT INTO action_metrics_rollup_hourly
SELECT
    -- The UTC hour, from 1900 on (toStartOfHour stops at 1970).
    fromUnixTimestamp64Micro(
        toUnixTimestamp64Micro(timestamp) - positiveModulo(toUnixTimestamp64Micro(timestamp), 3600000000), 'UTC'
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
FROM action_metrics FINAL
GROUP BY start, model, credits;

CREATE MATERIALIZED VIEW IF NOT EXISTS action_metrics_rollup_hourly_view TO action_metrics_rollup_hourly AS
SELECT
    -- The UTC hour, from 1900 on (toStartOfHour stops at 1970).
    fromUnixTimestamp64Micro(
        toUnixTimestamp64Micro(timestamp) - positiveModulo(toUnixTimestamp64Micro(timestamp), 3600000000), 'UTC'
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

TRUNCATE TABLE IF EXISTS action_metrics_rollup_hourly_detail;

INSERT INTO action_metrics_rollup_hourly_detail
SELECT
    -- The UTC hour, from 1900 on (toStartOfHour stops at 1970).
    fromUnixTimestamp64Micro(
        toUnixTimestamp64Micro(timestamp) - positiveModulo(toUnixTimestamp64Micro(timestamp), 3600000000), 'UTC'
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
FROM action_metrics FINAL
GROUP BY start, town_id, action_type, model, credits;

CREATE MATERIALIZED VIEW IF NOT EXISTS action_metrics_rollup_hourly_detail_view TO action_metrics_rollup_hourly_detail AS
SELECT
    -- The UTC hour, from 1900 on (toStartOfHour stops at 1970).
    fromUnixTimestamp64Micro(
        toUnixTimestamp64Micro(timestamp) - positiveModulo(toUnixTimestamp64Micro(timestamp), 3600000000), 'UTC'
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
