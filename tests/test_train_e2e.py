"""End to end on real text: scripts/train.py, then evaluate.py and generate.py on its checkpoint."""

import json
import math
import os
import subprocess
import sys

import pytest
from support import REPO, TINY

pytestmark = pytest.mark.slow


def run_script(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run(
        [sys.executable, f"scripts/{script}", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("e2e") / "run"
    overrides = [
        o
        for o in TINY
        if not o.startswith(
            ("trainer.max_steps", "trainer.precision", "trainer.limit_val", "trainer.val_check")
        )
    ]
    out = run_script(
        "train.py",
        *overrides,
        "model.d_model=64",
        "data.block_size=64",
        "data.batch_size=16",
        "optim.optimizer.lr=3e-3",
        "optim.warmup_steps=20",
        "trainer.max_steps=150",
        "trainer.val_check_interval=75",
        "trainer.precision=bf16-mixed",
        "logger=wandb",
        f"hydra.run.dir={run_dir}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir, json.loads((run_dir / "results.json").read_text())


def test_training_lowers_val_loss_well_below_uniform(trained_run):
    _, results = trained_run
    uniform = math.log(65)  # Tiny Shakespeare has 65 characters
    assert results["val_loss"] < 0.7 * uniform, results["val_loss"]
    assert math.isclose(results["val_ppl"], math.exp(results["val_loss"]), rel_tol=1e-4)
    # characters are single bytes here, so bits per byte = nats per char / ln 2
    assert math.isclose(results["val_bpb"], results["val_loss"] / math.log(2), rel_tol=1e-4)
    for key in ("params", "tokens_per_s", "wall_s", "peak_mem_mb", "config"):
        assert results[key], key
    assert "test_loss" not in results  # Tiny Shakespeare has no test split


def test_run_dir_has_checkpoints_metrics_and_config(trained_run):
    run_dir, _ = trained_run
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    header = (run_dir / "metrics.csv").read_text().splitlines()[0]
    for metric in ("train/loss", "val/loss", "val/ppl", "val/bpb", "lr", "tokens_per_s"):
        assert metric in header, metric


def test_wandb_writes_an_offline_run_that_sync_can_upload(trained_run):
    run_dir, _ = trained_run  # no API key here, so the run must be offline files
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb")), sorted(run_dir.rglob("*"))


def test_evaluate_reproduces_the_logged_val_loss(trained_run):
    run_dir, results = trained_run
    out = run_script("evaluate.py", f"ckpt={run_dir}/checkpoints/last.ckpt", "split=val")
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads(out.stdout[out.stdout.index("{") :])
    assert math.isclose(metrics["loss"], results["val_loss"], rel_tol=1e-6)
    assert math.isclose(metrics["bpb"], results["val_bpb"], rel_tol=1e-6)


def test_generate_produces_text(trained_run):
    run_dir, _ = trained_run
    out = run_script(
        "generate.py",
        f"ckpt={run_dir}/checkpoints/last.ckpt",
        "prompt=ROMEO:",
        "max_new_tokens=80",
        "num_samples=2",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    samples = out.stdout.split("--- sample 1 ---")
    assert len(samples) == 2 and all(s.strip().count("ROMEO:") >= 1 for s in samples)
    assert len(samples[1].strip()) >= 80  # prompt + 80 new characters
