"""The benchmark helpers run and return sane figures (timings are printed, not tested)."""

import functools

from lmkit.bench import decode_timings, layer_costs, train_step_timings
from lmkit.mixers.softmax import SoftmaxAttention
from lmkit.model.decoder import DecoderLM
from lmkit.model.embeddings import Embedding


def tiny_model() -> DecoderLM:
    return DecoderLM(
        20,
        d_model=16,
        num_layers=1,
        num_heads=2,
        mixer=functools.partial(SoftmaxAttention, num_heads=2),
        embedding=functools.partial(Embedding, positional="rope"),
    )


def test_train_step_timings():
    figures = train_step_timings(
        tiny_model(), batch_size=2, block_size=8, steps=2, warmup=1, precision="bf16-mixed"
    )
    assert figures["ms_per_step"] > 0 and figures["tokens_per_s"] > 0


def test_decode_timings_reach_each_position():
    rows = decode_timings(tiny_model(), [5, 30], steps=3)
    assert [r["position"] for r in rows] == [5, 30] and all(r["ms_per_token"] > 0 for r in rows)


def test_layer_costs_in_a_fresh_process():
    make = functools.partial(SoftmaxAttention, 16, num_heads=2, backend="tiled", tile_size=8)
    (row,) = layer_costs(make, [32], d_model=16, repeats=1)
    assert row["T"] == 32 and row["ms"] > 0 and row["peak_mb"] >= 0


def test_bench_script_saves_its_figures(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from support import REPO

    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            "scripts/bench.py",
            "bench.what=[train,layer]",
            "bench.steps=2",
            "bench.warmup=1",
            "bench.seq_lens=[16,32]",
            "bench.layer_repeats=2",
            "model.d_model=32",
            "model.num_layers=1",
            "data.block_size=16",
            "data.batch_size=2",
            "trainer.precision=32-true",
            f"bench.save={out}",
        ],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert [row["T"] for row in figures["layer"]] == [16, 32]
    assert figures["layer"][0]["batch_size"] == 1 and figures["layer"][0]["ms"] > 0
    assert figures["train"]["tokens_per_s"] > 0 and figures["label"].startswith("SoftmaxAttention")
