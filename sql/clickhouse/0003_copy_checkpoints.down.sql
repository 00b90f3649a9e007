-- Down from version 3 to 2: `db copy` forgets where it got to (a copy run again starts over; the
-- actions already copied count once). Idempotent.

DROP TABLE IF EXISTS copy_checkpoints;
