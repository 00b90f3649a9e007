-- action_metrics_daily: one row per UTC day x town x action type x model.
-- Money comes from action_metrics_priced, so every action is priced at its own timestamp;
-- cost_usd sums priced actions only and unpriced_count says how many had no price.
-- Percentiles interpolate linearly between closest ranks (percentile_cont).
CREATE VIEW action_metrics_daily AS
SELECT
    CAST("timestamp" AT TIME ZONE 'UTC' AS date) AS day,
    town_id,
    action_type,
    model,
    COUNT(*) AS count,
    CAST(SUM(tokens_in) AS bigint) AS tokens_in,
    CAST(SUM(tokens_out) AS bigint) AS tokens_out,
    CAST(SUM(credits_charged) AS bigint) AS credits_charged,
    COALESCE(SUM(cost_usd), 0) AS cost_usd,
    COALESCE(SUM(revenue_usd), 0) AS revenue_usd,
    COUNT(*) FILTER (WHERE NOT priced) AS unpriced_count,
    AVG(latency_ms) AS avg_latency_ms,
    percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) AS p50_latency_ms,
    percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) AS p95_latency_ms
FROM action_metrics_priced
GROUP BY 1, 2, 3, 4
