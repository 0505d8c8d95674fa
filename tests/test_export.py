"""Model folders: checkpoint -> folder -> model gives the same logits for every mixer, Medusa and
hourglass models; transformers loads the tokenizer and encodes as lmkit does; the model card
carries the run's figures; bad options fail before any work, and never overwrite a folder."""

from __future__ import annotations

import json
import os

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors import safe_open
from support import CONF, compose_config
from transformers import PreTrainedTokenizerFast

from lmkit.data.tokenizers import train_tokenizer
from lmkit.run.checkpoint import restore
from lmkit.run.evaluate import evaluate_checkpoint
from lmkit.run.export import export_folder
from lmkit.run.generate import generate_texts
from lmkit.run.train import train

pytestmark = pytest.mark.slow
MIXERS = sorted(p.stem for p in (CONF / "model" / "mixer").glob("*.yaml"))
SHORT = ["trainer.max_steps=2", "trainer.val_check_interval=2", "ngram.enabled=false"]
MODELS = {
    **{mixer: [f"model/mixer={mixer}"] for mixer in MIXERS},
    "hourglass": ["model=hourglass", "model.num_layers=4"],
    "medusa": ["task=medusa", "task.heads=2"],
    "untied_learned": ["model.tie_weights=false", "model/embedding=learned"],
}
TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\n  It is the east.\n"


def trained(tmp_path, *overrides: str) -> tuple:
    run_dir = tmp_path / "run"
    cfg = compose_config(*SHORT, *overrides, run_dir=run_dir)
    if cfg.model.get("mixer", {}).get("chunk_size") is not None:
        cfg.model.mixer.chunk_size = 8  # several chunks per 32-token window
    train(cfg)
    return run_dir / "checkpoints" / "last.ckpt", run_dir


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """One tiny softmax run shared by the tests that only read its checkpoint."""
    return trained(tmp_path_factory.mktemp("softmax"))[0]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_folder_gives_the_checkpoints_logits(name, tmp_path):
    ckpt, _ = trained(tmp_path, *MODELS[name])
    folder = export_folder(ckpt, tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    original, loaded = restore(ckpt), restore(folder)
    assert type(loaded.model) is type(original.model)
    fast = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    assert fast(TEXT)["input_ids"] == original.tokenizer.encode(TEXT)
    idx = torch.tensor([original.tokenizer.encode(TEXT)[:32]])
    with torch.no_grad():
        assert torch.equal(loaded.model(idx), original.model(idx))
    for key, value in original.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    if name == "medusa":  # the draft heads travel too
        with torch.no_grad():
            h = original.model.hidden_states(idx)
            assert torch.equal(loaded.model.heads(h), original.model.heads(h))


def test_tied_weights_are_stored_once_and_shared_again(ckpt, tmp_path):
    folder = export_folder(ckpt, tmp_path / "model")
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert len(keys & {"embedding.token.weight", "head.proj.weight"}) == 1, keys
    model = restore(folder).model
    assert model.head.proj.weight is model.embedding.token.weight


def test_config_json_and_model_card_carry_the_run(tmp_path, monkeypatch):
    # a cache of its own: the n-gram tests expect to fit their baselines first
    monkeypatch.setenv("LMKIT_CACHE_DIR", str(tmp_path / "cache"))
    ckpt, run_dir = trained(tmp_path, "ngram.enabled=true", "ngram.order=3")
    results = json.loads((run_dir / "results.json").read_text())
    folder = export_folder(ckpt, tmp_path / "model")
    spec = json.loads((folder / "config.json").read_text())
    assert spec["format"] == "lmkit" and spec["lmkit_version"]
    assert spec["model"]["d_model"] == 32 and spec["vocab_size"] == 65
    assert spec["global_step"] == 2 and spec["tokens_seen"] == 2 * 4 * 32  # steps x batch x T
    assert spec["tokens_seen"] == results["tokens"]
    card = (folder / "README.md").read_text()
    assert "library_name: lmkit" in card and "SoftmaxAttention" in card
    assert f"{results['val_loss']:,.4g}" in card  # the run's val loss
    assert f"{results['baseline']['val']['loss']:,.4g}" in card  # and its n-gram baseline's
    assert "256 tokens" in card  # tokens seen


def test_evaluate_and_generate_take_the_folder_as_the_checkpoint(ckpt, tmp_path):
    folder = export_folder(ckpt, tmp_path / "model")
    from_ckpt = evaluate_checkpoint(str(ckpt), limit_batches=3)
    from_folder = evaluate_checkpoint(str(folder), limit_batches=3)
    assert from_folder["loss"] == from_ckpt["loss"] and from_folder["bpb"] == from_ckpt["bpb"]
    options = compose_generate("prompt=ROMEO:", "max_new_tokens=20", "num_samples=2")
    texts = {
        str(path): generate_texts(OmegaConf.merge(options, {"ckpt": str(path)}))
        for path in (ckpt, folder)
    }
    assert texts[str(ckpt)] == texts[str(folder)] and len(texts[str(ckpt)]) == 2


def compose_generate(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("generate", overrides=["ckpt=unused", *overrides])


@pytest.mark.parametrize("kind", ["char", "bpe", "word"])
def test_transformers_encodes_like_lmkit(kind, tmp_path):
    corpus = (CONF.parent / "README.md").read_text() + TEXT
    tokenizer = train_tokenizer(kind, corpus, vocab_size=300 if kind == "bpe" else None)
    tokenizer.save(tmp_path / "tokenizer.json")
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert fast(TEXT)["input_ids"] == tokenizer.encode(TEXT)
    assert len(fast) == tokenizer.vocab_size


def test_an_existing_folder_of_other_files_is_refused_untouched(ckpt, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="notes.txt"):
        export_folder(ckpt, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    export_folder(ckpt, tmp_path / "model")
    folder = export_folder(ckpt, tmp_path / "model")  # an earlier export is replaced
    umask = os.umask(0)
    os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700
    assert (folder / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(ValueError, match="repo_id"):
        export_folder(ckpt, tmp_path / "model", push=True)


def test_push_offline_fails_with_one_line_and_keeps_the_folder(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError, match="the folder is written") as err:
        export_folder(ckpt, tmp_path / "model", push=True, repo_id="someone/tiny")
    assert "\n" not in str(err.value)
    assert restore(tmp_path / "model").global_step == 2


def test_a_folder_not_written_by_lmkit_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match="not a model folder written by lmkit"):
        restore(tmp_path)
