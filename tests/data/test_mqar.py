"""MQAR: generator invariants, the data module's determinism and resume, and the loss mask."""

import numpy as np
import pytest
import torch

from lmkit.data.mqar import MQARDataModule, check_mqar_config, mqar_examples
from lmkit.evaluation import IGNORE_INDEX
from lmkit.task import LanguageModelTask

SPEC = {"vocab_size": 64, "seq_len": 48, "num_kv_pairs": 6}


def examples(seed: int = 0, n: int = 200, **overrides):
    return mqar_examples(np.random.default_rng(seed), n, **{**SPEC, **overrides})


def test_shapes_and_ranges():
    x, y = examples()
    assert x.shape == y.shape == (200, 48) and x.dtype == y.dtype == torch.int64
    K, half = SPEC["num_kv_pairs"], SPEC["vocab_size"] // 2
    keys, values = x[:, 0 : 2 * K : 2], x[:, 1 : 2 * K : 2]
    assert keys.min() >= 1 and keys.max() < half
    assert values.min() >= half and values.max() < SPEC["vocab_size"]
    for row_keys, row_values in zip(keys, values, strict=True):
        assert len(set(row_keys.tolist())) == K and len(set(row_values.tolist())) == K
    assert x.min() >= 0 and x.max() < SPEC["vocab_size"]


def test_every_answer_is_the_value_stored_earlier_with_its_key():
    x, y = examples()
    K = SPEC["num_kv_pairs"]
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        pairs = dict(zip(row_x[0 : 2 * K : 2], row_x[1 : 2 * K : 2], strict=True))
        answered = [t for t, target in enumerate(row_y) if target != IGNORE_INDEX]
        # one query per key, each after the pairs, at an even offset of the query region
        assert len(answered) == K
        assert {row_x[t] for t in answered} == set(pairs)
        for t in answered:
            assert t >= 2 * K and (t - 2 * K) % 2 == 0
            assert row_y[t] == pairs[row_x[t]]


def test_loss_mask_covers_only_the_answers():
    x, y = examples(random_non_queries=False)
    K = SPEC["num_kv_pairs"]
    scored = y != IGNORE_INDEX
    assert int(scored.sum()) == K * len(x)
    # with zero filler, the scored positions are exactly the non-zero tokens of the query region
    assert torch.equal(scored[:, 2 * K :], x[:, 2 * K :] != 0)
    assert not scored[:, : 2 * K].any()


def test_short_gaps_are_likelier():
    x, y = examples(n=2000)
    K = SPEC["num_kv_pairs"]
    positions = (y != IGNORE_INDEX).nonzero()[:, 1]
    slots = (positions - 2 * K) // 2
    counts = torch.bincount(slots, minlength=(48 - 2 * K) // 2)
    assert counts[0] > counts[-1]


def test_same_seed_same_examples_other_seed_others():
    a, b, c = examples(seed=3), examples(seed=3), examples(seed=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"seq_len": 47}, "must be even"),
        ({"num_kv_pairs": 13}, "block_size >= 4 \\* num_kv_pairs"),
        ({"vocab_size": 12}, "distinct keys"),
        ({"num_kv_pairs": 0}, "positive integer"),
    ],
)
def test_bad_configs_are_one_clear_error(spec, match):
    args = {**SPEC, **spec}
    with pytest.raises(ValueError, match=match):
        check_mqar_config(args["vocab_size"], args["seq_len"], args["num_kv_pairs"])


def make_dm(**kwargs) -> MQARDataModule:
    args = {"vocab_size": 64, "num_kv_pairs": 4, "block_size": 32, "batch_size": 8}
    dm = MQARDataModule(**{**args, **kwargs}, num_val_examples=50, num_test_examples=30)
    dm.prepare()
    return dm


def test_datamodule_batches_are_step_indexed_and_resume():
    dm = make_dm(max_steps=6)
    batches = list(dm.train_dataloader())
    assert len(batches) == 6 and batches[0][0].shape == (8, 32)
    assert torch.equal(batches[4][0], dm.batch_at(4)[0])
    assert not torch.equal(batches[0][0], batches[1][0])  # fresh examples every step
    resumed = make_dm(max_steps=6)
    resumed.load_state_dict({"step": 4, "seed": 1337})
    again = list(resumed.train_dataloader())
    assert len(again) == 2 and torch.equal(again[0][1], batches[4][1])


def test_eval_sets_are_fixed_and_differ_from_each_other():
    a, b = make_dm(), make_dm()
    xa = torch.cat([x for x, _ in a.val_dataloader()])
    xb = torch.cat([x for x, _ in b.val_dataloader()])
    assert xa.shape == (50, 32) and torch.equal(xa, xb)
    xt = torch.cat([x for x, _ in a.test_dataloader()])
    assert xt.shape == (30, 32) and not torch.equal(xt, xa[:30])
    assert a.vocab_size == 64 and a.tokenizer.vocab_size == 64
    assert not a.ngram_baseline


class Memorizer(torch.nn.Module):
    """Logits that put all mass on a fixed token everywhere: its loss on a position depends only
    on whether that position's target is the fixed token."""

    vocab_size = 64

    def forward(self, x):
        logits = torch.full((*x.shape, self.vocab_size), -30.0)
        logits[..., 40] = 30.0
        return logits


def test_training_loss_is_the_mean_over_answers_only():
    dm = make_dm()
    x, y = dm.batch_at(0)
    task = LanguageModelTask(Memorizer(), optimizer=torch.optim.SGD, max_steps=1)
    task.log = lambda *a, **k: None
    loss = task.training_step((x, y), 0)
    scored = y[y != IGNORE_INDEX]
    hits = (scored == 40).float()
    expected = (hits * 0.0 + (1 - hits) * 60.0).mean()  # NLL ~ 0 on hits, ~60 otherwise
    torch.testing.assert_close(loss, expected, atol=1e-3, rtol=1e-4)
