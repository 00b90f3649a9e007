-- action_metrics_daily: one row per UTC day x town x action type x model.
-- Money comes from action_metrics_priced, so every action is priced at its own timestamp;
-- cost_usd sums priced actions only and unpriced_count says how many had no price.
--
-- SQLite has no percentile_cont, so it is written out with window functions, giving the same
-- numbers as PostgreSQL: for a fraction f of n latencies ranked 0..n-1, position = (n - 1) * f,
-- value = v[floor(position)] + (position - floor(position)) * (v[floor(position) + 1] - v[floor(position)]).
-- Timestamps are stored as UTC text ('YYYY-MM-DD HH:MM:SS.ffffff'), so date() is the UTC day.
CREATE VIEW action_metrics_daily AS
WITH ranked AS (
    SELECT
        date("timestamp") AS day,
        town_id,
        action_type,
        model,
        tokens_in,
        tokens_out,
        credits_charged,
        cost_usd,
        revenue_usd,
        priced,
        latency_ms,
        ROW_NUMBER() OVER (
            PARTITION BY date("timestamp"), town_id, action_type, model ORDER BY latency_ms
        ) - 1 AS latency_rank,
        COUNT(*) OVER (PARTITION BY date("timestamp"), town_id, action_type, model) AS n
    FROM action_metrics_priced
),
percentile_positions AS (
    SELECT
        *,
        (n - 1) * 0.5 AS p50_position,
        CAST((n - 1) * 0.5 AS INTEGER) AS p50_rank,
        (n - 1) * 0.95 AS p95_position,
        CAST((n - 1) * 0.95 AS INTEGER) AS p95_rank
    FROM ranked
),
grouped AS (
    SELECT
        day,
        town_id,
        action_type,
        model,
        COUNT(*) AS count,
        SUM(tokens_in) AS tokens_in,
        SUM(tokens_out) AS tokens_out,
        SUM(credits_charged) AS credits_charged,
        COALESCE(SUM(cost_usd), 0) AS cost_usd,
        COALESCE(SUM(revenue_usd), 0) AS revenue_usd,
        COUNT(*) FILTER (WHERE NOT priced) AS unpriced_count,
        AVG(latency_ms) AS avg_latency_ms,
        MAX(p50_position - p50_rank) AS p50_weight,
        MAX(CASE WHEN latency_rank = p50_rank THEN latency_ms END) AS p50_low,
        MAX(CASE WHEN latency_rank = p50_rank + 1 THEN latency_ms END) AS p50_high,
        MAX(p95_position - p95_rank) AS p95_weight,
        MAX(CASE WHEN latency_rank = p95_rank THEN latency_ms END) AS p95_low,
        MAX(CASE WHEN latency_rank = p95_rank + 1 THEN latency_ms END) AS p95_high
    FROM percentile_positions
    GROUP BY day, town_id, action_type, model
)
SELECT
    day,
    town_id,
    action_type,
    model,
    count,
    tokens_in,
    tokens_out,
    credits_charged,
    cost_usd,
    revenue_usd,
    unpriced_count,
    avg_latency_ms,
    p50_low + p50_weight * (COALESCE(p50_high, p50_low) - p50_low) AS p50_latency_ms,
    p95_low + p95_weight * (COALESCE(p95_high, p95_low) - p95_low) AS p95_latency_ms
FROM grouped
