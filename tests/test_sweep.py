"""Hydra multiruns end to end: tiny sweeps finish, keep going past failed jobs and end in a
report; wandb groups a sweep's runs; the Optuna sweeper searches the learning rate."""

import json
import os
import subprocess
import sys

import pytest
from support import REPO, TINY

pytestmark = pytest.mark.slow

FAST = [o for o in TINY if not o.startswith(("trainer.max_steps", "trainer.val_check"))] + [
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "ngram.order=2",
]


def multirun(sweep_dir, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "scripts/train.py", "-m", *FAST, *args, f"hydra.sweep.dir={sweep_dir}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_sweep_goes_past_a_failed_job_and_reports(tmp_path):
    sweep = tmp_path / "sweep"
    # num_heads=3 does not divide d_model=32: those two jobs fail before training
    out = multirun(
        sweep,
        "model/mixer=softmax,linear",
        "model.num_heads=4,3",
        "logger=wandb",
        "+callbacks=layer_bench",
        "callbacks.layer_bench.seq_lens=[16,32]",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    finished = [p for p in jobs if (p / "results.json").is_file()]
    failed = [p for p in jobs if (p / "error.json").is_file()]
    assert len(finished) == 2 and len(failed) == 2
    error = json.loads((failed[0] / "error.json").read_text())
    assert "num_heads" in error["message"] and error["type"] == "ValueError"

    report = (sweep / "report.md").read_text()
    assert "4 runs: 2 finished, 2 failed or unfinished." in report
    for label in ("num_heads=4 mixer=softmax", "num_heads=4 mixer=linear"):
        assert f"| {label} |" in report
    assert "| num_heads=3 mixer=softmax | " in report and "| failed | ValueError:" in report
    assert "KN2 n-gram baseline" in report
    for plot in ("val_loss.png", "throughput.png"):
        assert (sweep / plot).stat().st_size > 0
    bench = json.loads((finished[0] / "bench.json").read_text())
    assert [row["T"] for row in bench["layer"]] == [16, 32]

    # one wandb group per sweep: the sweep dir, recorded in each offline run
    group = str(sweep).strip("/").replace("/", "_").encode()
    for job in finished:
        run_files = list((job / "wandb").glob("offline-run-*/run-*.wandb"))
        assert run_files and group in run_files[0].read_bytes()


def test_optuna_sweeper_searches_the_learning_rate(tmp_path):
    pytest.importorskip(
        "hydra_plugins.hydra_optuna_sweeper", reason="needs pip install -e .[sweep] (in .[dev])"
    )
    sweep = tmp_path / "optuna"
    out = multirun(
        sweep,
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.seed=0",
        "optim.optimizer.lr=tag(log, interval(1e-4, 1e-2))",
        "logger=csv",
        "ngram.enabled=false",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    best = (sweep / "optimization_results.yaml").read_text()
    assert "best_params" in best and "optim.optimizer.lr" in best
    results = [json.loads((sweep / str(i) / "results.json").read_text()) for i in (0, 1)]
    lrs = [r["config"]["optim"]["optimizer"]["lr"] for r in results]
    assert lrs[0] != lrs[1] and all(1e-4 <= lr <= 1e-2 for lr in lrs)
    assert (sweep / "report.md").is_file()
