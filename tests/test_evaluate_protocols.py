"""scripts/evaluate.py's protocols on a model trained on WikiText-2: rolling windows next to the
fixed ones, and the articles scored as lm-evaluation-harness's wikitext task scores them (checked
against that task itself, run through the harness on the same articles)."""

from __future__ import annotations

import json
import math

import lm_eval
import pytest
from lm_eval.tasks import TaskManager
from support import compose_config

from lmkit.data.corpora import data_root, read_text
from lmkit.data.wikitext import split_articles, wikitext_split_file
from lmkit.run.build import build_datamodule
from lmkit.run.checkpoint import restore
from lmkit.run.evaluate import evaluate_checkpoint
from lmkit.run.harness import harness_model
from lmkit.run.train import train

pytestmark = pytest.mark.slow
BLOCK = 128


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("wikitext") / "run"
    cfg = compose_config(
        "data=wikitext2",
        f"data.block_size={BLOCK}",
        "trainer.max_steps=40",
        "trainer.val_check_interval=40",
        "optim.optimizer.lr=3e-3",
        "ngram.enabled=false",
        run_dir=run_dir,
    )
    train(cfg)
    return str(run_dir / "checkpoints" / "last.ckpt")


@pytest.fixture(scope="module")
def evaluated(ckpt):
    return evaluate_checkpoint(ckpt, "val", stride=BLOCK, documents=True, batch_size=32)


def test_every_figure_names_its_protocol(evaluated):
    assert "non-overlapping windows of 128" in evaluated["protocol"]
    assert "advancing 128" in evaluated["stride"]["protocol"]
    assert "lm-evaluation-harness wikitext" in evaluated["documents"]["protocol"]
    assert "wikitext-2/valid.txt (wikitext-2-v1 (tokenized" in evaluated["documents"]["data"]
    for section in (evaluated, evaluated["stride"], evaluated["documents"]):
        assert section["seconds"] > 0


def test_stride_of_a_whole_window_is_the_fixed_windows(ckpt, evaluated):
    # the same windows but the last (which the rolling evaluation fills with context)
    stride = evaluated["stride"]
    assert math.isclose(stride["loss"], evaluated["loss"], rel_tol=2e-3)
    datamodule = build_datamodule(restore(ckpt).config)
    datamodule.prepare()
    words = datamodule.word_counts()["val"]
    assert stride["tokens"] == words["scored_tokens"]  # every val token but the first, once
    total = stride["loss"] * stride["tokens"]
    assert math.isclose(stride["word_ppl"], math.exp(total / words["words"]), rel_tol=1e-9)


def test_documents_equal_the_harness_wikitext_task_on_the_same_articles(ckpt, evaluated, tmp_path):
    path, _ = wikitext_split_file(data_root(), "val")
    pages = split_articles(read_text(path))
    folder = _wikitext_task_on(pages, tmp_path)
    model = harness_model(restore(ckpt), stride=None, batch_size=32, precision=None, seed=0)
    out = lm_eval.simple_evaluate(
        model=model,
        tasks=["lmkit_wikitext"],
        task_manager=TaskManager(include_path=str(folder)),
        bootstrap_iters=0,
    )
    harness = out["results"]["lmkit_wikitext"]
    ours = evaluated["documents"]
    assert ours["documents"] == len(pages) == 60
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert math.isclose(ours[metric], harness[f"{metric},none"], rel_tol=1e-5), metric


def _wikitext_task_on(pages: list[str], folder) -> object:
    """The harness's own wikitext task (its detokenizer and word/byte counts) over local pages."""
    (folder / "pages.jsonl").write_text("".join(json.dumps({"page": p}) + "\n" for p in pages))
    (folder / "wikitext_local.py").write_text(
        "from lm_eval.tasks.wikitext.preprocess_wikitext import (  # noqa: F401\n"
        "    process_results, wikitext_detokenizer)\n"
    )
    (folder / "wikitext_local.yaml").write_text(
        "task: lmkit_wikitext\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {folder}/pages.jsonl\n"
        "validation_split: validation\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: !function wikitext_local.wikitext_detokenizer\n"
        "process_results: !function wikitext_local.process_results\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
        "  - metric: bits_per_byte\n"
    )
    return folder


def test_rolling_options_are_checked_before_any_work(ckpt):
    with pytest.raises(ValueError, match="drop limit_batches"):
        evaluate_checkpoint(ckpt, stride=16, limit_batches=2)
    with pytest.raises(ValueError, match="eval.stride=0"):
        evaluate_checkpoint(ckpt, stride=0)
