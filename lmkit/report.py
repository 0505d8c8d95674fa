"""A sweep directory -> report.md and PNG plots comparing its runs.

A sweep dir (Hydra multirun) holds one folder per job. Each job folder has Hydra's
``.hydra/overrides.yaml`` and ``.hydra/hydra.yaml`` (the job's overrides and group choices) and,
written by lmkit: ``results.json`` (a finished run), ``error.json`` (a run that raised),
``metrics.csv`` (the CSV logger's rows) and ``bench.json`` (per-layer costs against T, when the
run measured them). A folder with neither results nor error is reported as unfinished.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPORT_NAME = "report.md"


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


def _fmt(value: Any, digits: int = 2) -> str:
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


def results_table(runs: list[Run]) -> list[str]:
    """Markdown rows: one per finished run, then the n-gram baseline row. An MQAR sweep shows
    answer accuracy instead of perplexity and bits per byte (its tokens are not text)."""
    ok = [run for run in runs if run.status == "ok"]
    text = not all(is_mqar(run) for run in ok)
    has_test = any("test_loss" in run.results for run in ok)
    has_acc = any("val_acc" in run.results for run in ok)
    has_words = any("val_word_ppl" in run.results for run in ok)

    def pct(value: float | None) -> str:
        return _fmt(100 * value if value is not None else None, 1)

    # (header, cell of a run's results, cell of the baseline row)
    columns = [("params", lambda r: _fmt(r.get("params")), "-")]
    if text:
        columns += [
            ("val loss (nats/token)", lambda r: _fmt(r.get("val_loss"), 4), "loss"),
            ("val ppl", lambda r: _fmt(r.get("val_ppl")), "ppl"),
        ]
        columns += [("test ppl", lambda r: _fmt(r.get("test_ppl")), "test_ppl")] if has_test else []
        columns += [("val bpb (bits/byte)", lambda r: _fmt(r.get("val_bpb"), 3), "bpb")]
        if has_words:  # per word, whatever the tokenizer: comparable with word-level models
            columns += [("val ppl per word", lambda r: _fmt(r.get("val_word_ppl")), "word_ppl")]
    else:
        columns += [
            ("val loss (nats/answer)", lambda r: _fmt(r.get("val_loss"), 4), "-"),
            ("val acc on answers (%)", lambda r: pct(r.get("val_acc")), "-"),
            ("test acc on answers (%)", lambda r: pct(r.get("test_acc")), "-"),
        ]
    columns += [
        ("tokens/s", lambda r: _fmt(r.get("tokens_per_s")), "-"),
        ("peak mem (MiB)", lambda r: _fmt(r.get("peak_mem_mb"), 0), "-"),
        ("wall (s)", lambda r: _fmt(r.get("wall_s"), 0), "-"),
    ]
    if text and has_acc:
        columns += [("val acc (%)", lambda r: pct(r.get("val_acc")), "-")]

    header = ["run", "mixer", *(name for name, _, _ in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in ok:
        cells = [run.label, run.mixer, *(cell(run.results) for _, cell, _ in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    baseline = baseline_of(runs)
    if baseline and text:
        val, test = baseline.get("val") or {}, baseline.get("test") or {}
        figures = {
            "loss": _fmt(val.get("loss"), 4),
            "ppl": _fmt(val.get("ppl")),
            "test_ppl": _fmt(test.get("ppl")),
            "bpb": _fmt(val.get("bpb"), 3),
            "word_ppl": _fmt(val.get("word_ppl")),
        }
        cells = [f"KN{baseline['order']} n-gram baseline", "-"]
        cells += [figures.get(key, "-") for _, _, key in columns]
        lines.append("| " + " | ".join(cells) + " |")
    words = word_baseline_of(runs)
    if words and text and has_words:
        # its tokens are words (<unk> for those train lacks): only the per-word column compares
        figures = {"word_ppl": _fmt((words.get("val") or {}).get("ppl"))}
        cells = [f"KN{words['order']} word-level n-gram", "-"]
        cells += [figures.get(key, "-") for _, _, key in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# ---- the plots -------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def val_curves(run: Run) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """(step, val loss) of every validation, and (seconds since training began, val loss) of
    those during training (the evaluation after fit has no training clock)."""
    rows = [m for m in run.metrics if "val/loss" in m]
    by_step = [(m["step"], m["val/loss"]) for m in rows]
    by_time = [(m["val/elapsed_s"], m["val/loss"]) for m in rows if "val/elapsed_s" in m]
    return by_step, by_time


def plot_val_loss(runs: list[Run], path: Path) -> bool:
    """Val loss against step and against wall time, one line per run, baseline dashed."""
    curves = [(run, *val_curves(run)) for run in runs if run.status == "ok"]
    curves = [c for c in curves if c[1]]
    if not curves:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for run, by_step, by_time in curves:
        (line,) = axes[0].plot(
            *zip(*by_step, strict=True), marker="o", markersize=3, label=run.label
        )
        if by_time:
            axes[1].plot(
                *zip(*by_time, strict=True), marker="o", markersize=3, color=line.get_color()
            )
    baseline = baseline_of(runs)
    if baseline and "val" in baseline:
        for ax in axes:
            ax.axhline(baseline["val"]["loss"], color="black", linestyle="--", linewidth=1)
        axes[0].plot([], [], color="black", linestyle="--", label=f"KN{baseline['order']} n-gram")
    axes[0].set_xlabel("training step")
    axes[1].set_xlabel("wall time since the start of training (s)")
    axes[0].set_ylabel("val loss (nats/token)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    _save(plt, fig, path)
    return True


def _timed_word_ppl(row: dict[str, float]) -> bool:
    return "val/word_ppl" in row and "val/elapsed_s" in row


def plot_word_ppl(runs: list[Run], path: Path) -> bool:
    """Val perplexity per word against wall time, with the n-gram on the run's tokens (dashed)
    and the word-level n-gram (dotted): drawn when a run fitted the word-level baseline."""
    words = word_baseline_of(runs)
    curves = [
        (run, [(m["val/elapsed_s"], m["val/word_ppl"]) for m in run.metrics if _timed_word_ppl(m)])
        for run in runs
        if run.status == "ok"
    ]
    curves = [(run, points) for run, points in curves if points]
    if words is None or not curves:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run, points in curves:
        ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=run.label)
    baseline = baseline_of(runs)
    if baseline and "word_ppl" in (baseline.get("val") or {}):
        ax.axhline(baseline["val"]["word_ppl"], color="black", linestyle="--", linewidth=1)
        ax.plot(
            [],
            [],
            color="black",
            linestyle="--",
            label=f"KN{baseline['order']} n-gram, same tokens",
        )
    ax.axhline(words["val"]["ppl"], color="black", linestyle=":", linewidth=1.5)
    ax.plot([], [], color="black", linestyle=":", label=f"KN{words['order']} word-level n-gram")
    ax.set_yscale("log")
    ax.set_xlabel("wall time since the start of training (s)")
    ax.set_ylabel("val perplexity per word")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(plt, fig, path)
    return True


def plot_throughput(runs: list[Run], path: Path) -> bool:
    """One mixer layer's forward+backward tokens/s against sequence length (bench.json)."""
    benched = [run for run in runs if run.bench]
    if not benched:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for run in benched:
        seq = [row["T"] for row in run.bench]
        tps = [row["batch_size"] * row["T"] / (row["ms"] / 1e3) for row in run.bench]
        ax.plot(seq, tps, marker="o", label=run.label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T (tokens)")
    ax.set_ylabel("tokens/s, one layer, forward+backward")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(plt, fig, path)
    return True


def plot_accuracy_vs_width(runs: list[Run], path: Path) -> bool:
    """MQAR: best val accuracy over the other swept options, against d_model, per mixer."""
    best: dict[str, dict[int, float]] = {}
    for run in runs:
        if not is_mqar(run):
            continue
        acc = (run.results or {}).get("val_acc")
        width = (run.config.get("model") or {}).get("d_model")
        if acc is None or width is None:
            continue
        per_width = best.setdefault(run.mixer, {})
        per_width[width] = max(acc, per_width.get(width, 0.0))
    if not best:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for mixer, per_width in sorted(best.items()):
        widths = sorted(per_width)
        ax.plot(widths, [100 * per_width[w] for w in widths], marker="o", label=mixer)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("model width d_model")
    ax.set_ylabel("val accuracy on answers (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(plt, fig, path)
    return True


# ---- the report ------------------------------------------------------------------------------


def write_report(sweep_dir: str | Path) -> Path:
    """Write report.md and its PNGs into sweep_dir; return the report's path."""
    sweep_dir = Path(sweep_dir)
    runs = collect_runs(sweep_dir)
    if not runs:
        raise FileNotFoundError(
            f"{sweep_dir} holds no runs (folders with .hydra/, results.json or error.json); "
            "give the dir of a multirun, e.g. multirun/2026-11-29/12-00-00"
        )
    ok = [r for r in runs if r.status == "ok"]
    lines = [f"# Sweep report: {sweep_dir}", ""]
    lines += [f"{len(runs)} runs: {len(ok)} finished, {len(runs) - len(ok)} failed or unfinished."]
    lines += ["", "## Results", ""]
    if ok:
        lines += results_table(runs)
        measures = (
            "Loss and accuracy count the answer positions only (MQAR); chance accuracy is "
            "1/(vocab/2)."
            if all(is_mqar(run) for run in ok)
            else "Loss and perplexity are per token of the run's tokenizer; bits per byte "
            "compare across tokenizers."
        )
        lines += [
            "",
            f"{measures} tokens/s is the median training step; peak memory is the process's "
            "peak resident set (CPU) or peak allocated memory (CUDA); wall time covers the whole "
            "run including evaluation.",
        ]
    else:
        lines += ["No run finished."]
    plots = [
        (
            "val_loss.png",
            plot_val_loss,
            "Val loss against training step (left) and wall time "
            "(right) per run; the dashed line is the n-gram baseline on the same val tokens.",
        ),
        (
            "word_ppl.png",
            plot_word_ppl,
            "Val perplexity per word (total NLL / words) against wall time; dashed: the "
            "n-gram on the runs' tokens, dotted: the word-level n-gram (words absent from "
            "train as <unk>).",
        ),
        (
            "throughput.png",
            plot_throughput,
            "Training throughput of one mixer layer "
            "(forward + backward, tokens/s) against sequence length, from each run's bench.json.",
        ),
        (
            "accuracy_vs_width.png",
            plot_accuracy_vs_width,
            "MQAR val accuracy on the answer "
            "positions against model width, per mixer (best over the other swept options).",
        ),
    ]
    drawn = [(name, caption) for name, plot, caption in plots if plot(runs, sweep_dir / name)]
    if drawn:
        lines += ["", "## Plots", ""]
        for name, caption in drawn:
            lines += [f"![{name}]({name})", "", f"*{caption}*", ""]
    failed = [r for r in runs if r.status != "ok"]
    if failed:
        lines += ["", "## Runs that did not finish", ""]
        lines += ["| run | folder | status | error |", "|---|---|---|---|"]
        for run in failed:
            error = run.error or {}
            message = (
                f"{error.get('type', '')}: {error.get('message', '')}"
                if error
                else ("no results.json or error.json (still running, killed or interrupted)")
            )
            message = message.replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {run.label} | {run.path.name} | {run.status} | {message} |")
    report = sweep_dir / REPORT_NAME
    report.write_text("\n".join(lines).rstrip() + "\n")
    return report
