"""scripts/generate.py decoding=medusa: typical acceptance samples (seeded, reproducible, one
text per sample); the options Medusa cannot honour are refused before anything loads."""

import pytest
from hydra import compose, initialize_config_dir
from support import CONF, REPO

from lmkit.run.generate import generate_texts

CKPT = REPO / "tests" / "fixtures" / "medusa_legacy" / "last.ckpt"  # a tiny model with 2 heads


def generate_config(*overrides: str, decoding: str = "medusa"):
    """The config scripts/generate.py would see for these overrides."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("generate", overrides=[f"decoding={decoding}", *overrides])


def typical_texts(seed: int, num_samples: int = 3) -> list[str]:
    cfg = generate_config(
        f"ckpt={CKPT}",
        "medusa.acceptance=typical",
        "medusa.tree_nodes=6",
        "prompt=ROMEO:",
        "max_new_tokens=24",
        "temperature=0.9",
        f"num_samples={num_samples}",
        f"seed={seed}",
    )
    return generate_texts(cfg)


def test_typical_medusa_samples_are_seeded_and_differ():
    texts = typical_texts(seed=0)
    assert len(texts) == 3 and all(t.startswith("ROMEO:") for t in texts)
    assert len(set(texts)) > 1  # num_samples gives different texts, not copies
    assert typical_texts(seed=0) == texts  # the same seed, the same texts
    assert typical_texts(seed=1) != texts


def test_greedy_medusa_is_greedy_decoding():
    common = [f"ckpt={CKPT}", "prompt=ROMEO:", "max_new_tokens=12", "temperature=0"]
    medusa = generate_texts(generate_config(*common))
    assert medusa == generate_texts(generate_config(*common, decoding="sample"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], r"temperature=0.8 with medusa.acceptance=greedy, .* add temperature=0"),
        (["temperature=0", "num_samples=2"], r"num_samples=2 with medusa.acceptance=greedy"),
        (
            ["medusa.acceptance=typical", "temperature=0"],
            r"temperature=0 with medusa.acceptance=typical, .* set temperature>0",
        ),
        (["medusa.acceptance=fast"], r"medusa.acceptance='fast'; choose one of"),
    ],
)
def test_options_medusa_cannot_honour_are_refused_before_loading(overrides, message):
    cfg = generate_config("ckpt=/nonexistent/last.ckpt", *overrides)
    with pytest.raises(ValueError, match=message):
        generate_texts(cfg)
