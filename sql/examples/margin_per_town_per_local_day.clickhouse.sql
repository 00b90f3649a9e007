-- "Margin per town per local day, Berlin time", on ClickHouse (clickhouse-client, Grafana's ClickHouse
-- data source, or clickhouse-connect). There are no views on ClickHouse, and its rollups are per UTC
-- hour (which Kathmandu's days cut): this reads the actions, each priced by the prices in force at its timestamp (ASOF JOIN), and puts it on the day it
-- falls on in Europe/Berlin, so the 23- and 25-hour days of the clock changes, and zones whose offset
-- is not whole hours (put 'Asia/Kathmandu' in both places), come out right.
-- FINAL: an action sent twice counts once. Money: Decimal, the division by 1e6 once per group.
-- Add `WHERE s.timestamp >= now() - INTERVAL 30 DAY` to keep a window; unpriced_count > 0 means some
-- cost is unknown and the margin is overstated.
SELECT
    town_id,
    local_day,
    count() AS count,
    sum(revenue) AS revenue_usd,
    sum(cost_e6) / 1000000 AS cost_usd,
    sum(revenue) - sum(cost_e6) / 1000000 AS profit_usd,
    if(sum(revenue) > 0, toFloat64(sum(revenue) - sum(cost_e6) / 1000000) / toFloat64(sum(revenue)), NULL)
        AS gross_margin,
    countIf(cost_e6 IS NULL) AS unpriced_count
FROM
(
    SELECT
        s.town_id AS town_id,
        toDate(s.timestamp, 'Europe/Berlin') AS local_day,
        -- USD x 1e6: uncached input, cache reads and writes, output, each at its price.
        toDecimal128(s.tokens_in - s.cache_read_tokens - s.cache_write_tokens, 0) * p.input_per_1m
            + toDecimal128(s.cache_read_tokens, 0) * coalesce(p.cache_read_per_1m, p.input_per_1m)
            + toDecimal128(s.cache_write_tokens, 0) * coalesce(p.cache_write_per_1m, p.input_per_1m)
            + toDecimal128(s.tokens_out, 0) * p.output_per_1m AS cost_e6,
        toDecimal128(s.credits_charged, 0) * coalesce(c.usd_per_credit, toDecimal128(0, 9)) AS revenue
    FROM (SELECT *, toUInt8(1) AS one FROM action_metrics FINAL) AS s
    ASOF LEFT JOIN (SELECT * FROM model_prices FINAL) AS p
        ON s.model = p.model AND s.timestamp >= p.effective_from
    ASOF LEFT JOIN (SELECT toUInt8(1) AS one, effective_from, usd_per_credit FROM credit_prices FINAL) AS c
        ON s.one = c.one AND s.timestamp >= c.effective_from
)
GROUP BY town_id, local_day
ORDER BY local_day, town_id
-- An action whose model has no price in force must find no price (NULL), not zeros.
SETTINGS join_use_nulls = 1
