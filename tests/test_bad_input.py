"""Bad input is refused before any training, with one clear sentence, and nothing is written."""

import os
import subprocess
import sys

import pytest
import torch
from support import REPO

from lmkit.run.train import train


def assert_refused(cfg, error, match):
    with pytest.raises(error, match=match):
        train(cfg)
    assert not (cfg.run_dir and os.path.exists(os.path.join(cfg.run_dir, "checkpoints")))


def test_heads_must_divide_d_model(tiny_config):
    assert_refused(
        tiny_config("model.d_model=30"),
        ValueError,
        r"model.d_model=30 must be divisible by model.num_heads=4",
    )


def test_unknown_option_value(tiny_config):
    assert_refused(
        tiny_config("model.mixer.backend=fast"),
        ValueError,
        r"backend='fast'; choose one of \['sdpa', 'naive', 'tiled'\]",
    )


def test_missing_data_file(tiny_config, tmp_path):
    assert_refused(
        tiny_config("data=text", f"data.train={tmp_path}/nope.txt"), FileNotFoundError, "nope.txt"
    )


def test_empty_data_file(tiny_config, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    assert_refused(
        tiny_config("data=text", f"data.train={tmp_path}/empty.txt"), ValueError, "empty"
    )


def test_binary_data_file(tiny_config, tmp_path):
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 40)
    assert_refused(
        tiny_config("data=text", f"data.train={tmp_path}/blob.bin"), ValueError, "not UTF-8 text"
    )


def test_block_size_longer_than_a_split(tiny_config, tmp_path):
    (tmp_path / "train.txt").write_text("to be or not to be " * 200)
    (tmp_path / "val.txt").write_text("that is the question")
    cfg = tiny_config(
        "data=text",
        f"data.train={tmp_path}/train.txt",
        f"data.val={tmp_path}/val.txt",
        "data.block_size=64",
    )
    assert_refused(cfg, ValueError, "block_size=64 exceeds")


def test_non_positive_lr_and_steps(tiny_config):
    assert_refused(tiny_config("optim.optimizer.lr=0"), ValueError, "lr=0")
    assert_refused(tiny_config("trainer.max_steps=0"), ValueError, "max_steps=0")


def run_train(*args):
    return subprocess.run(
        [sys.executable, "scripts/train.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_unknown_mixer_lists_the_choices(tmp_path):
    out = run_train("model/mixer=nope", f"hydra.run.dir={tmp_path}")
    assert out.returncode != 0
    assert "Could not find 'model/mixer/nope'" in out.stderr and "softmax" in out.stderr


def test_cli_user_error_is_one_line_with_exit_status_2(tmp_path):
    out = run_train("model.d_model=30", "logger=csv", f"hydra.run.dir={tmp_path}/run")
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: model.d_model=30 must be divisible by model.num_heads=4; change one of them"
    ]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_precision_the_device_cannot_run(tiny_config):
    assert_refused(
        tiny_config("trainer.precision=16-mixed"),
        ValueError,
        "trainer.precision=16-mixed needs a CUDA GPU",
    )


def test_unknown_precision(tiny_config):
    assert_refused(tiny_config("trainer.precision=8-true"), Exception, "8-true")


def test_run_dir_that_is_not_writable(tiny_config, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the run dir should go")
    cfg = tiny_config()
    cfg.run_dir = str(blocker / "run")
    assert_refused(cfg, PermissionError, "is not writable")


def test_missing_data_root(tiny_config, monkeypatch, tmp_path):
    monkeypatch.setenv("LMKIT_DATA_DIR", str(tmp_path / "nowhere"))
    assert_refused(
        tiny_config(), FileNotFoundError, "LMKIT_DATA_DIR=.* is not an existing directory"
    )


def test_checkpoint_path_that_does_not_exist(tiny_config, tmp_path):
    assert_refused(
        tiny_config(f"ckpt_path={tmp_path}/nope.ckpt"), FileNotFoundError, "does not exist"
    )


def test_divergence_stops_with_the_step_and_keeps_earlier_checkpoints(tiny_config):
    from lmkit.errors import DivergenceError

    cfg = tiny_config(
        "optim.optimizer.lr=1e30",
        "optim.warmup_steps=0",
        "trainer.gradient_clip_val=null",
        "checkpoint.every_n_train_steps=1",
    )
    with pytest.raises(DivergenceError, match=r"training diverged at step \d+"):
        train(cfg)
    last = os.path.join(cfg.run_dir, "checkpoints", "last.ckpt")
    from lmkit.run.checkpoint import load_checkpoint

    state = load_checkpoint(last)["state_dict"]  # intact and loadable
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_lightning_refusing_a_trainer_flag_is_one_line(tmp_path):
    """Lightning's own verdict on a trainer flag (a fractional val_check_interval needs epochs;
    lmkit's runs count steps), raised as the Trainer is built, is a user error, not a
    traceback."""
    out = run_train("trainer.val_check_interval=0.5", f"hydra.run.dir={tmp_path}/run")
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "val_check_interval" in errors[0]
    assert "Traceback" not in out.stderr


def test_a_run_dir_that_is_a_file_is_one_line(tmp_path):
    taken = tmp_path / "results"
    taken.write_text("not a folder")
    out = run_train(f"hydra.run.dir={taken}", "trainer.max_steps=2", "logger=csv")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: hydra.run.dir={taken} is a file, not a folder; give a folder path"]
    assert taken.read_text() == "not a folder"


def test_a_clipping_algorithm_lmkit_does_not_run_is_refused_before_training(tiny_config):
    assert_refused(
        tiny_config("+trainer.gradient_clip_algorithm=value"),
        ValueError,
        r"gradient_clip_algorithm=value: lmkit clips by the gradients' total norm",
    )
