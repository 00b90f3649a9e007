-- model_price_periods: each model price with the instant it stopped being in force.
-- A price is in force from effective_from until the next effective_from of the same model;
-- effective_until is NULL for the price in force now. cache_read_per_1m and cache_write_per_1m are
-- the prices of input tokens read from and written to the prompt cache (NULL: input_per_1m). The same text serves SQLite and PostgreSQL.
CREATE VIEW model_price_periods AS
SELECT
    model,
    effective_from,
    LEAD(effective_from) OVER (PARTITION BY model ORDER BY effective_from) AS effective_until,
    input_per_1m,
    output_per_1m,
    cache_read_per_1m,
    cache_write_per_1m
FROM model_prices
