"""scripts/lm_eval.py: a checkpoint or exported folder through lm-evaluation-harness's tasks."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lmkit.errors import MissingExtraError
from lmkit.run.checkpoint import Restored, restore
from lmkit.run.rolling_eval import MIXED, check_precision_name, evaluation_device, model_context
from lmkit.run.runtime import apply_runtime_settings, resolve_precision

_MISSING = ""  # why lm_eval did not import, when it did not
try:  # the optional `eval` extra
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    from lmkit.harness.adapter import LMKitLM
except ModuleNotFoundError as err:  # reported when scripts/lm_eval.py runs
    if (err.name or "").split(".")[0] != "lm_eval":
        raise
    lm_eval = None
    _MISSING = str(err)

log = logging.getLogger(__name__)


def harness_model(restored: Restored, *, stride, batch_size: int, precision: str | None, seed: int):
    """The lm-eval adapter around a restored model, at the context it was trained with."""
    cfg = restored.config
    precision = resolve_precision(precision or cfg.trainer.precision, cfg)
    check_precision_name(precision)
    return LMKitLM(
        restored.model.to(evaluation_device(cfg.trainer.accelerator)),
        restored.tokenizer,
        max_length=model_context(restored),
        stride=stride,
        batch_size=batch_size,
        autocast_dtype=MIXED.get(precision),
        seed=seed,
    )


def run_harness(cfg: DictConfig) -> dict:
    """lm_eval.simple_evaluate with cfg's tasks on cfg.ckpt; the results (and cfg.output)."""
    if lm_eval is None:
        raise MissingExtraError(
            f"scripts/lm_eval.py needs lm-evaluation-harness ({_MISSING or 'not installed'}); "
            "install it with "
            'pip install -e ".[eval]"'
        )
    tasks = _task_list(cfg.tasks)
    manager = TaskManager(include_path=cfg.include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(
            f"unknown lm-eval task(s) {unknown}; list them with `lm_eval ls tasks`, or give "
            "include_path=<folder of task YAMLs> for your own"
        )
    restored = restore(cfg.ckpt)
    apply_runtime_settings(restored.config)
    model = harness_model(
        restored,
        stride=cfg.stride,
        batch_size=cfg.batch_size,
        precision=cfg.precision,
        seed=cfg.seed,
    )
    results = lm_eval.simple_evaluate(
        model=model,
        tasks=tasks,
        num_fewshot=cfg.num_fewshot,
        limit=cfg.limit,
        task_manager=manager,
        bootstrap_iters=cfg.bootstrap_iters,
        log_samples=False,
        random_seed=cfg.seed,
        numpy_random_seed=cfg.seed,
        torch_random_seed=cfg.seed,
        fewshot_random_seed=cfg.seed,
    )
    log.info("\n%s", make_table(results))
    if cfg.output:
        Path(cfg.output).write_text(json.dumps(results, indent=2, default=str))
    return {
        "ckpt": str(cfg.ckpt),
        "stride": model.stride,
        "context": model.max_length,
        "results": results["results"],
    }


def _task_list(tasks) -> list[str]:
    if isinstance(tasks, str):
        return [t.strip() for t in tasks.split(",") if t.strip()]
    return [str(t) for t in OmegaConf.to_container(tasks)] if tasks is not None else []
