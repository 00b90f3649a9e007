-- action_metrics_hourly: one row per UTC hour x town x action type x model, from the rollups.
--
-- Closed hours come from the hourly rollup rows, the newest, still open hour from the raw rows;
-- action_metrics_rollup_state says where they meet. Columns and formulas are those of
-- action_metrics_daily, per hour (the column `hour` is the hour's start):
--   cost_usd       = SUM(((tokens_in - cache_read_tokens - cache_write_tokens) * input_per_1m
--                        + cache_read_tokens * cache_read_per_1m + cache_write_tokens * cache_write_per_1m
--                        + tokens_out * output_per_1m) / 1e6) over priced rows; a missing cache price
--                    is the input price (cache reads and writes are parts of tokens_in)
--   revenue_usd    = SUM(credits_charged * usd_per_credit)
--   unpriced_count = actions whose model had no price at the time (they add no cost)
-- Timestamps are UTC text ('YYYY-MM-DD HH:MM:SS.ffffff'), so the day and hour are prefixes of it.
--   error_count    = actions that failed
-- p50/p95_latency_ms describe the successful actions; they are exact over the group's raw rows, computed only when selected, NULL once
-- pruned.
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
CREATE VIEW action_metrics_hourly AS
WITH parts AS (
    SELECT
        r.start, r.town_id, r.action_type, r.model, r.count, r.tokens_in, r.tokens_out,
        r.credits_charged, r.latency_ms_sum,
        r.cache_read_tokens, r.cache_write_tokens, r.reasoning_tokens, r.error_count
    FROM action_metrics_rollup_detail AS r
    WHERE r.grain = 'hour'
        AND r.start < (SELECT hours_closed_until FROM action_metrics_rollup_state)
    UNION ALL
    -- The open hour's raw rows, one part per bucket, group and price period (as a rollup row is):
    -- priced once on their sums, not row by row, so that a group's money is not the sum of many
    -- rounded doubles (one huge action among 20,000 tiny ones stays exact to 1e-9 USD).
    SELECT
        MIN(m."timestamp"), m.town_id, m.action_type, m.model, COUNT(*), TOTAL(m.tokens_in), TOTAL(m.tokens_out),
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
    GROUP BY substr(m."timestamp", 1, 13), m.town_id, m.action_type, m.model, p.effective_from, c.effective_from
),
grouped AS (
    SELECT
        substr(s.start, 1, 13) || ':00:00.000000' AS hour,
        s.town_id,
        s.action_type,
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
    GROUP BY 1, 2, 3, 4
)
SELECT
    g.*,
    (
        SELECT low + weight * (COALESCE(high, low) - low)
        FROM (
            SELECT
                MAX(CASE WHEN position_rank = low_rank THEN latency_ms END) AS low,
                MAX(CASE WHEN position_rank = low_rank + 1 THEN latency_ms END) AS high,
                MAX(position - low_rank) AS weight
            FROM (
                SELECT
                    m.latency_ms,
                    ROW_NUMBER() OVER (ORDER BY m.latency_ms) - 1 AS position_rank,
                    (COUNT(*) OVER () - 1) * 0.5 AS position,
                    CAST((COUNT(*) OVER () - 1) * 0.5 AS INTEGER) AS low_rank
                FROM action_metrics AS m
                WHERE m.town_id = g.town_id AND m.action_type = g.action_type AND m.model = g.model AND m.error IS NULL
                    AND m."timestamp" >= g.hour AND m."timestamp" < strftime('%Y-%m-%d %H:%M:%f', g.hour, '+1 hour')
            )
        )
    ) AS p50_latency_ms,
    (
        SELECT low + weight * (COALESCE(high, low) - low)
        FROM (
            SELECT
                MAX(CASE WHEN position_rank = low_rank THEN latency_ms END) AS low,
                MAX(CASE WHEN position_rank = low_rank + 1 THEN latency_ms END) AS high,
                MAX(position - low_rank) AS weight
            FROM (
                SELECT
                    m.latency_ms,
                    ROW_NUMBER() OVER (ORDER BY m.latency_ms) - 1 AS position_rank,
                    (COUNT(*) OVER () - 1) * 0.95 AS position,
                    CAST((COUNT(*) OVER () - 1) * 0.95 AS INTEGER) AS low_rank
                FROM action_metrics AS m
                WHERE m.town_id = g.town_id AND m.action_type = g.action_type AND m.model = g.model AND m.error IS NULL
                    AND m."timestamp" >= g.hour AND m."timestamp" < strftime('%Y-%m-%d %H:%M:%f', g.hour, '+1 hour')
            )
        )
    ) AS p95_latency_ms
FROM grouped AS g
