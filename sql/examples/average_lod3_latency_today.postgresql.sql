-- "What was the average LOD3 latency today?" (today = the current UTC day)
-- The count and average are over every action, as in the views; the percentiles describe the
-- successful ones (a timeout's 30 s is not the p95 a user waits for), as aggregate()'s do.
-- It reads action_metrics_priced (every column of action_metrics), which a dashboard role granted
-- the views can read; the raw table is the writers'.
SELECT
    COUNT(*) AS count,
    AVG(latency_ms) AS avg_latency_ms,
    MAX(latency_ms) AS max_latency_ms,
    percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) FILTER (WHERE error IS NULL) AS p50_latency_ms,
    percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) FILTER (WHERE error IS NULL) AS p95_latency_ms
FROM action_metrics_priced
WHERE action_type = 'lod3'
  AND "timestamp" >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
