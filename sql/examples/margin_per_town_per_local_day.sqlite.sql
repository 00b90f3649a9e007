-- "Margin per town per local day, Berlin time", from the hourly view's UTC hours. SQLite knows no time
-- zones, so the offset is written out: Berlin keeps the EU rule (since 1996), UTC+2 from 01:00 UTC on
-- the last Sunday of March (the Sunday on or after 25 March) to 01:00 UTC on the last Sunday of
-- October, UTC+1 otherwise. Right for Berlin (and Paris, Rome, Madrid...) only: another zone needs its
-- own rule, and a fixed '+N hours' is right only between two changes of the clocks. Berlin's offset is
-- whole hours, so every UTC hour lies inside one local day (the 23- and 25-hour days included); for
-- half- or quarter-hour zones (Asia/Kolkata, Asia/Kathmandu) an hour straddles two days: use the
-- library's breakdown(("town_id",), bucket="day", tz=...), which knows every IANA zone.
-- unpriced_count > 0 means some cost is unknown and the margin is overstated.
WITH local AS (
    SELECT
        h.*,
        date(h.hour, CASE
            WHEN h.hour >= date(substr(h.hour, 1, 4) || '-03-25', 'weekday 0') || ' 01:00:00'
             AND h.hour < date(substr(h.hour, 1, 4) || '-10-25', 'weekday 0') || ' 01:00:00'
            THEN '+2 hours' ELSE '+1 hours' END) AS local_day
    FROM action_metrics_hourly AS h
)
SELECT
    town_id,
    local_day,
    SUM(count) AS count,
    SUM(revenue_usd) AS revenue_usd,
    SUM(cost_usd) AS cost_usd,
    SUM(revenue_usd) - SUM(cost_usd) AS profit_usd,
    (SUM(revenue_usd) - SUM(cost_usd)) / NULLIF(SUM(revenue_usd), 0) AS gross_margin,
    SUM(unpriced_count) AS unpriced_count
FROM local
GROUP BY town_id, local_day
ORDER BY local_day, town_id;
