-- "Which model is being used most?" (all time; add WHERE town_id = '...' for one town)
SELECT
    model,
    COUNT(*) AS count,
    SUM(tokens_in + tokens_out) AS total_tokens,
    COALESCE(SUM(cost_usd), 0) AS cost_usd,
    COUNT(*) FILTER (WHERE NOT priced) AS unpriced_count
FROM action_metrics_priced
GROUP BY model
ORDER BY count DESC, model;
