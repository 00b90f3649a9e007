-- action-metrics on ClickHouse, schema version 1: the raw actions and the effective-dated prices.
--
-- ClickHouse enforces no unique key. A re-emitted action (same id, same timestamp, town and type: a
-- retry) has the same sorting key, so ReplacingMergeTree keeps one row of it and every read says
-- FINAL, which dedupes the parts not merged yet. Money is Decimal, never Float: cost is
-- (uncached input x input_price + cache reads x cache_read_price + cache writes x cache_write_price
-- + tokens_out x output_price) / 1e6, a missing cache price meaning the input price; revenue is
-- credits x the credit price in force at the action's timestamp (ASOF JOIN on effective_from).
-- DateTime64 starts at 1900-01-01: that instant stands for "the beginning of time" here.
-- Every statement is idempotent, so an upgrade interrupted half-way (DDL is not transactional
-- here) is finished by running it again.

CREATE TABLE IF NOT EXISTS action_metrics
(
    id UUID,
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
    error Nullable(String),
    metadata String CODEC(ZSTD(3)),
    INDEX user_id_index user_id TYPE bloom_filter GRANULARITY 4,
    INDEX model_index model TYPE set(256) GRANULARITY 4
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(timestamp)
-- The dashboard filters first (a town, an action type, a time window); the id last, so that only
-- a re-sent copy of the same action shares a key and is replaced.
ORDER BY (town_id, action_type, toStartOfHour(timestamp), id);

CREATE TABLE IF NOT EXISTS model_prices
(
    model String,
    effective_from DateTime64(6, 'UTC'),
    input_per_1m Decimal(20, 9),
    output_per_1m Decimal(20, 9),
    cache_read_per_1m Nullable(Decimal(20, 9)),
    cache_write_per_1m Nullable(Decimal(20, 9)),
    source LowCardinality(String) DEFAULT 'manual',
    set_at DateTime64(6, 'UTC') DEFAULT now64(6)
)
-- Setting a price again for the same model and start replaces it: the latest set_at wins.
ENGINE = ReplacingMergeTree(set_at)
ORDER BY (model, effective_from);

CREATE TABLE IF NOT EXISTS credit_prices
(
    effective_from DateTime64(6, 'UTC'),
    usd_per_credit Decimal(20, 9),
    set_at DateTime64(6, 'UTC') DEFAULT now64(6)
)
ENGINE = ReplacingMergeTree(set_at)
ORDER BY effective_from;

-- The seed's prices (MODEL_COSTS_PER_1M, REVENUE_PER_CREDIT_USD), in force from the beginning of time.
INSERT INTO model_prices (model, effective_from, input_per_1m, output_per_1m) VALUES
    ('haiku', '1900-01-01 00:00:00', 0.25, 1.25),
    ('sonnet', '1900-01-01 00:00:00', 3, 15),
    ('opus', '1900-01-01 00:00:00', 15, 75),
    ('template', '1900-01-01 00:00:00', 0, 0),
    ('cached', '1900-01-01 00:00:00', 0, 0);

INSERT INTO credit_prices (effective_from, usd_per_credit) VALUES ('1900-01-01 00:00:00', 0.006);
