-- credit_price_periods: each credit price with the instant it stopped being in force.
-- A price is in force from effective_from until the next effective_from; effective_until is NULL
-- for the price in force now. The same text serves SQLite and PostgreSQL.
CREATE VIEW credit_price_periods AS
SELECT
    effective_from,
    LEAD(effective_from) OVER (ORDER BY effective_from) AS effective_until,
    usd_per_credit
FROM credit_prices
