"""data=hf: parquet and jsonl corpora of many documents -> token shards -> training batches.

References are independent of the shard path: each document encoded on its own by the saved
tokenizer, followed by the end-of-text id, in the source's order; shard files read back with
np.fromfile and concatenated.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from support import REPO, compose_config, documents, write_jsonl, write_parquet

from lmkit.data.hf_datamodule import HFDataModule
from lmkit.data.hf_source import uniform_hash
from lmkit.data.shards import ShardedTokens
from lmkit.data.tokenizers import train_tokenizer
from lmkit.run.build import build_datamodule


def run_script(script: str, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, script, *overrides], cwd=REPO, capture_output=True, text=True, timeout=600
    )


def expected_stream(tokenizer, docs: list[str]) -> np.ndarray:
    """Each document's ids, then the end-of-text id, in order (empty documents dropped)."""
    ids: list[int] = []
    for doc in docs:
        if doc:
            ids += tokenizer.encode(doc) + [tokenizer.eot_id]
    return np.array(ids, dtype=np.int64)


def read_shards(dm: HFDataModule, split: str) -> np.ndarray:
    records = dm.meta["splits"][split]["shards"]
    parts = [np.fromfile(dm.cache_dir / r["file"], dtype=dm.meta["dtype"]) for r in records]
    return np.concatenate(parts).astype(np.int64)


TRAIN_DOCS, VAL_DOCS = documents(600, seed=1), documents(80, seed=2)


@pytest.fixture(scope="module")
def parquet_corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("parquet")
    write_parquet(root / "train", TRAIN_DOCS, parts=3)
    write_parquet(root / "validation", VAL_DOCS, parts=1)
    return root


def named_splits(root: Path, **kwargs) -> HFDataModule:
    files = {"train": str(root / "train" / "*.parquet"), "validation": str(root / "validation")}
    files["validation"] += "/*.parquet"
    options = {"shard_tokens": 3000, "batch_documents": 32, "workers": 2}
    options.update(kwargs.pop("prepare", {}))
    return HFDataModule(
        "parquet",
        data_files=files,
        val_split="validation",
        tokenizer=kwargs.pop("tokenizer", {"kind": "bpe", "vocab_size": 320}),
        block_size=16,
        batch_size=4,
        prepare=options,
        **kwargs,
    )


@pytest.mark.parametrize("kind", ["char", "bpe", "word"])
def test_shards_hold_every_document_then_end_of_text(parquet_corpus, kind):
    vocab = 320 if kind == "bpe" else None
    dm = named_splits(parquet_corpus, tokenizer={"kind": kind, "vocab_size": vocab})
    dm.prepare()
    tok = dm.tokenizer
    assert tok.eot_id == tok.vocab_size - 1  # a special token of its own, the last id
    assert tok.decode([tok.eot_id]) == "<|endoftext|>" and tok.token_bytes[tok.eot_id] == 0
    for split, docs in (("train", TRAIN_DOCS), ("val", VAL_DOCS)):
        stream = read_shards(dm, split)
        np.testing.assert_array_equal(stream, expected_stream(tok, docs))
        assert (stream == tok.eot_id).sum() == len(docs) == dm.meta["splits"][split]["documents"]
        if kind != "word":  # word decoding joins tokens with spaces
            pieces = tok.decode(stream.tolist()).split("<|endoftext|>")
            assert pieces[:-1] == docs and pieces[-1] == ""
    assert len(dm.meta["splits"]["train"]["shards"]) >= 3  # shard_tokens=3000 cut it
    text = "".join(TRAIN_DOCS)
    if kind != "word":  # word bytes count one space per word (see tokenizers.py)
        assert dm.meta["splits"]["train"]["bytes"] == len(text.encode())
    assert dm.split_words["train"] == len(text.split()) + text.count("\n")


def test_windows_cross_shard_boundaries_as_one_stream(parquet_corpus):
    dm = named_splits(parquet_corpus)
    dm.prepare()
    stream = read_shards(dm, "train")
    tokens = dm.tokens("train")
    assert len(tokens) == len(stream) == dm.meta["tokens"]["train"]
    boundaries = np.cumsum([r["tokens"] for r in dm.meta["splits"]["train"]["shards"]])[:-1]
    for b in boundaries:
        for a, c in ((b - 5, b + 7), (b, b + 1), (b - 1, b), (0, b + 40)):
            np.testing.assert_array_equal(tokens.window(a, c), stream[a:c])
    np.testing.assert_array_equal(np.asarray(tokens), stream)
    x, y = dm.batch_at(4)  # the step's windows, read across shards
    for row_x, row_y in zip(x.numpy(), y.numpy(), strict=True):
        np.testing.assert_array_equal(row_x[1:], row_y[:-1])
        window = np.append(row_x, row_y[-1])
        assert any(np.array_equal(stream[o : o + 17], window) for o in range(len(stream) - 16))
    # every val token after the first is scored once, across the val shards
    targets = torch.cat([yb.flatten() for _, yb in dm.val_dataloader()])
    np.testing.assert_array_equal(targets[targets >= 0].numpy(), read_shards(dm, "val")[1:])


def test_one_shard_and_many_give_the_same_stream_and_batches(parquet_corpus):
    many = named_splits(parquet_corpus, prepare={"shard_tokens": 1000, "workers": 2})
    one = named_splits(parquet_corpus, prepare={"shard_tokens": 10**9, "workers": 1})
    many.prepare()
    one.prepare()
    assert len(one.meta["splits"]["train"]["shards"]) == 1
    assert len(many.meta["splits"]["train"]["shards"]) > 5
    np.testing.assert_array_equal(read_shards(one, "train"), read_shards(many, "train"))
    for step in (0, 7):
        assert all(
            torch.equal(a, b) for a, b in zip(one.batch_at(step), many.batch_at(step), strict=True)
        )


def test_jsonl_held_out_val_and_test_are_seeded_disjoint_and_cover_train(tmp_path):
    docs = documents(500, seed=3)
    write_jsonl(tmp_path / "dump" / "all.jsonl", docs)

    def prepared(seed: int, batch_documents: int, holdout: dict) -> HFDataModule:
        dm = HFDataModule(
            "jsonl",
            data_files=str(tmp_path / "dump" / "*.jsonl"),
            holdout={**holdout, "seed": seed},
            tokenizer={"kind": "char"},
            block_size=16,
            prepare={"batch_documents": batch_documents, "workers": 1},
        )
        dm.prepare()
        return dm

    def decoded_docs(dm, split):
        return dm.tokenizer.decode(read_shards(dm, split).tolist()).split("<|endoftext|>")[:-1]

    dm = prepared(7, 64, {"val": 0.1, "test": 0.05})
    val, test, train = (decoded_docs(dm, s) for s in ("val", "test", "train"))
    # the held-out rule transcribed: a uniform hash of (seed, index) below 0.1 -> val, then test
    u = uniform_hash(7, np.arange(len(docs), dtype=np.uint64))
    assert val == [d for d, x in zip(docs, u, strict=True) if x < 0.1]
    assert test == [d for d, x in zip(docs, u, strict=True) if 0.1 <= x < 0.15]
    assert sorted(train + val + test) == sorted(docs) and 30 <= len(val) <= 70
    # the same documents whatever the batch size; another seed holds out others
    assert decoded_docs(prepared(7, 17, {"val": 0.1, "test": 0.05}), "val") == val
    assert decoded_docs(prepared(8, 64, {"val": 0.1, "test": 0.05}), "val") != val
    counted = prepared(7, 64, {"val": 25, "test": 10})
    assert [counted.meta["splits"][s]["documents"] for s in ("val", "test")] == [25, 10]
    assert counted.meta["splits"]["train"]["documents"] == 465


def test_train_py_trains_on_a_local_parquet_dump(parquet_corpus, tmp_path):
    """The whole path through the config: data=hf with file globs, two named splits."""
    run_dir = tmp_path / "run"
    out = run_script(
        "scripts/train.py",
        "data=hf",
        "data.path=parquet",
        f"+data.data_files.train={parquet_corpus}/train/*.parquet",
        f"+data.data_files.validation={parquet_corpus}/validation/*.parquet",
        "data.val_split=validation",
        "data.prepare.shard_tokens=2000",
        "tokenizer=bpe",
        "tokenizer.vocab_size=300",
        "model.d_model=32",
        "model.num_layers=1",
        "data.block_size=32",
        "data.batch_size=4",
        "trainer.max_steps=6",
        "trainer.val_check_interval=6",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "logger=csv",
        f"hydra.run.dir={run_dir}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == 6 and np.isfinite(results["val_loss"])
    assert results["baseline"]["val"]["tokens"] > 0  # the n-gram baseline on the same tokens


def prepare_script(cache: Path, corpus: Path, streaming: bool = False, **options) -> list[str]:
    """A child process that prepares data=hf for a corpus (jsonl or parquet) and prints its
    private memory before the preparation and its peak during it (MB)."""
    code = f"""
        import json, logging, os, tracemalloc
        import datasets  # imported before the first figure: its size is not the preparation's
        from lmkit.data.hf_datamodule import HFDataModule
        from lmkit.run.private_memory import PeakPrivateMemory, private_mb
        logging.basicConfig(level=logging.INFO)
        dm = HFDataModule({corpus.suffix[1:] or "parquet"!r}, data_files={str(corpus)!r},
                          tokenizer={{"kind": "word"}}, streaming={streaming},
                          block_size=16, prepare={options!r})
        before = private_mb(os.getpid())
        sampler = PeakPrivateMemory()
        tracemalloc.start()
        dm.prepare()
        python_peak = tracemalloc.get_traced_memory()[1] / 2**20
        print(json.dumps({{"before_mb": before, "peak_mb": sampler.stop(),
                          "python_peak_mb": python_peak,
                          "documents": dm.meta["splits"]["train"]["documents"]}}))
    """
    return [sys.executable, "-c", textwrap.dedent(code)]


def run_child(cmd, cache: Path, timeout=600):
    env = {**os.environ, "LMKIT_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def big_jsonl(path: Path, megabytes: int) -> Path:
    docs = documents(2000, seed=megabytes)
    doc_bytes = sum(len(d.encode()) for d in docs)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(megabytes * 2**20 // doc_bytes + 1):
            for i, doc in enumerate(docs):
                f.write(json.dumps({"text": doc, "id": i}) + "\n")
    return path


def big_parquet(folder: Path, megabytes: int) -> Path:
    """`megabytes` of documents as a dump of 2 MB parquet files (as dumps come, in many files)."""
    docs = documents(2000, seed=megabytes)
    per_file = 2 * 2**20 // sum(len(d.encode()) for d in docs) + 1
    folder.mkdir(parents=True)
    for part in range(megabytes // 2):
        pq.write_table(pa.table({"text": docs * per_file}), folder / f"part-{part:03d}.parquet")
    return folder / "*.parquet"


@pytest.mark.slow
def test_preparation_memory_does_not_grow_with_the_corpus(tmp_path):
    """A dump 4x larger prepares in the same memory: the process's peak private memory (sampled,
    imports included) within 20%, and the peak of what Python allocates (tracemalloc: the
    documents, their ids, the results in flight) within 20%. The second is the sharp one at these
    sizes: holding the encoded documents until the end adds ~20 MB to it (and ~30 MB to a
    ~400 MB process). docs/data.md: the same at 128 and 512 MB."""
    options = {"shard_tokens": 2_000_000, "workers": 1, "tokenizer_sample_bytes": 1_000_000}
    runs = {}
    for megabytes in (4, 16):
        corpus = big_parquet(tmp_path / f"dump{megabytes}", megabytes)
        script = prepare_script(tmp_path, corpus, **options)
        out = run_child(script, tmp_path / f"cache{megabytes}")
        assert out.returncode == 0, out.stderr[-3000:]
        runs[megabytes] = json.loads(out.stdout.strip().splitlines()[-1])
        assert runs[megabytes]["documents"] > megabytes * 2**20 / 200  # the whole corpus
    small, large = runs[4], runs[16]
    assert large["peak_mb"] <= 1.2 * small["peak_mb"], runs
    assert large["python_peak_mb"] <= 1.2 * small["python_peak_mb"], runs


@pytest.mark.slow
def test_a_killed_preparation_keeps_its_shards_and_resumes_exactly(tmp_path):
    corpus = big_jsonl(tmp_path / "c.jsonl", 3)
    options = {"shard_tokens": 100_000, "workers": 2, "batch_documents": 64}
    reference = run_child(prepare_script(tmp_path, corpus, **options), tmp_path / "whole")
    assert reference.returncode == 0, reference.stderr[-3000:]

    cache = tmp_path / "killed"
    child = subprocess.Popen(
        prepare_script(tmp_path, corpus, **options),
        env={**os.environ, "LMKIT_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    progress = None
    deadline = time.time() + 300
    while time.time() < deadline and child.poll() is None:
        found = list((cache / "shards").glob("*/progress.json"))
        if found and len(json.loads(found[0].read_text())["shards"]["train"]) >= 3:
            child.kill()  # SIGKILL: no clean-up
            progress = found[0]
            break
        time.sleep(0.005)
    child.wait()
    assert progress is not None, "the preparation finished before it could be killed"
    done = json.loads(progress.read_text())["shards"]["train"]
    kept = {r["file"]: (progress.parent / r["file"]).stat().st_mtime_ns for r in done}
    assert not (progress.parent / "manifest.json").exists()

    resumed = run_child(prepare_script(tmp_path, corpus, **options), cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming the preparation" in resumed.stderr
    # the finished shards were kept as they were, and the result is the uninterrupted one's
    assert {f: (progress.parent / f).stat().st_mtime_ns for f in kept} == kept
    whole = next((tmp_path / "whole" / "shards").glob("*/manifest.json"))
    finished = json.loads((progress.parent / "manifest.json").read_text())
    assert finished["splits"] == json.loads(whole.read_text())["splits"]
    for split, info in finished["splits"].items():
        for record in info["shards"]:
            a, b = (folder / record["file"] for folder in (whole.parent, progress.parent))
            assert a.read_bytes() == b.read_bytes(), (split, record["file"])


def test_config_composes_to_the_hf_data_module(tmp_path):
    cfg = compose_config("data=hf", "data.path=parquet", f"data.data_files={tmp_path}/x.parquet")
    dm = build_datamodule(cfg)
    assert isinstance(dm, HFDataModule) and dm.source.held_out() == {"val": 0.005}
    assert dm.options.shard_tokens == cfg.data.prepare.shard_tokens


def test_sharded_tokens_pickles_as_paths(parquet_corpus):
    import pickle

    dm = named_splits(parquet_corpus)
    dm.prepare()
    tokens = dm.tokens("train")
    tokens.window(0, 10)  # maps the files
    clone = pickle.loads(pickle.dumps(tokens))
    assert clone._arrays is None and isinstance(clone, ShardedTokens)
    np.testing.assert_array_equal(clone.window(5, 50), tokens.window(5, 50))


# ---- bad input: one sentence naming the problem and the fix, before any tokenization ----------


def refusal(*args, **kwargs) -> str:
    """The one-line ValueError that preparing data=hf with these options raises; no shard may
    have been written."""
    cache = Path(os.environ["LMKIT_CACHE_DIR"]) / "shards"
    before = set(cache.rglob("*.bin")) if cache.exists() else set()
    with pytest.raises(ValueError) as error:
        HFDataModule(*args, block_size=16, prepare={"workers": 1}, **kwargs).prepare()
    after = set(cache.rglob("*.bin")) if cache.exists() else set()
    assert after == before  # no shard was written
    return str(error.value)


def test_a_missing_text_column_names_the_columns(tmp_path):
    write_parquet(tmp_path / "d", TRAIN_DOCS[:50], parts=1, column="content")
    message = refusal("parquet", data_files=str(tmp_path / "d" / "*.parquet"))
    assert "has no column 'text'; its columns are ['content', 'id']" in message, message
    assert "set data.text_column" in message and "\n" not in message


def test_an_all_whitespace_source_is_refused(tmp_path):
    write_jsonl(tmp_path / "blank.jsonl", [" ", "\n\n", "\t "] * 20)
    message = refusal("json", data_files=str(tmp_path / "blank.jsonl"))
    assert "no text in column 'text'" in message and "\n" not in message, message


def test_a_glob_that_matches_nothing(tmp_path):
    message = refusal("parquet", data_files=f"{tmp_path}/nope/*.parquet")
    assert f"pattern '{tmp_path}/nope/*.parquet' matches no file" in message, message
    assert "\n" not in message


def test_mixed_encodings_name_the_file_and_offset(tmp_path):
    path = tmp_path / "mixed.jsonl"
    write_jsonl(path, TRAIN_DOCS[:20])
    with open(path, "ab") as f:
        f.write('{"text": "caf\xe9 au lait"}\n'.encode("latin-1"))
    message = refusal("json", data_files=str(path))
    offset = path.read_bytes().index(b"\xe9")  # the first byte that is not UTF-8
    assert f"mixed.jsonl is not UTF-8 throughout (byte offset {offset}:" in message, message
    assert "\n" not in message


def test_a_hub_name_that_cannot_be_reached_offline(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # the libraries read the variables once, at import (earlier tests imported them): without
    # these, the load tries the network and fails only after its retries (~20 s offline)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    message = refusal("lmkit-tests/no-such-dataset")
    assert (
        re.search(r"could not load hub dataset 'lmkit-tests/no-such-dataset'.*offline", message)
        and "\n" not in message
    ), message


def test_a_split_the_source_lacks(parquet_corpus):
    message = refusal(
        "parquet", data_files=str(parquet_corpus / "train" / "*.parquet"), val_split="valid"
    )
    assert "has no split(s) ['valid']; its splits are ['train']" in message, message


def test_a_held_out_split_shorter_than_a_window(tmp_path):
    write_jsonl(tmp_path / "few.jsonl", TRAIN_DOCS[:40])
    with pytest.raises(
        ValueError,
        match=r"tokens of split .val. .*hold out more documents \(data.holdout.val, now 1\)",
    ):
        HFDataModule(
            "json",
            data_files=str(tmp_path / "few.jsonl"),
            holdout={"val": 1},
            tokenizer={"kind": "char"},
            block_size=512,
            prepare={"workers": 1},
        ).prepare()


@pytest.mark.parametrize(
    "holdout, match",
    [
        ({"val": 1.5}, r"holdout val=1.5 is a fraction, so it must be below 1"),
        ({"val": 0}, r"no val split: give data.val_split"),
        ({"val": 0.6, "test": 0.5}, r"leave no train documents"),
    ],
)
def test_bad_holdouts(holdout, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        HFDataModule("json", data_files="x.jsonl", holdout=holdout)


def test_a_count_holdout_cannot_be_streamed():
    with pytest.raises(ValueError, match=r"give a fraction \(e.g. 0.01\) or streaming=false"):
        HFDataModule("json", data_files="x.jsonl", holdout={"val": 100}, streaming=True)


def test_the_cli_refuses_an_empty_glob_in_one_line(tmp_path):
    out = run_script(
        "scripts/prepare_data.py",
        "data=hf",
        "data.path=parquet",
        f"data.data_files={tmp_path}/none/*.parquet",
    )
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "matches no file" in errors[0] and "Traceback" not in out.stderr


def test_streaming_gives_the_same_shards(parquet_corpus):
    streamed = named_splits(parquet_corpus, streaming=True)
    stored = named_splits(parquet_corpus)
    streamed.prepare()
    stored.prepare()
    for split in ("train", "val"):
        np.testing.assert_array_equal(read_shards(streamed, split), read_shards(stored, split))


def test_bpe_vocab_size_counts_the_end_of_text_token():
    tok = train_tokenizer("bpe", TRAIN_DOCS, vocab_size=270, end_of_text=True)
    assert tok.vocab_size == 270 and tok.eot_id == 269
