-- action_metrics_latency_bins: the latency each bin of action_metrics_latency_histogram stands for,
-- so that the views turn the rollups' histograms into percentiles in plain SQL, on a SQLite built
-- without its math functions too (no exp() is needed to read them).
--
-- Bin b holds the latencies in (GAMMA^(b-1), GAMMA^b] ms, GAMMA = 1.009 / 0.991, and stands for
-- 0.991 * GAMMA^b (= 2 * GAMMA^b / (GAMMA + 1)), within 0.9% of every latency in it; bin -2147483648
-- holds the latencies of 0 and stands for 0. The rows run from the bin of the smallest positive
-- double (-41356) to that of 1e15 ms, the largest latency the rows' checks allow (1919): every bin a
-- stored latency can fall in. Each value is its neighbour's times (or divided by) GAMMA: within
-- 1e-13 relative of the library's exp(b * ln(GAMMA)) * 0.991 (`sketch.bin_value_of`) for the bin of
-- every normal double, and for a subnormal's (below 2.2e-308 ms) within that or a subnormal's last
-- place (5e-324).
INSERT INTO action_metrics_latency_bins (bin, value_ms)
WITH RECURSIVE
up (bin, value_ms) AS (
    SELECT 0, CAST(0.991 AS DOUBLE PRECISION)
    UNION ALL
    SELECT bin + 1, value_ms * CAST(1.0181634712411705 AS DOUBLE PRECISION) FROM up WHERE bin < 1919
),
-- Downwards the value is carried times 2^600 (4.149515568880993e+180, exact in a double), so that it
-- stays a normal double, whose divisions keep their precision, down to the smallest bin; it is scaled
-- back once at the end (a power of two: exact, but for the one rounding of a subnormal result).
down (bin, scaled) AS (
    SELECT -1, CAST(0.991 AS DOUBLE PRECISION) * CAST(4.149515568880993e+180 AS DOUBLE PRECISION)
        / CAST(1.0181634712411705 AS DOUBLE PRECISION)
    UNION ALL
    SELECT bin - 1, scaled / CAST(1.0181634712411705 AS DOUBLE PRECISION) FROM down WHERE bin > -41356
)
SELECT bin, value_ms FROM up
UNION ALL
SELECT bin, scaled * CAST(2.409919865102884e-181 AS DOUBLE PRECISION) FROM down
UNION ALL
SELECT -2147483648, CAST(0 AS DOUBLE PRECISION)
