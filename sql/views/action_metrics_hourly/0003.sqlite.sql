-- action_metrics_hourly: one row per UTC hour x town x action type x model, from the rollups.
--
-- Closed hours come from the hourly rollup rows, the newest, still open hour from the raw rows
-- (action_metrics_priced); action_metrics_rollup_state says where they meet. Columns and formulas
-- are those of action_metrics_daily, per hour (the column `hour` is the hour's start):
--   cost_usd       = SUM((tokens_in * input_per_1m + tokens_out * output_per_1m) / 1e6) over priced rows
--   revenue_usd    = SUM(credits_charged * usd_per_credit)
--   unpriced_count = actions whose model had no price at the time (they add no cost)
-- Timestamps are UTC text ('YYYY-MM-DD HH:MM:SS.ffffff'), so the day and hour are prefixes of it.
-- p50/p95_latency_ms are exact over the group's raw rows, computed only when selected, NULL once
-- pruned.
CREATE VIEW action_metrics_hourly AS
WITH state AS (
    SELECT hours_closed_until FROM action_metrics_rollup_state
),
parts AS (
    SELECT
        substr(r.start, 1, 13) || ':00:00.000000' AS hour,
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
    WHERE r.grain = 'hour' AND r.town_id <> '' AND r.action_type <> ''
        AND r.start < s.hours_closed_until
    UNION ALL
    SELECT
        substr(m."timestamp", 1, 13) || ':00:00.000000',
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
        hour,
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
    GROUP BY hour, town_id, action_type, model
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
                WHERE m.town_id = g.town_id AND m.action_type = g.action_type AND m.model = g.model
                    AND m."timestamp" >= g.hour AND m."timestamp" < strftime('%Y-%m-%d %H:%M:%f', g.hour, '+1 hour')
            )
        )
    ) AS p95_latency_ms
FROM grouped AS g
