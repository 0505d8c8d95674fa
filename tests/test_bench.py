"""The benchmark helpers run and return sane figures (timings are printed, not tested)."""

import functools
import json
import os
import subprocess
import sys

import pytest
import torch
from support import REPO, compose_config

from lmkit.mixers.softmax import SoftmaxAttention
from lmkit.model.decoder import DecoderLM
from lmkit.model.embeddings import Embedding
from lmkit.run.bench import bare_step_timings, lightning_step_timings
from lmkit.run.layer_profile import layer_profile
from lmkit.run.timing import decode_timings, gemm_shapes, layer_costs, matmul_peak, step_figures


def tiny_model() -> DecoderLM:
    return DecoderLM(
        20,
        d_model=16,
        num_layers=1,
        num_heads=2,
        mixer=functools.partial(SoftmaxAttention, num_heads=2),
        embedding=functools.partial(Embedding, positional="rope"),
    )


def run_script(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """A script of the repo in a fresh one-thread process, its output captured."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_lightning_path_and_bare_loop_train_the_same_run(tmp_path):
    """The bare loop is the Lightning path without the framework: same batches, optimizer,
    schedule and clipping give the same weights after the same steps."""
    cfg = compose_config("ngram.enabled=false", run_dir=tmp_path)
    lightning = lightning_step_timings(cfg, steps=3, warmup=1)
    bare = bare_step_timings(cfg, steps=3, warmup=1)
    for figures in (lightning, bare):
        assert figures["ms_per_step"] > 0 and figures["tokens_per_s"] > 0
    a, b = lightning["model"].state_dict(), bare["model"].state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_step_figures_take_the_median_interval_after_warmup():
    figures = step_figures([0.0, 5.0, 6.0, 7.0, 9.0], warmup=1, tokens_per_step=100)
    assert figures == {"ms_per_step": 1000.0, "tokens_per_s": 100.0}  # intervals 1, 1, 2
    with pytest.raises(ValueError, match="need warmup"):
        step_figures([0.0, 1.0], warmup=1, tokens_per_step=1)


def test_matmul_peak_over_the_model_shapes():
    shapes = gemm_shapes(tiny_model(), rows=64)
    assert (64, 16, 48) in shapes and (64, 16, 20) in shapes  # qkv and the LM head
    peak = matmul_peak(shapes, torch.float32, seconds=0.01)
    assert peak["flops_per_s"] > 0 and peak["shape"] in shapes


def test_decode_timings_reach_each_position():
    rows = decode_timings(tiny_model(), [5, 30], steps=3)
    assert [r["position"] for r in rows] == [5, 30] and all(r["ms_per_token"] > 0 for r in rows)


class _Elementwise(torch.nn.Module):
    def forward(self, x):
        return (x.exp() * x.sin()).tanh() + x.cos()


class _Matmuls(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.a, self.b = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(self, x):
        return self.b(self.a(x))


def test_layer_profile_splits_matmuls_from_the_rest():
    """A layer of matmuls is mostly matmul time; an elementwise layer has none; the operators
    listed are the largest and their times add up to no more than the total."""
    options = dict(d_model=64, seq_len=256, batch_size=2, repeats=2, precision="32-true", top=4)
    matmuls = layer_profile(lambda: _Matmuls(64), **options)
    elementwise = layer_profile(_Elementwise, **options)
    assert matmuls["matmul_share"] > 0.5, matmuls
    assert elementwise["matmul_share"] == 0.0
    for figures in (matmuls, elementwise):
        times = [op["ms"] for op in figures["top_ops"]]
        assert times == sorted(times, reverse=True) and len(times) == 4
        assert 0 < sum(times) <= figures["ms"] + 1e-9


def test_layer_costs_in_a_fresh_process():
    make = functools.partial(SoftmaxAttention, 16, num_heads=2, backend="tiled", tile_size=8)
    (row,) = layer_costs(make, [32], d_model=16, repeats=1)
    assert row["T"] == 32 and row["ms"] > 0 and row["peak_mb"] >= 0


def test_bench_script_saves_its_figures(tmp_path):
    out = tmp_path / "bench.json"
    done = run_script(
        [
            "scripts/bench.py",
            "bench.what=[train,layer,profile]",
            "bench.steps=2",
            "bench.bare=true",
            "bench.warmup=1",
            "bench.peak_seconds=0.01",
            "bench.seq_lens=[16,32]",
            "bench.profile_seq_len=24",
            "bench.layer_repeats=2",
            "model.d_model=32",
            "model.num_layers=1",
            "data.block_size=16",
            "data.batch_size=2",
            "trainer.precision=32-true",
            f"bench.save={out}",
        ]
    )
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert [row["T"] for row in figures["layer"]] == [16, 32]
    assert figures["layer"][0]["batch_size"] == 1 and figures["layer"][0]["ms"] > 0
    assert figures["profile"]["seq_len"] == 24 and 0 <= figures["profile"]["matmul_share"] <= 1
    train = figures["train"]
    assert train["tokens_per_s"] > 0 and figures["label"].startswith("SoftmaxAttention")
    assert train["precision"] == "32-true" and train["flops_per_token"]["train"] > 0
    assert 0 < train["mfu"] and train["lightning_over_bare"] > 0  # bench.bare: the plain loop ran
    assert len(train["lightning_over_bare_rounds"]) == 2  # bench.rounds: one pair per round
    assert train["matmul_peak"]["fp32"]["flops_per_s"] > 0 and "bf16" in train["matmul_peak"]
    assert "Lightning / bare throughput" in done.stdout


@pytest.mark.slow
def test_bench_runs_for_every_mixer(tmp_path):
    """scripts/bench_mixers.py: bench.py bench.steps=5 bench.bare=true for every mixer preset,
    one table; its own keys (out=) stay out of the bench.py runs, the other overrides go in."""
    out = tmp_path / "mixers.md"
    done = run_script(
        [
            "scripts/bench_mixers.py",
            f"out={out}",
            "bench.steps=5",
            "bench.bare=true",
            "bench.warmup=1",
            "bench.peak_seconds=0.01",
            "model.d_model=32",
            "model.num_layers=1",
            "data.block_size=32",
            "data.batch_size=2",
            "trainer.precision=32-true",
        ],
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.with_suffix(".json").read_text())
    presets = sorted(p.stem for p in (REPO / "conf" / "model" / "mixer").glob("*.yaml"))
    assert sorted(figures) == presets
    for mixer, f in figures.items():
        assert f["tokens_per_s"] > 0 and f["mfu"] > 0 and f["lightning_over_bare"] > 0, mixer
    table = out.read_text()
    assert all(f"| {mixer} |" in table for mixer in presets)


def test_bench_mixers_refuses_an_unknown_mixer():
    done = run_script(["scripts/bench_mixers.py", "mixers=[softmax,nope]"])
    assert done.returncode == 2 and "unknown mixers ['nope']" in done.stderr


def test_bench_mixers_runs_the_chosen_mixers_with_the_other_overrides(tmp_path):
    """mixers= and out= are bench_mixers.py's own keys (bench.py would refuse them); every other
    override reaches each bench.py run (bench.bare=true: the Lightning / bare column)."""
    out = tmp_path / "mixers.md"
    done = run_script(
        [
            "scripts/bench_mixers.py",
            "mixers=[softmax]",
            f"out={out}",
            "bench.steps=2",
            "bench.warmup=1",
            "bench.rounds=1",
            "bench.bare=true",
            "bench.peak_seconds=0.01",
            "model.d_model=32",
            "model.num_layers=1",
            "data.block_size=16",
            "data.batch_size=2",
            "trainer.precision=32-true",
        ]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.with_suffix(".json").read_text())
    assert list(figures) == ["softmax"] and figures["softmax"]["lightning_over_bare"] > 0
    assert len(figures["softmax"]["lightning_over_bare_rounds"]) == 1  # bench.rounds=1 went in
    assert "| softmax |" in out.read_text() and "Lightning / bare" in out.read_text()
