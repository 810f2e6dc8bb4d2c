"""kdexp.logging: metrics.jsonl always; W&B failures never end a run."""

from __future__ import annotations

import json
import logging

from kdexp.logging import RunLogger


class BrokenRun:
    """A W&B run whose service is gone (what SLURM's SIGTERM does to wandb-core)."""

    def __init__(self):
        self.calls = 0
        self.summary = {}

    def log(self, *args, **kwargs):
        self.calls += 1
        raise ConnectionResetError("Connection lost")

    def finish(self):
        raise AssertionError("finish must not be called on a run that failed")


def test_a_failing_wandb_run_is_dropped_and_metrics_go_on(tmp_path, caplog):
    run = BrokenRun()
    logger = RunLogger(tmp_path, run)
    with caplog.at_level(logging.WARNING, logger="kdexp.logging"):
        logger.log({"train/loss": 1.0}, step=1)
        logger.log({"train/loss": 0.5}, step=2)
        logger.summary({"test/rougeL": 3.0})
        logger.finish()
    assert run.calls == 1  # tried once, then W&B is off for the rest of the run
    assert sum("W&B logging failed (ConnectionResetError" in r.message for r in caplog.records) == 1
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/loss"]) for r in rows] == [(1, 1.0), (2, 0.5)]
