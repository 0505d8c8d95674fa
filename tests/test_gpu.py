"""GPU readiness, checked where a GPU is lent (skipped elsewhere; nothing requires one)."""

import importlib.util

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
    from lmkit.run.train import train

    gpu = ["trainer=gpu", "trainer.accelerator=gpu", "trainer.precision=auto"]  # over TINY's cpu
    cfg = compose_config(*gpu, "trainer.max_steps=5", "ngram.enabled=false", run_dir=tmp_path)
    results = train(cfg)
    assert results["config"]["trainer"]["precision"] in ("bf16-mixed", "16-mixed")
    assert results["val_loss"] < 5
