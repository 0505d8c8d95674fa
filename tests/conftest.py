"""Test set-up: real corpora from LMKIT_DATA_DIR, caches in a temp dir, a seed per test."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from support import REPO, compose_config

# The real corpora live beside the repo (../shared/data) unless LMKIT_DATA_DIR says otherwise.
if "LMKIT_DATA_DIR" not in os.environ and (REPO.parent / "shared" / "data").is_dir():
    os.environ["LMKIT_DATA_DIR"] = str(REPO.parent / "shared" / "data")
# Tests never write into the data root or the user's cache.
os.environ.setdefault("LMKIT_CACHE_DIR", tempfile.mkdtemp(prefix="lmkit-test-cache-"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture
def tiny_config(tmp_path):
    """compose_config with run_dir in this test's temp dir."""

    def make(*overrides: str, tiny: bool = True):
        return compose_config(*overrides, tiny=tiny, run_dir=tmp_path / "run")

    return make


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
