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
-- Timestamps are UTC text ('YYYY-MM-DD HH:MM:SS.ffffff'), so the day is a prefix of it.
--   error_count    = actions that failed
-- p50/p95_latency_ms describe the successful actions, from the rollups' latency histograms (since
-- revision 0020): the day's histogram per model (the open day's holds its closed hours) and the open
-- hour's raw latencies, merged and interpolated as percentile_cont would over the bins'
-- representatives (action_metrics_latency_bins), so within 1% of the exact percentile, as
-- `aggregate()`'s; computed only when a query selects them, at a cost that does not grow with the
-- actions stored, and kept for days whose raw rows `action-metrics db prune` removed.
--
-- Sums past 64 bits (since revision 0017): an action's tokens and credits may each be up to 2**63 - 1,
-- and SQLite's SUM raises "integer overflow", failing the whole query, once a group's sum passes that.
-- So tokens_in, tokens_out, credits_charged and the cache and reasoning tokens are summed by TOTAL, in
-- a double, and read as an INTEGER below 9.2e18 (just under 2**63), as a REAL from there: exact
-- integers below 2**53 (~9.0e15), rounded to a double's 53 bits above, never an error. revenue_usd is
-- a TOTAL too (a whole-dollar credit price is stored as an INTEGER, so a SUM of its products could
-- overflow); cost_usd is a TOTAL of REALs. Both money columns are REALs in every row (0.0 where nothing
-- is priced: SUM's NULL read as an INTEGER 0 before). count, error_count and unpriced_count count
-- actions, and stay SUM.
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
        AND r.start >= COALESCE((SELECT days_closed_until FROM action_metrics_rollup_state), '')
        AND r.start < (SELECT hours_closed_until FROM action_metrics_rollup_state)
    UNION ALL
    -- The open hour's raw rows, one part per bucket, group and price period (as a rollup row is):
    -- priced once on their sums, not row by row, so that a group's money is not the sum of many
    -- rounded doubles (one huge action among 20,000 tiny ones stays exact to 1e-9 USD).
    SELECT
        MIN(m."timestamp"), m.model, COUNT(*), TOTAL(m.tokens_in), TOTAL(m.tokens_out),
        TOTAL(m.credits_charged), TOTAL(m.latency_ms),
        TOTAL(m.cache_read_tokens), TOTAL(m.cache_write_tokens), TOTAL(m.reasoning_tokens), COUNT(m.error)
    FROM action_metrics AS m
    LEFT JOIN model_price_periods AS p
        ON p.model = m.model
        AND m."timestamp" >= p.effective_from
        AND (p.effective_until IS NULL OR m."timestamp" < p.effective_until)
    LEFT JOIN credit_price_periods AS c
        ON m."timestamp" >= c.effective_from
        AND (c.effective_until IS NULL OR m."timestamp" < c.effective_until)
    WHERE m."timestamp" >= COALESCE((SELECT hours_closed_until FROM action_metrics_rollup_state), '')
    GROUP BY date(m."timestamp"), m.model, p.effective_from, c.effective_from
),
grouped AS (
    SELECT
        date(s.start) AS day,
        s.model,
        SUM(s.count) AS count,
        CASE WHEN TOTAL(s.tokens_in) < 9.2e18 THEN CAST(TOTAL(s.tokens_in) AS INTEGER)
            ELSE TOTAL(s.tokens_in) END AS tokens_in,
        CASE WHEN TOTAL(s.tokens_out) < 9.2e18 THEN CAST(TOTAL(s.tokens_out) AS INTEGER)
            ELSE TOTAL(s.tokens_out) END AS tokens_out,
        CASE WHEN TOTAL(s.credits_charged) < 9.2e18 THEN CAST(TOTAL(s.credits_charged) AS INTEGER)
            ELSE TOTAL(s.credits_charged) END AS credits_charged,
        CASE WHEN TOTAL(s.cache_read_tokens) < 9.2e18 THEN CAST(TOTAL(s.cache_read_tokens) AS INTEGER)
            ELSE TOTAL(s.cache_read_tokens) END AS cache_read_tokens,
        CASE WHEN TOTAL(s.cache_write_tokens) < 9.2e18 THEN CAST(TOTAL(s.cache_write_tokens) AS INTEGER)
            ELSE TOTAL(s.cache_write_tokens) END AS cache_write_tokens,
        CASE WHEN TOTAL(s.reasoning_tokens) < 9.2e18 THEN CAST(TOTAL(s.reasoning_tokens) AS INTEGER)
            ELSE TOTAL(s.reasoning_tokens) END AS reasoning_tokens,
        SUM(s.error_count) AS error_count,
        TOTAL(
            ((s.tokens_in - s.cache_read_tokens - s.cache_write_tokens) * p.input_per_1m
            + s.cache_read_tokens * COALESCE(p.cache_read_per_1m, p.input_per_1m)
            + s.cache_write_tokens * COALESCE(p.cache_write_per_1m, p.input_per_1m)
            + s.tokens_out * p.output_per_1m) / 1000000.0
        )
            AS cost_usd,
        TOTAL(s.credits_charged * c.usd_per_credit) AS revenue_usd,
        SUM(CASE WHEN p.model IS NULL THEN s.count ELSE 0 END) AS unpriced_count,
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
    (
        SELECT w.low + w.weight * (COALESCE(w.high, w.low) - w.low)
        FROM (
            SELECT
                MAX(CASE WHEN r.upto - r.n <= r.low_rank AND r.low_rank < r.upto THEN r.value END) AS low,
                MAX(CASE WHEN r.upto - r.n <= r.low_rank + 1 AND r.low_rank + 1 < r.upto THEN r.value END) AS high,
                MAX(r.position - r.low_rank) AS weight
            FROM (
                SELECT
                    l.value,
                    l.n,
                    SUM(l.n) OVER (ORDER BY l.value ROWS UNBOUNDED PRECEDING) AS upto,
                    (SUM(l.n) OVER () - 1) * 0.5 AS position,
                    CAST((SUM(l.n) OVER () - 1) * 0.5 AS INTEGER) AS low_rank
                FROM (
                    SELECT b.value_ms AS value, h.count AS n
                    FROM action_metrics_latency_histogram AS h
                    JOIN action_metrics_latency_bins AS b ON b.bin = h.bin
                    WHERE h.grain = 'day' AND h.town_id = '' AND h.action_type = '' AND h.model = g.model
                        AND h.start >= g.day
                        AND h.start < MIN(date(g.day, '+1 day'), COALESCE((SELECT hours_closed_until FROM action_metrics_rollup_state), ''))
                    UNION ALL
                    SELECT m.latency_ms, 1
                    FROM action_metrics AS m
                    WHERE m.model = g.model AND m.error IS NULL
                        AND m."timestamp" >= MAX(g.day, COALESCE((SELECT hours_closed_until FROM action_metrics_rollup_state), ''))
                        AND m."timestamp" < date(g.day, '+1 day')
                ) AS l
            ) AS r
        ) AS w
    ) AS p50_latency_ms,
    (
        SELECT w.low + w.weight * (COALESCE(w.high, w.low) - w.low)
        FROM (
            SELECT
                MAX(CASE WHEN r.upto - r.n <= r.low_rank AND r.low_rank < r.upto THEN r.value END) AS low,
                MAX(CASE WHEN r.upto - r.n <= r.low_rank + 1 AND r.low_rank + 1 < r.upto THEN r.value END) AS high,
                MAX(r.position - r.low_rank) AS weight
            FROM (
                SELECT
                    l.value,
                    l.n,
                    SUM(l.n) OVER (ORDER BY l.value ROWS UNBOUNDED PRECEDING) AS upto,
                    (SUM(l.n) OVER () - 1) * 0.95 AS position,
                    CAST((SUM(l.n) OVER () - 1) * 0.95 AS INTEGER) AS low_rank
                FROM (
                    SELECT b.value_ms AS value, h.count AS n
                    FROM action_metrics_latency_histogram AS h
                    JOIN action_metrics_latency_bins AS b ON b.bin = h.bin
                    WHERE h.grain = 'day' AND h.town_id = '' AND h.action_type = '' AND h.model = g.model
                        AND h.start >= g.day
                        AND h.start < MIN(date(g.day, '+1 day'), COALESCE((SELECT hours_closed_until FROM action_metrics_rollup_state), ''))
                    UNION ALL
                    SELECT m.latency_ms, 1
                    FROM action_metrics AS m
                    WHERE m.model = g.model AND m.error IS NULL
                        AND m."timestamp" >= MAX(g.day, COALESCE((SELECT hours_closed_until FROM action_metrics_rollup_state), ''))
                        AND m."timestamp" < date(g.day, '+1 day')
                ) AS l
            ) AS r
        ) AS w
    ) AS p95_latency_ms
FROM grouped AS g
