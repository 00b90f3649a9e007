-- action_metrics_daily: one row per UTC day x town x action type x model, from the rollups.
--
-- Closed days come from the daily rollup rows, the closed hours of the days after them from the
-- hourly ones, and the newest, still open hour from the raw rows (action_metrics_priced);
-- action_metrics_rollup_state says where each ends, so every action is counted exactly once.
-- Rollup rows keep tokens and credits, not money, and never span a price change: each is priced
-- here by the prices in force at its start.
--   cost_usd       = SUM((tokens_in * input_per_1m + tokens_out * output_per_1m) / 1e6) over priced rows
--   revenue_usd    = SUM(credits_charged * usd_per_credit)
--   unpriced_count = actions whose model had no price at the time (they add no cost)
--   avg_latency_ms = total latency / count
-- Timestamps are UTC text ('YYYY-MM-DD HH:MM:SS.ffffff'), so the day and hour are prefixes of it.
-- p50/p95_latency_ms are exact (percentile_cont written with window functions over the
-- group's raw rows) and computed only when a
-- query selects them; they are NULL for days whose raw rows `action-metrics db prune` removed.
CREATE VIEW action_metrics_daily AS
WITH state AS (
    SELECT hours_closed_until, days_closed_until FROM action_metrics_rollup_state
),
parts AS (
    SELECT
        date(r.start) AS day,
        r.town_id,
        r.action_type,
        r.model,
        r.count,
        r.tokens_in,
        r.tokens_out,
        r.credits_charged,
        r.latency_ms_sum,
        (r.tokens_in * p.input_per_1m + r.tokens_out * p.output_per_1m) / 1000000.0 AS cost_usd,
        r.credits_charged * c.usd_per_credit AS revenue_usd,
        CASE WHEN p.model IS NULL THEN r.count ELSE 0 END AS unpriced_count
    FROM action_metrics_rollup AS r
    CROSS JOIN state AS s
    LEFT JOIN model_price_periods AS p
        ON p.model = r.model
        AND r.start >= p.effective_from
        AND (p.effective_until IS NULL OR r.start < p.effective_until)
    LEFT JOIN credit_price_periods AS c
        ON r.start >= c.effective_from
        AND (c.effective_until IS NULL OR r.start < c.effective_until)
    WHERE r.town_id <> '' AND r.action_type <> ''
        AND (
            (r.grain = 'day' AND r.start < s.days_closed_until)
            OR (r.grain = 'hour' AND r.start < s.hours_closed_until
                AND (s.days_closed_until IS NULL OR r.start >= s.days_closed_until))
        )
    UNION ALL
    SELECT
        date(m."timestamp"),
        m.town_id,
        m.action_type,
        m.model,
        1,
        m.tokens_in,
        m.tokens_out,
        m.credits_charged,
        m.latency_ms,
        m.cost_usd,
        m.revenue_usd,
        CASE WHEN m.priced THEN 0 ELSE 1 END
    FROM action_metrics_priced AS m
    CROSS JOIN state AS s
    WHERE s.hours_closed_until IS NULL OR m."timestamp" >= s.hours_closed_until
),
grouped AS (
    SELECT
        day,
        town_id,
        action_type,
        model,
        (SUM(count)) AS count,
        (SUM(tokens_in)) AS tokens_in,
        (SUM(tokens_out)) AS tokens_out,
        (SUM(credits_charged)) AS credits_charged,
        COALESCE(SUM(cost_usd), 0) AS cost_usd,
        COALESCE(SUM(revenue_usd), 0) AS revenue_usd,
        (SUM(unpriced_count)) AS unpriced_count,
        SUM(latency_ms_sum) / SUM(count) AS avg_latency_ms
    FROM parts
    GROUP BY day, town_id, action_type, model
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
                WHERE m.town_id = g.town_id AND m.action_type = g.action_type AND m.model = g.model
                    AND m."timestamp" >= g.day AND m."timestamp" < date(g.day, '+1 day')
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
                WHERE m.town_id = g.town_id AND m.action_type = g.action_type AND m.model = g.model
                    AND m."timestamp" >= g.day AND m."timestamp" < date(g.day, '+1 day')
            )
        )
    ) AS p95_latency_ms
FROM grouped AS g
