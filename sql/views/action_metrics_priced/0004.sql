-- action_metrics_priced: every action with its cost, revenue and margin, each at the price in force
-- at the action's own timestamp. The same text serves SQLite and PostgreSQL.
--
--   cost_usd    = ((tokens_in - cache_read_tokens - cache_write_tokens) * input_per_1m
--                  + cache_read_tokens * cache_read_per_1m + cache_write_tokens * cache_write_per_1m
--                  + tokens_out * output_per_1m) / 1e6 (a missing cache price is the input price), NULL
--                 when the model had no price at that time (unpriced: never a silent $0)
--   revenue_usd = credits_charged * usd_per_credit in force at that time
--   margin      = (revenue_usd - cost_usd) / revenue_usd when revenue_usd > 0 and the action is priced
--   priced      = whether the model had a price at that time
--   input_per_1m, output_per_1m, cache_read_per_1m, cache_write_per_1m, usd_per_credit = the prices
--                 applied (NULL when unpriced)
--
-- The price periods (from effective_from until the next effective_from) come from the views
-- model_price_periods and credit_price_periods, which dashboards can also read on their own.
CREATE VIEW action_metrics_priced AS
WITH priced_actions AS (
    SELECT
        m.id,
        m."timestamp",
        m.action_type,
        m.user_id,
        m.town_id,
        m.citizen_id,
        m.model,
        m.tokens_in,
        m.tokens_out,
        m.latency_ms,
        m.credits_charged,
        m.metadata,
        m.cache_read_tokens,
        m.cache_write_tokens,
        m.reasoning_tokens,
        m.error,
        ((m.tokens_in - m.cache_read_tokens - m.cache_write_tokens) * p.input_per_1m
        + m.cache_read_tokens * COALESCE(p.cache_read_per_1m, p.input_per_1m)
        + m.cache_write_tokens * COALESCE(p.cache_write_per_1m, p.input_per_1m)
        + m.tokens_out * p.output_per_1m) / 1000000.0 AS cost_usd,
        m.credits_charged * c.usd_per_credit AS revenue_usd,
        p.model IS NOT NULL AS priced,
        p.input_per_1m,
        p.output_per_1m,
        p.cache_read_per_1m,
        p.cache_write_per_1m,
        c.usd_per_credit
    FROM action_metrics AS m
    LEFT JOIN model_price_periods AS p
        ON p.model = m.model
        AND m."timestamp" >= p.effective_from
        AND (p.effective_until IS NULL OR m."timestamp" < p.effective_until)
    LEFT JOIN credit_price_periods AS c
        ON m."timestamp" >= c.effective_from
        AND (c.effective_until IS NULL OR m."timestamp" < c.effective_until)
)
SELECT
    id,
    "timestamp",
    action_type,
    user_id,
    town_id,
    citizen_id,
    model,
    tokens_in,
    tokens_out,
    latency_ms,
    credits_charged,
    metadata,
    cache_read_tokens,
    cache_write_tokens,
    reasoning_tokens,
    error,
    cost_usd,
    revenue_usd,
    CASE
        WHEN revenue_usd > 0 AND cost_usd IS NOT NULL THEN (revenue_usd - cost_usd) / revenue_usd
    END AS margin,
    priced,
    input_per_1m,
    output_per_1m,
    cache_read_per_1m,
    cache_write_per_1m,
    usd_per_credit
FROM priced_actions
