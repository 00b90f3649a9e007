-- action_metrics_daily_by_model: one row per UTC day x model, from the rollups: the daily totals of each model.
-- For a dashboard summing per day, per town or per model: it reads the rollup's daily rows per model, so its
-- cost is that of UTC day x model rows, where action_metrics_daily's is that of every town x action x
-- model of every day.
--
-- Closed days come from the rollup's daily rows per model, the closed hours of the days after them from
-- its hourly rows per model, and the newest, still open hour from the raw rows;
-- action_metrics_rollup_state says where each ends. Rows are priced, as in action_metrics_daily, by
-- the prices in force at each row's start:
--   cost_usd       = SUM(((tokens_in - cache_read_tokens - cache_write_tokens) * input_per_1m
--                        + cache_read_tokens * cache_read_per_1m + cache_write_tokens * cache_write_per_1m
--                        + tokens_out * output_per_1m) / 1e6) over priced rows; a missing cache price
--                    is the input price (cache reads and writes are parts of tokens_in)
--   revenue_usd    = SUM(credits_charged * usd_per_credit)
--   unpriced_count = actions whose model had no price at the time (they add no cost)
--   avg_latency_ms = total latency / count
--   error_count    = actions that failed
-- p50/p95_latency_ms describe the successful actions, from the rollups' latency histograms (since
-- revision 0020): the day's histogram per model (the open day's holds its closed hours) and the open
-- hour's raw latencies, merged and interpolated as percentile_cont would over the bins'
-- representatives (exp(bin * ln(GAMMA)) * 0.991, as action_metrics_latency_bins holds them), so within
-- 1% of the exact percentile, as `aggregate()`'s; computed only when a query selects them, at a cost
-- that does not grow with the actions stored, and kept for days whose raw rows `action-metrics db
-- prune` removed. Both come from one read of the group's bins (a LATERAL subquery, which PostgreSQL
-- leaves out of a query that selects neither).
-- Tokens and credits are NUMERIC sums, exact at any size (0017): each action's may be up to
-- 2**63 - 1, so a group's sum need not fit a bigint, where a CAST to bigint failed every query over
-- the view. The counts of actions (count, error_count, unpriced_count) stay bigint.
CREATE VIEW action_metrics_daily_by_model AS
WITH parts AS (
    SELECT
        r.start, r.model, r.count, r.tokens_in, r.tokens_out, r.credits_charged, r.latency_ms_sum,
        r.cache_read_tokens, r.cache_write_tokens, r.reasoning_tokens, r.error_count
    FROM action_metrics_rollup AS r
    WHERE r.grain = 'day' AND r.town_id = '' AND r.action_type = ''
        AND r.start < (SELECT days_closed_until FROM action_metrics_rollup_state)
    UNION ALL
    SELECT
        r.start, r.model, r.count, r.tokens_in, r.tokens_out, r.credits_charged, r.latency_ms_sum,
        r.cache_read_tokens, r.cache_write_tokens, r.reasoning_tokens, r.error_count
    FROM action_metrics_rollup AS r
    WHERE r.grain = 'hour' AND r.town_id = '' AND r.action_type = ''
        AND r.start >= COALESCE((SELECT days_closed_until FROM action_metrics_rollup_state), '-infinity')
        AND r.start < (SELECT hours_closed_until FROM action_metrics_rollup_state)
    UNION ALL
    SELECT
        m."timestamp", m.model, 1, m.tokens_in, m.tokens_out, m.credits_charged, m.latency_ms,
        m.cache_read_tokens, m.cache_write_tokens, m.reasoning_tokens,
        CASE WHEN m.error IS NULL THEN 0 ELSE 1 END
    FROM action_metrics AS m
    WHERE m."timestamp" >= COALESCE((SELECT hours_closed_until FROM action_metrics_rollup_state), '-infinity')
),
grouped AS (
    SELECT
        CAST(s.start AT TIME ZONE 'UTC' AS date) AS day,
        s.model,
        CAST(SUM(s.count) AS bigint) AS count,
        SUM(s.tokens_in) AS tokens_in,
        SUM(s.tokens_out) AS tokens_out,
        SUM(s.credits_charged) AS credits_charged,
        SUM(s.cache_read_tokens) AS cache_read_tokens,
        SUM(s.cache_write_tokens) AS cache_write_tokens,
        SUM(s.reasoning_tokens) AS reasoning_tokens,
        CAST(SUM(s.error_count) AS bigint) AS error_count,
        COALESCE(SUM(
            ((s.tokens_in - s.cache_read_tokens - s.cache_write_tokens) * p.input_per_1m
            + s.cache_read_tokens * COALESCE(p.cache_read_per_1m, p.input_per_1m)
            + s.cache_write_tokens * COALESCE(p.cache_write_per_1m, p.input_per_1m)
            + s.tokens_out * p.output_per_1m) / 1000000.0
        ), 0)
            AS cost_usd,
        COALESCE(SUM(s.credits_charged * c.usd_per_credit), 0) AS revenue_usd,
        CAST(SUM(CASE WHEN p.model IS NULL THEN s.count ELSE 0 END) AS bigint) AS unpriced_count,
        SUM(s.latency_ms_sum) / SUM(s.count) AS avg_latency_ms
    FROM parts AS s
    LEFT JOIN model_price_periods AS p
        ON p.model = s.model
        AND s.start >= p.effective_from
        AND (p.effective_until IS NULL OR s.start < p.effective_until)
    LEFT JOIN credit_price_periods AS c
        ON s.start >= c.effective_from
        AND (c.effective_until IS NULL OR s.start < c.effective_until)
    GROUP BY 1, 2
)
SELECT
    g.*,
    p.low50 + p.weight50 * (COALESCE(p.high50, p.low50) - p.low50) AS p50_latency_ms,
    p.low95 + p.weight95 * (COALESCE(p.high95, p.low95) - p.low95) AS p95_latency_ms
FROM grouped AS g
LEFT JOIN LATERAL (
    SELECT
        MAX(CASE WHEN r.upto - r.n <= r.rank50 AND r.rank50 < r.upto THEN r.value END) AS low50,
        MAX(CASE WHEN r.upto - r.n <= r.rank50 + 1 AND r.rank50 + 1 < r.upto THEN r.value END) AS high50,
        MAX(r.position50 - r.rank50) AS weight50,
        MAX(CASE WHEN r.upto - r.n <= r.rank95 AND r.rank95 < r.upto THEN r.value END) AS low95,
        MAX(CASE WHEN r.upto - r.n <= r.rank95 + 1 AND r.rank95 + 1 < r.upto THEN r.value END) AS high95,
        MAX(r.position95 - r.rank95) AS weight95
    FROM (
        SELECT
            t.value,
            t.n,
            t.upto,
            t.last_rank * 0.5 AS position50,
            floor(t.last_rank * 0.5) AS rank50,
            t.last_rank * 0.95 AS position95,
            floor(t.last_rank * 0.95) AS rank95
        FROM (
            SELECT
                l.value,
                l.n,
                CAST(SUM(l.n) OVER (ORDER BY l.value ROWS UNBOUNDED PRECEDING) AS bigint) AS upto,
                CAST(SUM(l.n) OVER () - 1 AS double precision) AS last_rank
            FROM (
                -- The bin's representative, as action_metrics_latency_bins holds it (computed here: exp()
                -- is PostgreSQL's own, and a join to the table cost a fifth more).
                SELECT
                    CASE WHEN h.bin = -2147483648 THEN 0
                        ELSE exp(CAST(h.bin AS double precision) * CAST(0.018000486023620893 AS double precision)
                            + CAST(-0.00904074465214907 AS double precision))
                    END AS value,
                    h.count AS n
                FROM action_metrics_latency_histogram AS h
                WHERE h.grain = 'day' AND h.town_id = '' AND h.action_type = '' AND h.model = g.model
                    AND h.start >= CAST(g.day AS timestamp) AT TIME ZONE 'UTC'
                    AND h.start < LEAST(CAST(g.day + 1 AS timestamp) AT TIME ZONE 'UTC', COALESCE((SELECT hours_closed_until FROM action_metrics_rollup_state), '-infinity'))
                UNION ALL
                SELECT m.latency_ms, 1
                FROM action_metrics AS m
                WHERE m.model = g.model AND m.error IS NULL
                    AND m."timestamp" >= GREATEST(CAST(g.day AS timestamp) AT TIME ZONE 'UTC', COALESCE((SELECT hours_closed_until FROM action_metrics_rollup_state), '-infinity'))
                    AND m."timestamp" < CAST(g.day + 1 AS timestamp) AT TIME ZONE 'UTC'
            ) AS l
        ) AS t
    ) AS r
) AS p ON true
