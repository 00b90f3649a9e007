-- model_price_periods: each model price with the instant it stopped being in force.
-- A price is in force from effective_from until the next effective_from of the same model;
-- effective_until is NULL for the price in force now. The same text serves SQLite and PostgreSQL.
CREATE VIEW model_price_periods AS
SELECT
    model,
    effective_from,
    LEAD(effective_from) OVER (PARTITION BY model ORDER BY effective_from) AS effective_until,
    input_per_1m,
    output_per_1m
FROM model_prices
