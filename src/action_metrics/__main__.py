"""`python -m action_metrics` is the `action-metrics` command."""

from action_metrics.cli import main

main(prog_name="action-metrics")
