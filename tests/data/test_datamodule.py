from __future__ import annotations

import json
from types import SimpleNamespace

import lightning
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F

from lmkit.data import corpora, datamodule
from lmkit.data.corpora import read_text
from lmkit.data.datamodule import TextDataModule
from lmkit.data.tokenizers import train_tokenizer
from lmkit.evaluation import IGNORE_INDEX

TRAIN_CHARS, VAL_CHARS = 1_003_854, 111_540  # nanoGPT's shakespeare_char split


# ---- tokens and cache ------------------------------------------------------------------


def test_shakespeare_char_tokens(shakespeare_char, shakespeare_text):
    dm = shakespeare_char
    assert dm.vocab_size == 65 and dm.tokenizer.kind == "char"
    assert dm.split_names == ["train", "val"]
    assert len(dm.ids["train"]) == TRAIN_CHARS and len(dm.ids["val"]) == VAL_CHARS
    assert dm.ids["train"].dtype == np.uint16
    # the cached memmaps hold exactly the direct encoding of each split's text
    for split, text in (
        ("train", shakespeare_text[:TRAIN_CHARS]),
        ("val", shakespeare_text[TRAIN_CHARS:]),
    ):
        np.testing.assert_array_equal(dm.ids[split], dm.tokenizer.encode(text))
        assert dm.tokenizer.decode(dm.ids[split].tolist()) == text
        assert dm.scored_bytes(split) == len(text[1:].encode())
    # val has no character train lacks, so the vocabulary of every split is the train split's
    assert (
        dm.tokenizer.to_json() == train_tokenizer("char", shakespeare_text[:TRAIN_CHARS]).to_json()
    )
    assert dm.meta["unseen_chars"] == {"val": {"count": 0, "chars": []}}


def test_cache_layout_and_meta(shakespeare_char):
    dm = shakespeare_char
    assert dm.cache_dir.parent == corpora.cache_root() / "tokens"
    meta = json.loads((dm.cache_dir / "meta.json").read_text())
    assert meta["vocab_size"] == 65 and meta["dtype"] == "uint16"
    assert meta["tokens"] == {"train": TRAIN_CHARS, "val": VAL_CHARS}
    assert meta["bytes"] == {"train": TRAIN_CHARS, "val": VAL_CHARS}  # ASCII text
    assert sorted(p.name for p in dm.cache_dir.iterdir()) == [
        "meta.json",
        "tokenizer.json",
        "train.bin",
        "val.bin",
    ]


def test_second_prepare_hits_the_cache(shakespeare_char, monkeypatch):
    files = sorted(shakespeare_char.cache_dir.iterdir())
    mtimes = [p.stat().st_mtime_ns for p in files]
    monkeypatch.setattr(datamodule, "train_tokenizer", lambda *a, **k: pytest.fail("retrained"))
    monkeypatch.setattr(datamodule, "load_split", lambda *a, **k: pytest.fail("re-encoded"))
    # a different block/batch size shares the cache: it depends on files + tokenizer only
    dm = TextDataModule("tinyshakespeare", block_size=128, batch_size=2)
    dm.prepare()
    dm.prepare()  # idempotent
    assert dm.cache_hit and dm.cache_dir == shakespeare_char.cache_dir
    assert [p.stat().st_mtime_ns for p in sorted(dm.cache_dir.iterdir())] == mtimes
    np.testing.assert_array_equal(dm.ids["val"], shakespeare_char.ids["val"])


def test_bpe_ids_equal_direct_encoding(wikitext_bpe, data_dir):
    """Tokenizing line batches through datasets.map equals encoding each whole file."""
    dm = wikitext_bpe
    assert dm.tokenizer.kind == "bpe" and dm.vocab_size == 512
    for split, name in (("train", "valid.txt"), ("val", "test.txt")):
        text = read_text(data_dir / "wikitext-2" / name)
        np.testing.assert_array_equal(dm.ids[split], dm.tokenizer.encode(text))
        assert dm.meta["bytes"][split] == len(text.encode())
        assert dm.scored_bytes(split) == len(text.encode()) - int(
            dm.tokenizer.token_bytes[dm.ids[split][0]]
        )


def test_text_without_val_splits_train(write_file):
    text = "".join(f"line {i}: the quick brown fox\n" for i in range(200))
    dm = TextDataModule(train=str(write_file("train.txt", text)), block_size=8, batch_size=2)
    dm.prepare()
    cut = int(len(text) * 0.9)
    assert dm.split_names == ["train", "val"]
    assert dm.tokenizer.decode(dm.ids["train"].tolist()) == text[:cut]
    assert dm.tokenizer.decode(dm.ids["val"].tolist()) == text[cut:]


def test_text_with_test_split(write_file):
    dm = TextDataModule(
        train=str(write_file("a.txt", "abcdefgh\n" * 20)),
        val=str(write_file("b.txt", "hgfedcba\n" * 5)),
        test=str(write_file("c.txt", "aabbccdd\n" * 5)),
        block_size=4,
    )
    dm.prepare()
    assert dm.split_names == ["train", "val", "test"]
    assert len(dm.test_dataloader().dataset) == -(-(45 - 1) // 4)


# ---- training batches ------------------------------------------------------------------


def test_train_batch_is_a_function_of_seed_and_step(shakespeare_char):
    dm = shakespeare_char
    x, y = dm.batch_at(5)
    assert x.shape == y.shape == (4, 64) and x.dtype == y.dtype == torch.int64
    torch.testing.assert_close(dm.batch_at(5), (x, y))
    other = TextDataModule("tinyshakespeare", block_size=64, batch_size=4)
    other.prepare()
    torch.testing.assert_close(other.batch_at(5), (x, y))
    assert not torch.equal(dm.batch_at(6)[0], x)
    reseeded = TextDataModule("tinyshakespeare", block_size=64, batch_size=4, seed=7)
    reseeded.prepare()
    assert not torch.equal(reseeded.batch_at(5)[0], x)


def test_train_windows_are_shifted_slices(shakespeare_char):
    dm = shakespeare_char
    loader = dm.train_dataloader()
    dataset = loader.dataset
    ids = np.asarray(dm.ids["train"], dtype=np.int64)
    for step in (0, 1, 1000):
        x, y = dataset[step]
        torch.testing.assert_close(x[:, 1:], y[:, :-1])
        for row, o in enumerate(dataset.offsets(step)):
            assert 0 <= o and o + 64 + 1 <= len(ids)
            np.testing.assert_array_equal(x[row].numpy(), ids[o : o + 64])
            np.testing.assert_array_equal(y[row].numpy(), ids[o + 1 : o + 65])


def test_train_loader_resumes_at_a_step(shakespeare_char):
    dm = TextDataModule("tinyshakespeare", block_size=64, batch_size=4, max_steps=10)
    dm.prepare()
    fresh = list(dm.train_dataloader())
    assert len(fresh) == len(dm.train_dataloader()) == 10
    dm.set_start_step(4)
    resumed = list(dm.train_dataloader())
    assert len(resumed) == 6
    for (x, y), (xr, yr) in zip(fresh[4:], resumed, strict=True):
        assert torch.equal(x, xr) and torch.equal(y, yr)
    # state_dict / load_state_dict carry the position
    other = TextDataModule("tinyshakespeare", block_size=64, batch_size=4, max_steps=10)
    other.load_state_dict(dm.state_dict())
    other.prepare()
    assert other.start_step == 4
    assert torch.equal(next(iter(other.train_dataloader()))[0], fresh[4][0])


def test_train_loader_with_workers_matches(shakespeare_char):
    dm = TextDataModule("tinyshakespeare", block_size=64, batch_size=4, max_steps=6, num_workers=2)
    dm.prepare()
    for step, (x, y) in enumerate(dm.train_dataloader()):
        torch.testing.assert_close((x, y), shakespeare_char.batch_at(step))


def test_ranks_draw_different_windows(shakespeare_char):
    dm = TextDataModule("tinyshakespeare", block_size=64, batch_size=4, max_steps=3)
    dm.prepare()

    def fake_trainer(rank: int, use_distributed_sampler: bool) -> SimpleNamespace:
        connector = SimpleNamespace(use_distributed_sampler=use_distributed_sampler)
        return SimpleNamespace(
            world_size=2,
            global_rank=rank,
            accumulate_grad_batches=1,
            global_step=0,
            _accelerator_connector=connector,
        )

    dm.trainer = fake_trainer(0, use_distributed_sampler=True)
    with pytest.raises(ValueError, match="set trainer.use_distributed_sampler=false"):
        dm.train_dataloader()
    dm.trainer = fake_trainer(0, use_distributed_sampler=False)
    rank0 = list(dm.train_dataloader())
    dm.trainer = fake_trainer(1, use_distributed_sampler=False)
    rank1 = list(dm.train_dataloader())
    # each rank's windows lie in its own half of the train tokens: disjoint across ranks
    ids = np.asarray(dm.ids["train"])
    half = len(ids) // 2
    for rank, batches in ((0, rank0), (1, rank1)):
        for x, y in batches:
            for row_x, row_y in zip(x.numpy(), y.numpy(), strict=True):
                window = np.append(row_x, row_y[-1]).astype(ids.dtype)
                found = ids.tobytes().find(window.tobytes())
                assert found % ids.itemsize == 0
                start = found // ids.itemsize
                assert rank * half <= start and start + 65 <= (rank + 1) * half + 1
    assert all(not torch.equal(a[0], b[0]) for a, b in zip(rank0, rank1, strict=True))


class _Recorder(lightning.LightningModule):
    """A bigram model that records the batches it is trained on."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.logits = nn.Embedding(vocab_size, vocab_size)
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append(x.clone())
        logits = self.logits(x)  # [B, T, V]
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader`")
@pytest.mark.filterwarnings("ignore:Checkpoint directory")
@pytest.mark.parametrize("accumulate", [1, 2])
def test_lightning_resume_continues_the_data_order(shakespeare_char, tmp_path, accumulate):
    def fit(ckpt_path=None):
        dm = TextDataModule("tinyshakespeare", block_size=16, batch_size=2, max_steps=6)
        model = _Recorder(65)
        checkpoints = ModelCheckpoint(
            dirpath=tmp_path, filename="{step}", every_n_train_steps=3, save_top_k=-1
        )
        trainer = lightning.Trainer(
            max_steps=6,
            accumulate_grad_batches=accumulate,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            callbacks=[checkpoints],
            default_root_dir=tmp_path,
        )
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return dm, model.seen

    dm, full = fit()
    batches = 6 * accumulate
    assert len(full) == batches
    for i, x in enumerate(full):
        assert torch.equal(x, dm.batch_at(i)[0])
    ckpt = tmp_path / "step=3.ckpt"
    state = torch.load(ckpt, weights_only=False)["TextDataModule"]
    assert state == {"step": 3 * accumulate, "seed": 1337}
    _, resumed = fit(ckpt)
    assert len(resumed) == batches - 3 * accumulate
    for x, y in zip(full[3 * accumulate :], resumed, strict=True):
        assert torch.equal(x, y)


# ---- evaluation batches ----------------------------------------------------------------


def test_val_loader_scores_every_token_once(shakespeare_char):
    dm = shakespeare_char
    ids = torch.from_numpy(np.asarray(dm.ids["val"], dtype=np.int64))
    assert (len(ids) - 1) % 64 != 0  # so the last window is partial and padded
    loader = dm.val_dataloader()
    assert loader.batch_size == 4
    xs, ys = zip(*loader, strict=True)
    x, y = torch.cat(xs).flatten(), torch.cat(ys).flatten()  # windows laid end to end
    scored = y != IGNORE_INDEX
    assert int(scored.sum()) == len(ids) - 1
    # window i covers x = ids[iT : iT+T], y = ids[iT+1 : iT+T+1]: flattening restores the split
    assert torch.equal(y[scored], ids[1:]) and torch.equal(x[scored], ids[:-1])
    assert not scored[len(ids) - 1 :].any() and (x[len(ids) :] == 0).all()
    # deterministic
    assert all(torch.equal(a[0], b) for a, b in zip(dm.val_dataloader(), xs, strict=True))


def test_eval_batch_size(shakespeare_char):
    dm = TextDataModule("tinyshakespeare", block_size=64, batch_size=4, eval_batch_size=32)
    dm.prepare()
    assert next(iter(dm.val_dataloader()))[0].shape == (32, 64)


# ---- errors ----------------------------------------------------------------------------


def test_missing_corpus_file(monkeypatch, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("LMKIT_DATA_DIR", str(empty))

    def offline(url, dest, sha256):
        raise OSError("offline")

    monkeypatch.setattr(corpora, "_download", offline)
    dm = TextDataModule("wikitext2")
    with pytest.raises(
        FileNotFoundError, match=r"wikitext-2/train.txt \(sha256 9e9fa1ad.*LMKIT_DATA_DIR"
    ):
        dm.prepare()


def test_empty_and_binary_files(write_file):
    val = str(write_file("val.txt", "some text\n" * 10))
    with pytest.raises(ValueError, match=r"file .*empty.txt is empty"):
        TextDataModule(train=str(write_file("empty.txt", "")), val=val).prepare()
    binary = write_file("weights.bin", bytes(range(256)) * 4)
    # the first byte that is not UTF-8 (its NUL at offset 0 is valid UTF-8)
    with pytest.raises(ValueError, match=r"weights.bin is not UTF-8 text \(byte offset 128\)"):
        TextDataModule(train=str(binary), val=val).prepare()
    with pytest.raises(FileNotFoundError, match=r"nope.txt does not exist"):
        TextDataModule(train=val, val="nope.txt").prepare()


def test_block_size_larger_than_a_split(write_file, monkeypatch):
    train = str(write_file("train.txt", "abcdefghij" * 100))
    val = str(write_file("val.txt", "jihgfedcba" * 30))
    # rejected before the tokenizer is trained (tokens <= characters)
    monkeypatch.setattr(datamodule, "train_tokenizer", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(ValueError, match=r"block_size=512 exceeds the 300 tokens of split 'val'"):
        TextDataModule(train=train, val=val, block_size=512).prepare()
    with pytest.raises(
        ValueError, match=r"block_size=1000 exceeds the 1000 tokens of split 'train'"
    ):
        TextDataModule(train=train, val=val, block_size=1000).prepare()


def test_block_size_checked_on_bpe_tokens(write_file):
    # 300 bytes, far fewer BPE tokens: only the exact count after encoding can reject it
    train = str(write_file("train.txt", "the cat sat on the mat. " * 200))
    val = str(write_file("val.txt", "the cat sat on the mat. " * 12 + "the end"))
    dm = TextDataModule(
        train=train, val=val, block_size=250, tokenizer={"kind": "bpe", "vocab_size": 300}
    )
    with pytest.raises(ValueError, match=r"block_size=250 exceeds the \d+ tokens of split 'val'"):
        dm.prepare()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"tokenizer": {"kind": "unigram"}}, r"tokenizer kind='unigram' is unknown; choose one of"),
        ({"tokenizer": {"kind": "bpe", "vocab": 10}}, r"tokenizer options \['vocab'\] are unknown"),
        ({"tokenizer": {"kind": "bpe"}}, r"needs an integer vocab_size >= 256"),
        ({"block_size": 0}, r"block_size=0 must be a positive integer"),
        ({"batch_size": -1}, r"batch_size=-1 must be a positive integer"),
        ({"eval_batch_size": 0}, r"eval_batch_size=0 must be a positive integer"),
        ({"corpus": "enwik8"}, r"unknown corpus 'enwik8'; choose one of \['tinyshakespeare'"),
        ({"corpus": None}, r"no data given: choose a corpus .* or a train file"),
        ({"train": "a.txt"}, r"corpus='tinyshakespeare' comes with its own splits"),
    ],
    ids=["kind", "option", "bpe-size", "block", "batch", "eval-batch", "corpus", "no-data", "both"],
)
def test_constructor_errors(kwargs, message):
    kwargs = {"corpus": "tinyshakespeare", **kwargs}
    with pytest.raises(ValueError, match=message):
        TextDataModule(kwargs.pop("corpus"), **kwargs)


def test_missing_split_and_unprepared(shakespeare_char):
    with pytest.raises(ValueError, match=r"split 'test' is not in this corpus; its splits are"):
        shakespeare_char.test_dataloader()
    with pytest.raises(RuntimeError, match=r"call datamodule.prepare\(\) first"):
        TextDataModule("tinyshakespeare").train_dataloader()
