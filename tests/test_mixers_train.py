"""Every mixer config trains a tiny model on real text: val loss falls well below unigram."""

import numpy as np
import pytest
from support import CONF, compose_config

from lmkit.run.build import build_datamodule
from lmkit.run.train import train

pytestmark = pytest.mark.slow
MIXERS = sorted(p.stem for p in (CONF / "model" / "mixer").glob("*.yaml"))
SHORT_RUN = [
    "model.d_model=64",
    "data.block_size=64",
    "data.batch_size=16",
    "optim.optimizer.lr=3e-3",
    "optim.warmup_steps=10",
    "trainer.max_steps=120",
    "trainer.val_check_interval=120",
    "trainer.limit_val_batches=20",
]


@pytest.fixture(scope="module")
def unigram_loss():
    """Cross-entropy (nats/token) on val of the add-one unigram model of the train tokens."""
    dm = build_datamodule(compose_config(*SHORT_RUN, run_dir="/tmp/unused"))
    dm.prepare()
    counts = np.bincount(dm.ids["train"], minlength=dm.vocab_size) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[dm.ids["val"][1:]].mean())


@pytest.mark.parametrize("mixer", MIXERS)
def test_tiny_model_learns_tiny_shakespeare(mixer, unigram_loss, tmp_path):
    cfg = compose_config(f"model/mixer={mixer}", *SHORT_RUN, run_dir=tmp_path / "run")
    if cfg.model.mixer.get("chunk_size") is not None:  # several chunks per 64-token window
        cfg.model.mixer.chunk_size = 16
    results = train(cfg)
    print(f"{mixer}: val loss {results['val_loss']:.3f}, unigram {unigram_loss:.3f}")
    assert results["val_loss"] < unigram_loss - 0.4, (results["val_loss"], unigram_loss)


@pytest.mark.parametrize("upsample", ["linear", "attention"])
def test_tiny_hourglass_learns_tiny_shakespeare(upsample, unigram_loss, tmp_path):
    cfg = compose_config(
        "model=hourglass",
        f"model.upsample={upsample}",
        "model.num_layers=4",
        *SHORT_RUN,
        run_dir=tmp_path / "run",
    )
    results = train(cfg)
    print(f"hourglass ({upsample}): val loss {results['val_loss']:.3f}, unigram {unigram_loss:.3f}")
    assert results["val_loss"] < unigram_loss - 0.4, (results["val_loss"], unigram_loss)
