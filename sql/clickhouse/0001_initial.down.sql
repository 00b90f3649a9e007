-- Down from version 1 to no schema: every action and price goes. Idempotent.

DROP TABLE IF EXISTS credit_prices;

DROP TABLE IF EXISTS model_prices;

DROP TABLE IF EXISTS action_metrics;
