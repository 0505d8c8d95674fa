"""A run survives SIGKILL and SIGTERM and continues exactly; DDP on CPU; safetensors export."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf
from support import REPO, documents, write_parquet

from lmkit.data.windows import TrainWindows
from lmkit.run.build import build_datamodule, build_task
from lmkit.run.checkpoint import load_checkpoint, restore
from lmkit.run.evaluate import evaluate_checkpoint
from lmkit.run.export import export_folder
from lmkit.task import masked_mean_nll

pytestmark = pytest.mark.slow

# fp32, dropout 0.1 (its masks must continue exactly), checkpoints every 5 steps, loss every step.
RUN = [
    "model.d_model=32",
    "model.dropout=0.1",
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


LENGTH = ["trainer.max_steps=40", "trainer.val_check_interval=20"]
_whole_runs: dict[tuple[str, ...], object] = {}


def whole_run(tmp_path_factory, *extra):
    """The uninterrupted run of these overrides (made once per session)."""
    if extra not in _whole_runs:
        run_dir = tmp_path_factory.mktemp("whole") / "run"
        out = run(train_cmd(run_dir, *LENGTH, *extra))
        assert out.returncode == 0, out.stderr[-3000:]
        _whole_runs[extra] = run_dir
    return _whole_runs[extra]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return whole_run(tmp_path_factory)


def assert_same_weights(a, b):
    sa, sb = load_checkpoint(a)["state_dict"], load_checkpoint(b)["state_dict"]
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# (kill after step, overrides): checkpoints come every 5 steps and at the validation of step 20,
# so 17 resumes from 15 and 23 from 20 (across a validation pass); bf16-mixed and a DataLoader
# worker process must continue as exactly as fp32 in the main process.
KILLS = [
    (17, ()),
    (23, ()),
    (17, ("trainer.precision=bf16-mixed",)),
    (13, ("data.num_workers=1",)),
]


@pytest.mark.parametrize("kill_after, extra", KILLS)
def test_sigkill_then_resume_is_bit_exact(tmp_path_factory, tmp_path, kill_after, extra):
    whole = whole_run(tmp_path_factory, *extra)
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    # the run kills itself with SIGKILL after step kill_after
    killer = [sys.executable, str(REPO / "tests" / "sigkill_at_step.py"), str(kill_after)]
    cmd = train_cmd(run_dir, *LENGTH, *extra)
    out = run(killer + cmd[2:])
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    killed_at = saved_step(last)
    assert killed_at == (20 if kill_after > 20 else kill_after // 5 * 5)
    out = run(train_cmd(run_dir, *LENGTH, *extra, "resume=true"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert saved_step(last) == 40
    assert_same_weights(last, whole / "checkpoints" / "last.ckpt")
    # the loss curve after the resume point is the uninterrupted run's, step for step
    losses_whole = losses(whole / "metrics.csv")
    resumed = losses(run_dir / f"resumed_from_step{killed_at}" / "metrics.csv")
    assert resumed and all(resumed[s] == losses_whole[s] for s in resumed), (resumed, whole)
    # and the metrics of the first attempt are still there
    assert min(losses(run_dir / "metrics.csv")) < killed_at
    results = json.loads((run_dir / "results.json").read_text())
    reference = json.loads((whole / "results.json").read_text())
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
    out = run(train_cmd(tmp_path / "run", *LENGTH, "model.d_model=64", f"ckpt_path={ckpt}"))
    assert out.returncode == 2
    assert "model.d_model: 32 in the checkpoint vs 64 now" in out.stderr
    assert "resume_accept=[model.d_model]" in out.stderr


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    out = run(train_cmd(tmp_path / "run", "resume=true"))
    assert out.returncode == 2 and "resume=true but" in out.stderr


def test_safetensors_export_matches_the_checkpoint(uninterrupted, tmp_path):
    from safetensors import safe_open

    ckpt = uninterrupted / "checkpoints" / "last.ckpt"
    out = export_folder(ckpt, tmp_path / "model") / "model.safetensors"
    state = load_checkpoint(ckpt)["state_dict"]
    with safe_open(str(out), framework="pt") as f:
        for key in f.keys():
            assert torch.equal(f.get_tensor(key), state[f"model.{key}"]), key


def test_ddp_two_cpu_processes(tmp_path):
    """Two gloo ranks on the CPU: gradients are averaged (the ranks' weights stay identical, and
    three DDP steps equal three single-process steps on the union of the ranks' batches) and
    validation is sharded (every val token scored once: the per-word perplexity, reported only
    for a whole split, is there and equals a single-process evaluation)."""
    base = tmp_path / "base"
    out = run(train_cmd(base, "model.dropout=0.0", "trainer.max_steps=2"))
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "ddp"
    ddp = [
        f"init_from={base / 'checkpoints' / 'last.ckpt'}",
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "trainer.limit_val_batches=null",
    ]
    out = run(train_cmd(run_dir, *ddp))
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == 3 and results["config"]["data"]["max_steps"] == 3  # this run's
    checksums = results["weights_checksum_per_rank"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    single = evaluate_checkpoint(str(run_dir / "checkpoints" / "last.ckpt"), "val")
    assert results["val_loss"] == pytest.approx(single["loss"], rel=1e-6)
    assert results["val_word_ppl"] == pytest.approx(single["word_ppl"], rel=1e-6)
    expected = union_steps(base / "checkpoints" / "last.ckpt", run_dir, steps=3, ranks=2)
    trained = restore(run_dir / "checkpoints" / "last.ckpt").model.state_dict()
    for name, weight in expected.items():
        torch.testing.assert_close(trained[name], weight, rtol=1e-4, atol=1e-6, msg=name)


def union_steps(start, run_dir, *, steps: int, ranks: int) -> dict:
    """The DDP run's first `steps` optimizer steps in one process: the model of `start`, every
    step on the concatenation of the ranks' batches (TrainWindows seeded by (seed, step,
    rank)), the run's optimizer, schedule and clipping."""
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    cfg = OmegaConf.create(checkpoint["lmkit"]["config"])
    datamodule = build_datamodule(cfg)
    datamodule.prepare()
    model = restore(start).model.train()
    configured = build_task(cfg, model, datamodule).configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    tokens = datamodule.tokens("train")
    for step in range(steps):
        shape = (cfg.data.block_size, cfg.data.batch_size)
        batches = [
            TrainWindows(tokens, *shape, cfg.seed, r, steps, ranks)[step] for r in range(ranks)
        ]
        x, y = (torch.cat(parts) for parts in zip(*batches, strict=True))
        masked_mean_nll(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.gradient_clip_val)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return model.state_dict()


# ---- DDP and several nodes over a sharded corpus (data=hf) -----------------------------------


@pytest.fixture(scope="module")
def sharded_corpus(tmp_path_factory):
    """A parquet dump of 1,500 documents whose train split prepares into ~10 shards."""
    root = tmp_path_factory.mktemp("dump")
    write_parquet(root, documents(1500, seed=5), parts=3)
    return [
        "data=hf",
        "data.path=parquet",
        f"data.data_files={root}/*.parquet",
        "data.holdout.val=0.05",
        "data.prepare.shard_tokens=12000",
        "tokenizer=char",
        "runtime.threads=1",
    ]


DDP = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]


def train_parts(stderr: str) -> list[tuple[int, int, int]]:
    """(rank, first, last token) of each 'draws its train windows' log line."""
    found = re.findall(
        r"rank (\d) of 2 draws its train windows from tokens \[(\d+), (\d+)\)", stderr
    )
    return sorted({(int(r), int(a), int(b)) for r, a, b in found})


def test_ddp_over_shards_killed_with_sigkill_resumes_exactly(sharded_corpus, tmp_path):
    """Two gloo ranks over ~10 train shards, each drawing from its own half: killed (the whole
    process group, SIGKILL) after a checkpoint, then resumed: the weights at the end equal the
    uninterrupted run's."""
    steps = ["trainer.max_steps=60", "trainer.val_check_interval=30", "ngram.enabled=false"]
    whole = tmp_path / "whole"
    out = run(train_cmd(whole, *sharded_corpus, *DDP, *steps))
    assert out.returncode == 0, out.stderr[-3000:]
    parts = train_parts(out.stdout)
    assert [p[0] for p in parts] == [0, 1] and parts[0][2] <= parts[1][1]  # disjoint halves

    run_dir = tmp_path / "killed"
    last = run_dir / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(
        train_cmd(run_dir, *sharded_corpus, *DDP, *steps),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,  # its own process group: rank 1 dies with rank 0
    )
    try:
        wait_for_checkpoint(proc, last, min_step=10)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = saved_step(last)
    assert 10 <= killed_at < 60, killed_at
    out = run(train_cmd(run_dir, *sharded_corpus, *DDP, *steps, "resume=true"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert saved_step(last) == 60
    assert_same_weights(last, whole / "checkpoints" / "last.ckpt")


def test_two_nodes_on_one_machine_each_read_their_own_shards(sharded_corpus, tmp_path):
    """trainer.num_nodes=2 launched twice (NODE_RANK 0 and 1, rendezvous on localhost, gloo):
    the command of a real cluster. Both train, hold the same weights, read disjoint parts."""
    port = str(29400 + os.getpid() % 500)
    nodes = []
    for node in (0, 1):
        cmd = train_cmd(
            tmp_path / f"node{node}",
            *sharded_corpus,
            "trainer=ddp",
            "trainer.devices=1",
            "trainer.num_nodes=2",
            "trainer.accelerator=cpu",
            "trainer.max_steps=10",
            "trainer.val_check_interval=10",
        )
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
        env.update(MASTER_PORT=port, NODE_RANK=str(node))
        nodes.append(
            subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outputs = [proc.communicate(timeout=600) for proc in nodes]
    for proc, (_, err) in zip(nodes, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    parts = [train_parts(log) for log, _ in outputs]
    assert [p[0][0] for p in parts] == [0, 1]  # node 0 runs rank 0, node 1 rank 1
    assert parts[0][0][2] <= parts[1][0][1]  # disjoint parts of the train tokens
    results = json.loads((tmp_path / "node0" / "results.json").read_text())
    checksums = results["weights_checksum_per_rank"]
    assert results["steps"] == 10 and len(checksums) == 2 and checksums[0] == checksums[1]
