-- action-metrics on ClickHouse, schema version 5: the stored ids, kept apart for "first id wins".
--
-- Before each insert the repository asks which of the batch's ids are stored already (the rollups'
-- views see every insert, so a re-sent action must not reach action_metrics). The raw table is
-- ordered for the dashboard (town, action type, hour, id) and ClickHouse orders a UUID by its second
-- half first, so there the lookup read the id column of every row of the batch's hours. Here each
-- action's key as the raw table replaces on it (id, town, action type, toStartOfHour(timestamp)) is
-- ordered by hour, then by the id as a number: UUIDv7 ids (the default) sort by the millisecond they
-- were minted, so a batch's ids fall in one narrow range and the primary index reads a granule or
-- two per part, whatever the hour holds. A copy of an action here is harmless (a lookup only asks
-- whether the key is there). `db prune` removes what it removes from the raw rows.
-- Upgrading from version 4 creates the view, then fills the table from the raw rows (emptied first,
-- so running it again after an interruption is safe): an action written meanwhile is caught by the
-- view, the fill or both, save an insert in flight across the TRUNCATE: stop the writers to be sure.

CREATE TABLE IF NOT EXISTS action_metrics_ids
(
    hour DateTime('UTC'),
    id UUID,
    town_id String,
    action_type LowCardinality(String)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (hour, toUInt128(id));

CREATE MATERIALIZED VIEW IF NOT EXISTS action_metrics_ids_view TO action_metrics_ids AS
SELECT toStartOfHour(timestamp) AS hour, id, town_id, action_type
FROM action_metrics;

TRUNCATE TABLE IF EXISTS action_metrics_ids;

INSERT INTO action_metrics_ids
SELECT toStartOfHour(timestamp) AS hour, id, town_id, action_type
FROM action_metrics;

-- The lookups read the table above now, not the raw rows' bloom filter on id.
ALTER TABLE action_metrics DROP INDEX IF EXISTS id_index;
