-- "What's the gross margin for LOD4 this week?" (the last 7 days)
-- Each action is priced at its own timestamp by the action_metrics_priced view.
-- unpriced_count > 0 means some cost is unknown and the margin is overstated.
SELECT
    COUNT(*) AS count,
    SUM(revenue_usd) AS revenue_usd,
    COALESCE(SUM(cost_usd), 0) AS cost_usd,
    (SUM(revenue_usd) - COALESCE(SUM(cost_usd), 0)) / NULLIF(SUM(revenue_usd), 0) AS gross_margin,
    AVG(margin) AS avg_margin,
    COUNT(*) FILTER (WHERE NOT priced) AS unpriced_count
FROM action_metrics_priced
WHERE action_type = 'lod4'
  AND "timestamp" >= now() - interval '7 days';
