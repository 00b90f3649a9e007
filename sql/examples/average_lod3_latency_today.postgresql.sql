-- "What was the average LOD3 latency today?" (today = the current UTC day)
SELECT
    COUNT(*) AS count,
    AVG(latency_ms) AS avg_latency_ms,
    MAX(latency_ms) AS max_latency_ms,
    percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) AS p50_latency_ms,
    percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) AS p95_latency_ms
FROM action_metrics
WHERE action_type = 'lod3'
  AND "timestamp" >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
