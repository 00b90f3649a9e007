-- "Margin per town per local day, Berlin time": the hourly view's UTC hours, each put on the day it
-- falls on in Europe/Berlin. Berlin's offset is a whole number of hours, so every UTC hour lies inside
-- one local day, and the 23- and 25-hour days of the clock changes come out right by themselves.
-- In a zone whose offset is not whole hours (Asia/Kolkata, Asia/Kathmandu, America/St_Johns) an hour
-- straddles two local days: group action_metrics_priced's "timestamp" instead, or use the library's
-- breakdown(("town_id",), bucket="day", tz=...), which does both exactly.
-- Add `WHERE hour >= now() - interval '30 days'` to keep a window; unpriced_count > 0 means some cost
-- is unknown and the margin is overstated.
SELECT
    town_id,
    CAST(hour AT TIME ZONE 'Europe/Berlin' AS date) AS local_day,
    SUM(count) AS count,
    SUM(revenue_usd) AS revenue_usd,
    SUM(cost_usd) AS cost_usd,
    SUM(revenue_usd) - SUM(cost_usd) AS profit_usd,
    (SUM(revenue_usd) - SUM(cost_usd)) / NULLIF(SUM(revenue_usd), 0) AS gross_margin,
    SUM(unpriced_count) AS unpriced_count
FROM action_metrics_hourly
GROUP BY town_id, local_day
ORDER BY local_day, town_id;
