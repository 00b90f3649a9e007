-- "What was the average LOD3 latency today?" (today = the current UTC day)
-- Timestamps are stored as UTC text, so comparing with date('now') selects today's actions.
SELECT
    COUNT(*) AS count,
    AVG(latency_ms) AS avg_latency_ms,
    MAX(latency_ms) AS max_latency_ms
FROM action_metrics
WHERE action_type = 'lod3'
  AND "timestamp" >= date('now');
