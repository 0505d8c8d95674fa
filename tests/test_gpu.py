"""GPU readiness, checked where a GPU is lent (skipped elsewhere; nothing requires one)."""

import importlib.util

import numpy as np
import pytest
import torch
from support import compose_config

from lmkit.mixers.mamba import Mamba
from lmkit.mixers.softmax import SoftmaxAttention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_sdpa_dispatches_to_the_flash_kernel_in_bf16():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mixer = SoftmaxAttention(128, num_heads=2).cuda()
    x = torch.randn(2, 256, 128, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        reference = mixer(x)
        # only the flash kernel allowed: raises if our call cannot take it
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            y = mixer(x)
    torch.testing.assert_close(y, reference)


@pytest.mark.skipif(not importlib.util.find_spec("mamba_ssm"), reason="needs mamba_ssm")
def test_mamba_uses_the_fused_kernels_and_matches_the_pytorch_scan():
    from lmkit.mixers.mamba import _cuda_kernel

    assert _cuda_kernel() is not None, "mamba_ssm is installed but its kernel did not load"
    torch.manual_seed(0)
    fused = Mamba(64, scan="parallel").cuda()
    reference = Mamba(64, scan="sequential").cuda()
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(2, 100, 64, device="cuda")
    torch.testing.assert_close(fused(x), reference(x), rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(not importlib.util.find_spec("causal_conv1d"), reason="needs causal_conv1d")
def test_causal_conv1d_kernel_matches_nn_conv1d():
    from lmkit.mixers.mamba import _conv_kernel

    assert _conv_kernel() is not None, "causal_conv1d is installed but its kernel did not load"
    mixer = Mamba(64).cuda()
    u = torch.randn(2, mixer.d_inner, 50, device="cuda")
    cache = mixer.init_cache(2, 50)  # the cached path always uses the PyTorch conv
    torch.testing.assert_close(mixer._conv(u, None), mixer._conv(u, cache), rtol=1e-4, atol=1e-5)


def test_training_on_the_gpu_preset(tmp_path):
    """The GPU preset trains in mixed precision and learns: val loss well below the add-one
    unigram model of the train characters (an untrained model scores about ln 65 = 4.17, the
    unigram about 3.3)."""
    from lmkit.run.build import build_datamodule
    from lmkit.run.train import train

    gpu = ["trainer=gpu", "trainer.accelerator=gpu", "trainer.precision=auto"]  # over TINY's cpu
    # long enough to leave the unigram well behind: the same run on a CPU does
    short = ["optim.optimizer.lr=3e-3", "data.batch_size=16", "trainer.max_steps=200"]
    evaluation = ["trainer.val_check_interval=200", "ngram.enabled=false"]
    cfg = compose_config(*gpu, *short, *evaluation, run_dir=tmp_path)
    results = train(cfg)
    assert results["config"]["trainer"]["precision"] in ("bf16-mixed", "16-mixed")
    datamodule = build_datamodule(cfg)
    datamodule.prepare()
    counts = np.bincount(datamodule.ids["train"], minlength=datamodule.vocab_size) + 1.0
    unigram = float(-np.log(counts / counts.sum())[datamodule.ids["val"][1:]].mean())
    assert results["val_loss"] < unigram - 0.4, (results["val_loss"], unigram)
