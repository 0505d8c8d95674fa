"""The tables of scripts/bench.py and scripts/bench_mixers.py, from the figures lmkit.run.bench
measured (no config is read here)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table

MIXER_COLUMNS = ("mixer", "params", "MFLOPs / token", "ms / step", "tokens / s", "GFLOP/s", "MFU")


def train_table(figures: dict, label: str, batch_size: int, block_size: int) -> Table:
    """ms/step, tokens/s, GFLOP/s and MFU of each path (lightning, bare)."""
    table = Table(
        title=f"training {label}, {figures['params']:,} params, B={batch_size} "
        f"T={block_size}, {figures['precision']}" + (", compiled" if figures["compile"] else "")
    )
    for col in ("path", "ms / step", "tokens / s", "GFLOP/s", f"MFU ({figures['mfu_basis']} peak)"):
        table.add_column(col, justify="right")
    for name in ("lightning", "bare"):
        if name in figures:
            run = figures[name]
            table.add_row(
                name,
                f"{run['ms_per_step']:.1f}",
                f"{run['tokens_per_s']:,.0f}",
                f"{run['flops_per_s'] / 1e9:,.1f}",
                f"{100 * run['mfu']:.1f}%",
            )
    return table


def print_train(
    console: Console, figures: dict, label: str, batch_size: int, block_size: int, n_shapes: int
) -> None:
    """The training table, FLOPs per token, matmul peaks, peak memory and Lightning / bare."""
    console.print(train_table(figures, label, batch_size, block_size))
    flops = figures["flops_per_token"]
    console.print(
        f"model FLOPs per token: {flops['train'] / 1e6:,.2f} M (training; forward "
        f"{flops['forward'] / 1e6:,.2f} M: mixers {flops['mixer'] / 1e6:,.2f} M, MLPs "
        f"{flops['mlp'] / 1e6:,.2f} M, head {flops['head'] / 1e6:,.2f} M"
        + (f", resampling {flops['resample'] / 1e6:,.2f} M" if "resample" in flops else "")
        + ")"
    )
    for name, peak in figures["matmul_peak"].items():
        m, k, n = peak["shape"]
        console.print(
            f"matmul peak {name}: {peak['flops_per_s'] / 1e9:,.1f} GFLOP/s "
            f"(best of the model's {n_shapes} GEMM shapes: {m}x{k} @ {k}x{n})"
        )
    console.print(
        f"peak memory of the bench process (all paths and rounds): {figures['peak_mb']:,.0f} MiB"
    )
    if "lightning_over_bare" in figures:
        pairs = figures["lightning_over_bare_rounds"]
        console.print(
            f"[bold]Lightning / bare throughput: {figures['lightning_over_bare']:.3f}[/] (fastest "
            f"run of each path; per round: median {statistics.median(pairs):.3f}, "
            f"{min(pairs):.3f}-{max(pairs):.3f} over {len(pairs)} rounds)"
        )


def print_layer(
    console: Console, rows: list[dict], label: str, d_model: int, precision: str
) -> None:
    """One mixer layer's ms, ms per 1k tokens and peak memory at each T."""
    table = Table(title=f"one {label} layer, d_model={d_model}, forward+backward, {precision}")
    for col in ("T", "ms", "ms / 1k tokens", "peak MiB"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["T"]), f"{r['ms']:.1f}", f"{1e3 * r['ms'] / r['T']:.2f}", f"{r['peak_mb']:.1f}"
        )
    console.print(table)


def print_profile(console: Console, figures: dict, label: str) -> None:
    """The layer's operators by self time, and the share of its matmuls."""
    table = Table(
        title=f"{label}: one layer, forward + backward at T={figures['seq_len']}, "
        f"{figures['ms']:.1f} ms; matmuls {100 * figures['matmul_share']:.0f}%"
    )
    for col in ("operator", "ms", "share"):
        table.add_column(col, justify="left" if col == "operator" else "right")
    for op in figures["top_ops"]:
        table.add_row(op["op"], f"{op['ms']:.2f}", f"{100 * op['share']:.0f}%")
    console.print(table)


def print_decode(console: Console, rows: list[dict], label: str) -> None:
    """ms per generated token at each cache fill."""
    table = Table(title=f"decoding with {label} caches, batch 1")
    table.add_column("position", justify="right")
    table.add_column("ms / token", justify="right")
    for r in rows:
        table.add_row(str(r["position"]), f"{r['ms_per_token']:.2f}")
    console.print(table)


def mixer_row(mixer: str, f: dict) -> list[str]:
    """One mixer's train figures (a saved bench.json's "train") as table cells."""
    cells = [
        mixer,
        f"{f['params']:,}",
        f"{f['flops_per_token']['train'] / 1e6:,.1f}",
        f"{f['ms_per_step']:.1f}",
        f"{f['tokens_per_s']:,.0f}",
        f"{f['lightning']['flops_per_s'] / 1e9:,.1f}",
        f"{100 * f['mfu']:.1f}%",
    ]
    if "lightning_over_bare" in f:
        cells.append(f"{f['lightning_over_bare']:.3f}")
    return cells


def mixer_columns(figures: dict[str, dict]) -> list[str]:
    first = next(iter(figures.values()))
    return list(MIXER_COLUMNS) + (["Lightning / bare"] if "lightning_over_bare" in first else [])


def print_mixers(console: Console, figures: dict[str, dict]) -> None:
    """The train figures of every mixer (name -> figures) in one table."""
    first = next(iter(figures.values()))
    table = Table(
        title=f"training throughput per mixer ({first['precision']}, MFU against the "
        f"{first['mfu_basis']} matmul peak)"
    )
    for col in mixer_columns(figures):
        table.add_column(col, justify="left" if col == "mixer" else "right")
    for mixer, f in figures.items():
        table.add_row(*mixer_row(mixer, f))
    console.print(table)


def write_mixers(out: Path, figures: dict[str, dict]) -> None:
    """The mixers' table as markdown in out, and their figures as JSON beside it (.json)."""
    columns = mixer_columns(figures)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(mixer_row(m, f)) + " |" for m, f in figures.items()]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(figures, indent=2))
