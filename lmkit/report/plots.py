"""The sweep report's plots: val loss against step and time, per-word perplexity, layer
throughput against T, MQAR accuracy against width."""

from __future__ import annotations

from pathlib import Path

from lmkit.report.runs import Run, baseline_of, is_mqar, val_curves, word_baseline_of

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


