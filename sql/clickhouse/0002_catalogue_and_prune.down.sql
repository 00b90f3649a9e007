-- Down from version 2 to 1: the prune cut-offs and the catalogue's tier thresholds go (the
-- catalogue's prices stay, as prices). Idempotent.

DROP TABLE IF EXISTS raw_kept_from;

ALTER TABLE model_prices DROP COLUMN IF EXISTS tiered_above_tokens;
