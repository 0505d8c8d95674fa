"""A Medusa checkpoint written before Medusa was its own package (heads inside DecoderLM, a
`medusa` config section) restores and decodes exactly as it did when it was written.

The fixture (tests/fixtures/medusa_legacy) is a tiny rope model (d_model 24, one layer, Tiny
Shakespeare characters) with 2 heads, trained and decoded by that older code; expected.json holds
what the older code produced: greedy and typical Medusa tokens for a prompt and tree, the heads'
and the LM head's logits at the prompt's last position."""

import json

import torch
from support import REPO, compose_config

from lmkit.medusa.decode import medusa_generate
from lmkit.medusa.model import MedusaLM
from lmkit.run.checkpoint import adopt_init_from, restore
from lmkit.run.evaluate import evaluate_checkpoint

FIXTURE = REPO / "tests" / "fixtures" / "medusa_legacy"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())


def restored_with_prompt():
    restored = restore(FIXTURE / "last.ckpt")
    prompt = torch.tensor([restored.tokenizer.encode(EXPECTED["prompt"])])
    return restored, prompt


def test_legacy_checkpoint_restores_as_a_medusa_model():
    restored, prompt = restored_with_prompt()
    assert isinstance(restored.model, MedusaLM) and len(restored.model.heads) == 2
    assert restored.config.task._target_ == "lmkit.medusa.task.MedusaTask"
    assert restored.config.task.distill_prompt == 4  # the fixture run's own Medusa option
    assert "medusa_heads" not in restored.config.model and "medusa" not in restored.config
    h = restored.model.hidden_states(prompt)
    heads = restored.model.heads(h)[:, 0, -1, :8]
    torch.testing.assert_close(heads, torch.tensor(EXPECTED["head_logits"]), rtol=1e-5, atol=1e-5)
    lm = restored.model.head(h)[0, -1, :8]
    torch.testing.assert_close(lm, torch.tensor(EXPECTED["lm_logits"]), rtol=1e-5, atol=1e-5)


def test_legacy_checkpoint_decodes_as_before():
    restored, prompt = restored_with_prompt()
    tree = [tuple(p) for p in EXPECTED["tree"]]
    n = EXPECTED["max_new_tokens"]
    greedy, stats = medusa_generate(restored.model, prompt, n, tree=tree)
    assert greedy[0].tolist() == EXPECTED["greedy_tokens"]
    assert stats.accepted == EXPECTED["accepted"]
    typical, _ = medusa_generate(
        restored.model, prompt, n, tree=tree, acceptance="typical", **EXPECTED["typical"]
    )
    assert typical[0].tolist() == EXPECTED["typical_tokens"]


def test_batched_proposal_equals_the_heads_forward():
    """decode's one-state proposal (two batched products) and the heads' per-head forward, the
    readable reference, give the same logits."""
    restored, prompt = restored_with_prompt()
    heads = restored.model.heads
    with torch.no_grad():
        for p in heads.parameters():  # blocks away from zero, so the residual path counts
            p.add_(0.05 * torch.randn_like(p))
    h = restored.model.hidden_states(prompt)[0]  # [T, D]
    for t in range(h.shape[0]):
        torch.testing.assert_close(heads.propose(h[t]), heads(h[t : t + 1])[:, 0])


def test_legacy_plain_checkpoint_restores_and_seeds_a_new_run(tmp_path):
    """base.ckpt is the plain model the fixture's heads were trained on (Medusa-1 froze it),
    written by the same older code: it restores as a DecoderLM with the very weights of the
    Medusa checkpoint's base, evaluates, and init_from accepts it."""
    base = restore(FIXTURE / "base.ckpt")
    medusa, prompt = restored_with_prompt()
    assert base.config.task._target_ == "lmkit.task.LanguageModelTask"
    assert base.config.runtime.compile is False and "compile" not in base.config.model
    torch.testing.assert_close(base.model(prompt), medusa.model.base(prompt), rtol=0, atol=0)
    metrics = evaluate_checkpoint(str(FIXTURE / "base.ckpt"), "val", limit_batches=2)
    assert 0 < metrics["loss"] < 4.2  # below uniform over 65 characters (ln 65 = 4.17)
    cfg = compose_config(f"init_from={FIXTURE / 'base.ckpt'}", run_dir=tmp_path)
    state = adopt_init_from(cfg)
    assert cfg.model.d_model == 24 and set(state) == set(base.model.state_dict())
