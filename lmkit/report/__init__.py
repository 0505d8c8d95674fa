"""A sweep directory -> report.md and PNG plots comparing its runs.

A sweep dir (Hydra multirun) holds one folder per job. Each job folder has Hydra's
``.hydra/overrides.yaml`` and ``.hydra/hydra.yaml`` (the job's overrides and group choices) and,
written by lmkit: ``results.json`` (a finished run), ``error.json`` (a run that raised),
``metrics.csv`` (the CSV logger's rows) and ``bench.json`` (per-layer costs against T, when the
run measured them). A folder with neither results nor error is reported as unfinished.
"""

from __future__ import annotations

from pathlib import Path

from lmkit.report.plots import (
    plot_accuracy_vs_width,
    plot_throughput,
    plot_val_loss,
    plot_word_ppl,
)
from lmkit.report.runs import (
    Run,
    baseline_of,
    collect_runs,
    fmt,
    is_mqar,
    val_curves,
    word_baseline_of,
)

__all__ = ["Run", "collect_runs", "results_table", "val_curves", "write_report"]

REPORT_NAME = "report.md"


def results_table(runs: list[Run]) -> list[str]:
    """Markdown rows: one per finished run, then the n-gram baseline row. An MQAR sweep shows
    answer accuracy instead of perplexity and bits per byte (its tokens are not text)."""
    ok = [run for run in runs if run.status == "ok"]
    text = not all(is_mqar(run) for run in ok)
    has_test = any("test_loss" in run.results for run in ok)
    has_acc = any("val_acc" in run.results for run in ok)
    has_words = any("val_word_ppl" in run.results for run in ok)

    def pct(value: float | None) -> str:
        return fmt(100 * value if value is not None else None, 1)

    # (header, cell of a run's results, cell of the baseline row)
    columns = [("params", lambda r: fmt(r.get("params")), "-")]
    if text:
        columns += [
            ("val loss (nats/token)", lambda r: fmt(r.get("val_loss"), 4), "loss"),
            ("val ppl", lambda r: fmt(r.get("val_ppl")), "ppl"),
        ]
        columns += [("test ppl", lambda r: fmt(r.get("test_ppl")), "test_ppl")] if has_test else []
        columns += [("val bpb (bits/byte)", lambda r: fmt(r.get("val_bpb"), 3), "bpb")]
        if has_words:  # per word, whatever the tokenizer: comparable with word-level models
            columns += [("val ppl per word", lambda r: fmt(r.get("val_word_ppl")), "word_ppl")]
    else:
        columns += [
            ("val loss (nats/answer)", lambda r: fmt(r.get("val_loss"), 4), "-"),
            ("val acc on answers (%)", lambda r: pct(r.get("val_acc")), "-"),
            ("test acc on answers (%)", lambda r: pct(r.get("test_acc")), "-"),
        ]
    columns += [
        ("tokens/s", lambda r: fmt(r.get("tokens_per_s")), "-"),
        ("peak mem (MiB)", lambda r: fmt(r.get("peak_mem_mb"), 0), "-"),
        ("wall (s)", lambda r: fmt(r.get("wall_s"), 0), "-"),
    ]
    if text and has_acc:
        columns += [("val acc (%)", lambda r: pct(r.get("val_acc")), "-")]

    header = ["run", "mixer", *(name for name, _, _ in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in ok:
        cells = [run.label, run.mixer, *(cell(run.results) for _, cell, _ in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + baseline_rows(runs, columns, text=text, has_words=has_words)


def baseline_rows(runs: list[Run], columns: list, *, text: bool, has_words: bool) -> list[str]:
    """The n-gram baseline's row (and the word-level n-gram's, where runs report per-word
    perplexity), its figures under the columns they compare with."""
    lines = []
    baseline = baseline_of(runs)
    if baseline and text:
        val, test = baseline.get("val") or {}, baseline.get("test") or {}
        figures = {
            "loss": fmt(val.get("loss"), 4),
            "ppl": fmt(val.get("ppl")),
            "test_ppl": fmt(test.get("ppl")),
            "bpb": fmt(val.get("bpb"), 3),
            "word_ppl": fmt(val.get("word_ppl")),
        }
        cells = [f"KN{baseline['order']} n-gram baseline", "-"]
        cells += [figures.get(key, "-") for _, _, key in columns]
        lines.append("| " + " | ".join(cells) + " |")
    words = word_baseline_of(runs)
    if words and text and has_words:
        # its tokens are words (<unk> for those train lacks): only the per-word column compares
        figures = {"word_ppl": fmt((words.get("val") or {}).get("ppl"))}
        cells = [f"KN{words['order']} word-level n-gram", "-"]
        cells += [figures.get(key, "-") for _, _, key in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# ---- the report ------------------------------------------------------------------------------


PLOTS = [
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
    lines += results_section(runs) if ok else ["No run finished."]
    lines += plots_section(runs, sweep_dir)
    lines += failures_section(runs)
    report = sweep_dir / REPORT_NAME
    report.write_text("\n".join(lines).rstrip() + "\n")
    return report


def results_section(runs: list[Run]) -> list[str]:
    ok = [r for r in runs if r.status == "ok"]
    measures = (
        "Loss and accuracy count the answer positions only (MQAR); chance accuracy is "
        "1/(vocab/2)."
        if all(is_mqar(run) for run in ok)
        else "Loss and perplexity are per token of the run's tokenizer; bits per byte "
        "compare across tokenizers."
    )
    return results_table(runs) + [
        "",
        f"{measures} tokens/s is the median training step; peak memory is the process's "
        "peak resident set (CPU) or peak allocated memory (CUDA); wall time covers the whole "
        "run including evaluation.",
    ]


def plots_section(runs: list[Run], sweep_dir: Path) -> list[str]:
    drawn = [(name, caption) for name, plot, caption in PLOTS if plot(runs, sweep_dir / name)]
    lines = ["", "## Plots", ""] if drawn else []
    for name, caption in drawn:
        lines += [f"![{name}]({name})", "", f"*{caption}*", ""]
    return lines


def failures_section(runs: list[Run]) -> list[str]:
    failed = [r for r in runs if r.status != "ok"]
    if not failed:
        return []
    lines = ["", "## Runs that did not finish", ""]
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
    return lines
