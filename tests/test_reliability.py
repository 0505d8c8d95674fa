"""A run survives SIGKILL and SIGTERM and continues exactly; DDP on CPU; safetensors export."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from support import REPO

from lmkit.run.checkpoint import export_safetensors, load_checkpoint

pytestmark = pytest.mark.slow

# fp32, no dropout, checkpoints every 5 steps, loss logged every step.
RUN = [
    "model.d_model=32",
    "model.num_layers=2",
    "data.block_size=32",
    "data.batch_size=8",
    "trainer.precision=32-true",
    "trainer.accelerator=cpu",
    "trainer.log_every_n_steps=1",
    "trainer.limit_val_batches=2",
    "trainer.enable_model_summary=false",
    "logger=csv",
    "ngram.enabled=false",
    "checkpoint.every_n_train_steps=5",
    "optim.warmup_steps=5",
]


def train_cmd(run_dir, *extra):
    return [sys.executable, "scripts/train.py", *RUN, f"hydra.run.dir={run_dir}", *extra]


def run(cmd, timeout=600, **env):
    return subprocess.run(
        cmd,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
    )


def saved_step(path) -> int:
    try:
        return int(load_checkpoint(path)["global_step"])
    except (FileNotFoundError, ValueError, KeyError):
        return -1  # not there yet (an atomic write never leaves a torn file to read)


def wait_for_checkpoint(proc, path, min_step, timeout=300):
    start = time.time()
    while saved_step(path) < min_step:
        assert proc.poll() is None, f"the run ended early with status {proc.returncode}"
        assert time.time() - start < timeout, "no checkpoint in time"
        time.sleep(0.2)


def losses(csv_path) -> dict[int, str]:
    import csv

    with open(csv_path) as f:
        return {int(r["step"]): r["train/loss"] for r in csv.DictReader(f) if r.get("train/loss")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    out = run(train_cmd(run_dir, "trainer.max_steps=40", "trainer.val_check_interval=20"))
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


def assert_same_weights(a, b):
    sa, sb = load_checkpoint(a)["state_dict"], load_checkpoint(b)["state_dict"]
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_sigkill_then_resume_is_bit_exact(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    # the run kills itself with SIGKILL after step 17 (checkpoints every 5 steps: the last is 15)
    killer = [sys.executable, str(REPO / "tests" / "sigkill_at_step.py"), "17"]
    cmd = train_cmd(run_dir, "trainer.max_steps=40", "trainer.val_check_interval=20")
    out = run(killer + cmd[2:])
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    killed_at = saved_step(last)
    assert killed_at == 15
    out = run(
        train_cmd(run_dir, "trainer.max_steps=40", "trainer.val_check_interval=20", "resume=true")
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert saved_step(last) == 40
    assert_same_weights(last, uninterrupted / "checkpoints" / "last.ckpt")
    # the loss curve after the resume point is the uninterrupted run's, step for step
    whole = losses(uninterrupted / "metrics.csv")
    resumed = losses(run_dir / f"resumed_from_step{killed_at}" / "metrics.csv")
    assert resumed and all(resumed[s] == whole[s] for s in resumed), (resumed, whole)
    # and the metrics of the first attempt are still there
    assert min(losses(run_dir / "metrics.csv")) < killed_at
    results = json.loads((run_dir / "results.json").read_text())
    reference = json.loads((uninterrupted / "results.json").read_text())
    assert results["val_loss"] == reference["val_loss"]


def test_sigterm_saves_and_exits_cleanly_then_resumes(tmp_path):
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    cmd = train_cmd(run_dir, "trainer.max_steps=2000", "trainer.val_check_interval=1000")
    log = tmp_path / "output.txt"  # a file, not a pipe: a full pipe would block the run
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        wait_for_checkpoint(proc, last, min_step=5)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    output = log.read_text()
    assert proc.returncode == 0, output[-3000:]
    assert "Traceback" not in output
    assert "received SIGTERM" in output and "stopped at step" in output
    stopped = saved_step(last)
    assert 5 <= stopped < 2000
    assert not (run_dir / "results.json").exists()  # no final evaluation of a partial run
    # a new run in the same dir is refused rather than overwriting the checkpoint
    refused = run(train_cmd(run_dir, "trainer.max_steps=2000", "trainer.val_check_interval=1000"))
    assert refused.returncode == 2 and "already holds" in refused.stderr
    assert saved_step(last) == stopped


def test_resume_refuses_a_checkpoint_of_another_model(uninterrupted, tmp_path):
    ckpt = uninterrupted / "checkpoints" / "last.ckpt"
    out = run(
        train_cmd(tmp_path / "run", "trainer.max_steps=40", "model.d_model=64", f"ckpt_path={ckpt}")
    )
    assert out.returncode == 2
    assert "model.d_model: 32 in the checkpoint vs 64 now" in out.stderr


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    out = run(train_cmd(tmp_path / "run", "resume=true"))
    assert out.returncode == 2 and "resume=true but" in out.stderr


def test_safetensors_export_matches_the_checkpoint(uninterrupted, tmp_path):
    from safetensors import safe_open

    ckpt = uninterrupted / "checkpoints" / "last.ckpt"
    out = export_safetensors(ckpt, tmp_path / "model.safetensors")
    state = load_checkpoint(ckpt)["state_dict"]
    with safe_open(str(out), framework="pt") as f:
        assert "config" in f.metadata() and "tokenizer" in f.metadata()
        for key in f.keys():
            assert torch.equal(f.get_tensor(key), state[f"model.{key}"]), key


def test_ddp_two_cpu_processes(tmp_path):
    run_dir = tmp_path / "run"
    out = run(
        train_cmd(
            run_dir,
            "trainer=ddp",
            "trainer.devices=2",
            "trainer.accelerator=cpu",
            "trainer.max_steps=10",
            "trainer.val_check_interval=10",
        )
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    per_rank = results["val_loss_per_rank"]
    assert len(per_rank) == 2 and per_rank[0] == per_rank[1] == pytest.approx(results["val_loss"])
