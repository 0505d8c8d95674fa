"""Hydra multirun support: keep a sweep going past a failed job, and report at its end.

In a multirun, a job that raises writes ``error.json`` into its folder and returns None, so the
other jobs still run (Hydra's basic sweeper would otherwise stop at the end of the batch and skip
its end-of-sweep callbacks) and the report lists the failure with its message. An Optuna trial
that returns None is marked failed by the Optuna sweeper.
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from lmkit.report import write_report
from lmkit.run.cli import error_message

log = logging.getLogger(__name__)


def is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_group() -> str | None:
    """The wandb group of this job: its sweep dir (one group per sweep); None outside one."""
    if not is_multirun():
        return None
    return str(HydraConfig.get().sweep.dir).strip("/").replace("/", "_")


def run_sweep_job(fn: Callable[[DictConfig], Any], cfg: DictConfig, job_dir: Path) -> Any:
    """fn(cfg); on an exception write job_dir/error.json and return None (the sweep goes on)."""
    try:
        return fn(cfg)
    except Exception as err:  # noqa: BLE001 - any failure of one job is recorded, not fatal
        message = error_message(err)
        record = {
            "type": type(err).__name__,
            "message": message,
            "traceback": traceback.format_exc(),
        }
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / "error.json").write_text(json.dumps(record, indent=2))
        log.error("job %s failed: %s: %s (see error.json)", job_dir, record["type"], message)
        return None


class SweepReport(Callback):
    """At the end of a multirun, write report.md and the plots into the sweep dir."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            report = write_report(sweep_dir)
        except Exception as err:  # noqa: BLE001 - a report problem must not hide the runs
            log.error("no sweep report for %s: %s", sweep_dir, err)
            return
        log.info("sweep report: %s", report)
