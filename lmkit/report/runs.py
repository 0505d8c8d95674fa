"""The runs of a sweep dir: each job folder's results, error, metrics and overrides."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class Run:
    """One job of a sweep, read back from its folder."""

    path: Path
    overrides: list[str] = field(default_factory=list)
    choices: dict[str, str] = field(default_factory=dict)
    results: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    metrics: list[dict[str, float]] = field(default_factory=list)
    bench: list[dict[str, Any]] = field(default_factory=list)
    label: str = ""

    @property
    def status(self) -> str:
        if self.results is not None:
            return "ok"
        return "failed" if self.error is not None else "unfinished"

    @property
    def mixer(self) -> str:
        return self.choices.get("model/mixer", "?")

    @property
    def config(self) -> dict[str, Any]:
        return (self.results or {}).get("config") or {}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_metrics(folder: Path) -> list[dict[str, float]]:
    """Rows of every metrics.csv under the job folder (a resumed run adds one per attempt),
    as floats, empty cells dropped, sorted by step."""
    rows = []
    for path in sorted(folder.glob("**/metrics.csv")):
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                parsed = {}
                for key, value in row.items():
                    try:
                        parsed[key] = float(value)
                    except (TypeError, ValueError):
                        continue
                rows.append(parsed)
    return sorted(rows, key=lambda r: r.get("step", 0.0))


def read_run(folder: Path) -> Run:
    hydra_dir = folder / ".hydra"
    overrides, choices = [], {}
    if (hydra_dir / "overrides.yaml").is_file():
        overrides = yaml.safe_load((hydra_dir / "overrides.yaml").read_text()) or []
    if (hydra_dir / "hydra.yaml").is_file():
        hydra_cfg = yaml.safe_load((hydra_dir / "hydra.yaml").read_text()) or {}
        choices = ((hydra_cfg.get("hydra") or {}).get("runtime") or {}).get("choices") or {}
    bench = _read_json(folder / "bench.json") or {}
    return Run(
        path=folder,
        overrides=[str(o) for o in overrides],
        choices={k: str(v) for k, v in choices.items()},
        results=_read_json(folder / "results.json"),
        error=_read_json(folder / "error.json"),
        metrics=_read_metrics(folder),
        bench=list(bench.get("layer", [])),
    )


def collect_runs(sweep_dir: str | Path) -> list[Run]:
    """The jobs of a sweep dir, in job order, each labelled by the overrides that differ."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep dir {sweep_dir} does not exist")
    folders = [
        p
        for p in sweep_dir.iterdir()
        if p.is_dir()
        and any((p / name).exists() for name in (".hydra", "results.json", "error.json"))
    ]
    folders.sort(key=lambda p: (0, int(p.name)) if p.name.isdigit() else (1, p.name))
    runs = [read_run(p) for p in folders]
    _label(runs)
    return runs


def _short_key(key: str) -> str:
    """The last name of a key: model/mixer -> mixer, model.d_model -> d_model; the whole key
    where the last name starts with '_' (matplotlib hides legend labels that do)."""
    last = key.replace("/", ".").rsplit(".", 1)[-1]
    return key if last.startswith("_") else last


def _label(runs: list[Run]) -> None:
    """Label each run by the overrides whose values differ between runs (else its folder)."""
    parsed = [dict(o.split("=", 1) for o in r.overrides if "=" in o) for r in runs]
    keys = list(dict.fromkeys(k for p in parsed for k in p))  # in command-line order
    varying = [k for k in keys if len({p.get(k) for p in parsed}) > 1]
    for run, p in zip(runs, parsed, strict=True):
        parts = [f"{_short_key(k)}={p[k]}" for k in varying if k in p]
        run.label = " ".join(parts) if parts else run.path.name


# ---- the table -------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int) or (isinstance(value, float) and abs(value) >= 1000):
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def baseline_of(runs: list[Run]) -> dict[str, Any] | None:
    """The n-gram baseline of the sweep (every run of a sweep shares data and tokenizer)."""
    return next((r.results["baseline"] for r in runs if (r.results or {}).get("baseline")), None)


def word_baseline_of(runs: list[Run]) -> dict[str, Any] | None:
    """The word-level n-gram of the sweep (``ngram.word_level=true``), if a run fitted it."""
    return next(
        (r.results["word_baseline"] for r in runs if (r.results or {}).get("word_baseline")), None
    )


def is_mqar(run: Run) -> bool:
    return str((run.config.get("data") or {}).get("_target_", "")).endswith("MQARDataModule")


def val_curves(run: Run) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """(step, val loss) of every validation, and (seconds since training began, val loss) of
    those during training (the evaluation after fit has no training clock)."""
    rows = [m for m in run.metrics if "val/loss" in m]
    by_step = [(m["step"], m["val/loss"]) for m in rows]
    by_time = [(m["val/elapsed_s"], m["val/loss"]) for m in rows if "val/elapsed_s" in m]
    return by_step, by_time


