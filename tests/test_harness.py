"""lm-evaluation-harness on lmkit models, offline: local tasks (multiple choice and rolling
log-likelihood) run through lm_eval.simple_evaluate with the adapter, checked against lmkit's own
rolling evaluation and against slow one-sequence-at-a-time references."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import lm_eval
import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager
from omegaconf import OmegaConf
from support import REPO, compose_config

from lmkit.data.corpora import data_root, read_text
from lmkit.data.wikitext import harness_words
from lmkit.errors import MissingExtraError
from lmkit.rolling import rolling_nll
from lmkit.run import harness
from lmkit.run.checkpoint import restore
from lmkit.run.evaluate import evaluate_checkpoint
from lmkit.run.export import export_folder
from lmkit.run.harness import harness_model
from lmkit.run.rolling_eval import document_streams
from lmkit.run.train import train

pytestmark = pytest.mark.slow
CONTEXT = 32  # the tiny model's block_size


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("harness") / "run"
    cfg = compose_config(
        "trainer.max_steps=30",
        "trainer.val_check_interval=30",
        "ngram.enabled=false",
        "optim.optimizer.lr=3e-3",
        run_dir=run_dir,
    )
    train(cfg)
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def restored(ckpt):
    return restore(ckpt)


@pytest.fixture(scope="module")
def shakespeare():
    return read_text(data_root() / "tinyshakespeare" / "input.txt")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, shakespeare):
    """A folder of two task YAMLs over local JSON lines: documents, and multiple choice."""
    folder = tmp_path_factory.mktemp("tasks")
    starts = [0, 500, 1000, 3000, 7000, 9000]
    docs = [
        {"page": shakespeare[s : s + n]}
        for s, n in zip(starts, (9, 31, 32, 33, 120, 301), strict=True)
    ]
    questions = [
        {
            "context": shakespeare[s : s + 18],
            "choices": [shakespeare[s + 18 : s + 28], "xq zzv kkk", shakespeare[s + 900 : s + 910]],
            "label": 0,
        }  # fits in 32 tokens
        for s in (100, 2000, 4000, 6000, 8000, 12000)
    ]
    for name, rows in (("docs", docs), ("mc", questions)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "docs.yaml").write_text(
        f"task: lmkit_docs\n{common}dataset_kwargs:\n  data_files:\n    test: {folder}/docs.jsonl\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{page}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
        "  - metric: bits_per_byte\n"
    )
    (folder / "mc.yaml").write_text(
        f"task: lmkit_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {folder}/mc.jsonl\n"
        "output_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n"
    )
    return folder, docs, questions


def evaluate(model, folder, task: str) -> dict:
    return lm_eval.simple_evaluate(
        model=model,
        tasks=[task],
        task_manager=TaskManager(include_path=str(folder)),
        bootstrap_iters=0,
        log_samples=True,
    )


@pytest.mark.parametrize("stride", [None, 8])
def test_rolling_loglikelihood_equals_lmkits_rolling_evaluation(restored, tasks, stride):
    folder, docs, _ = tasks
    model = harness_model(restored, stride=stride, batch_size=4, precision="32-true", seed=0)
    out = evaluate(model, folder, "lmkit_docs")
    samples = sorted(out["samples"]["lmkit_docs"], key=lambda s: s["doc_id"])
    pages = [d["page"] for d in docs]
    streams = document_streams(restored.tokenizer, pages)
    ours = rolling_nll(restored.model, streams, CONTEXT, stride or CONTEXT, batch_size=3)
    for sample, nll in zip(samples, ours, strict=True):
        harness = sample["filtered_resps"][0]
        harness = harness[0] if isinstance(harness, (list, tuple)) else harness
        assert math.isclose(harness, -float(nll.double().sum()), rel_tol=1e-5), sample["doc_id"]
    words = sum(harness_words(p) for p in pages)  # re.split(r"\s+", page), as the harness
    total = sum(-float(n.double().sum()) for n in ours)
    metrics = out["results"]["lmkit_docs"]
    assert math.isclose(metrics["word_perplexity,none"], math.exp(-total / words), rel_tol=1e-5)


def slow_loglikelihood(restored, context: str, continuation: str) -> float:
    """Sum of log-probabilities of the continuation's tokens, one whole sequence at a time. As
    the harness's Hugging Face model does, whitespace that ends the context is scored with the
    continuation."""
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped) :] + continuation
    tok = restored.tokenizer
    ctx, cont = tok.encode(context), tok.encode(continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = torch.log_softmax(restored.model(ids[:, :-1])[0], -1)
    return float(sum(logprobs[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def test_multiple_choice_matches_a_slow_reference(restored, tasks):
    folder, _, questions = tasks
    model = harness_model(restored, stride=None, batch_size=4, precision="32-true", seed=0)
    out = evaluate(model, folder, "lmkit_mc")
    samples = sorted(out["samples"]["lmkit_mc"], key=lambda s: s["doc_id"])
    hits = 0
    for sample, q in zip(samples, questions, strict=True):
        # the harness puts a space between context and choice (target_delimiter)
        expected = [slow_loglikelihood(restored, q["context"], " " + c) for c in q["choices"]]
        got = [r[0] for r in sample["filtered_resps"]]
        assert got == pytest.approx(expected, rel=1e-5)
        hits += max(range(3), key=lambda i: expected[i]) == q["label"]
    assert out["results"]["lmkit_mc"]["acc,none"] == pytest.approx(hits / len(questions))


def test_generate_until_is_greedy_decoding_cut_at_the_stop(restored, shakespeare):
    model = harness_model(restored, stride=None, batch_size=2, precision="32-true", seed=0)
    prompts = [shakespeare[0:20], shakespeare[40:60], shakespeare[100:110]]  # two of one length
    until = [" ", "\n"]
    requests = [
        Instance("generate_until", {}, (p, {"until": until, "max_gen_toks": 12}), i)
        for i, p in enumerate(prompts)
    ]
    tok, cut = restored.tokenizer, 0
    for prompt, text in zip(prompts, model.generate_until(requests), strict=True):
        ids = tok.encode(prompt)
        with torch.no_grad():  # greedy without caches: the whole sequence each step
            for _ in range(12):
                ids.append(int(restored.model(torch.tensor([ids]))[0, -1].argmax()))
        full = tok.decode(ids[len(tok.encode(prompt)) :])
        stops = [full.index(s) for s in until if s in full]
        assert text == full[: min(stops, default=len(full))]
        cut += bool(stops)
    assert cut, "no continuation reached a stop string: the test would not see the cut"


def test_empty_context_is_the_prefix_token(restored):
    model = harness_model(restored, stride=None, batch_size=2, precision="32-true", seed=0)
    context, continuation = model.encode_pair("", "First")
    assert context == restored.tokenizer.encode("\n")
    ((score, _),) = model.loglikelihood_tokens([(context, continuation)])
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(restored.model(ids)[0], -1)
    expected = sum(float(logprobs[i, t]) for i, t in enumerate(continuation))
    assert score == pytest.approx(expected, rel=1e-5)


def test_lm_eval_script_runs_a_local_task_on_an_exported_folder(ckpt, tasks, tmp_path):
    folder, _, _ = tasks
    model = export_folder(ckpt, tmp_path / "model")
    out = subprocess.run(
        [
            sys.executable,
            "scripts/lm_eval.py",
            f"ckpt={model}",
            "tasks=[lmkit_docs]",
            f"include_path={folder}",
            "bootstrap_iters=0",
            "stride=8",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["stride"] == 8 and result["context"] == CONTEXT
    assert result["results"]["lmkit_docs"]["word_perplexity,none"] > 1
    with pytest.raises(ValueError, match=r"unknown lm-eval task\(s\) \['no_such_task'\]"):
        harness.run_harness(
            OmegaConf.create({"ckpt": str(model), "tasks": ["no_such_task"], "include_path": None})
        )


def test_without_the_eval_extra_the_script_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(harness, "lm_eval", None)
    with pytest.raises(MissingExtraError, match=r'pip install -e "\.\[eval\]"'):
        harness.run_harness(OmegaConf.create({"tasks": ["wikitext"]}))


def test_a_context_longer_than_the_model_is_cut_on_the_left(restored, shakespeare):
    model = harness_model(restored, stride=None, batch_size=3, precision="32-true", seed=0)
    tok = restored.tokenizer
    pairs = [
        (tok.encode(shakespeare[s : s + n]), tok.encode(shakespeare[s + n : s + n + 6]))
        for s, n in ((0, 80), (300, 31), (900, 200))
    ]  # 80 and 200 tokens: past the 32
    for (context, continuation), (score, _) in zip(
        pairs, model.loglikelihood_tokens(pairs), strict=True
    ):
        inputs = (context + continuation)[:-1][-CONTEXT:]  # the last 32 tokens before each target
        with torch.no_grad():
            logprobs = torch.log_softmax(restored.model(torch.tensor([inputs]))[0], -1)
        first = len(inputs) - len(continuation)
        expected = sum(float(logprobs[first + i, t]) for i, t in enumerate(continuation))
        assert score == pytest.approx(expected, rel=1e-5)


def test_bf16_autocast_scores_close_to_fp32(restored, shakespeare):
    tok = restored.tokenizer
    pairs = [(tok.encode(shakespeare[:20]), tok.encode(shakespeare[20:30]))]
    scores = {
        precision: harness_model(
            restored, stride=None, batch_size=1, precision=precision, seed=0
        ).loglikelihood_tokens(pairs)[0][0]
        for precision in ("32-true", "bf16-mixed")
    }
    assert scores["bf16-mixed"] != scores["32-true"]  # autocast did run
    assert scores["bf16-mixed"] == pytest.approx(scores["32-true"], rel=3e-2)


def test_requests_the_model_cannot_serve_are_one_clear_error(restored, ckpt):
    model = harness_model(restored, stride=None, batch_size=1, precision="32-true", seed=0)
    request = Instance("generate_until", {}, ("ROMEO:", {"until": ["\n"], "max_gen_toks": 32}), 0)
    with pytest.raises(ValueError, match="asks for 32 new tokens"):
        model.generate_until([request])
    with pytest.raises(ValueError, match=r"stride=0 must be in \[1, 32\]"):
        harness_model(restored, stride=0, batch_size=1, precision="32-true", seed=0)
    with pytest.raises(ValueError, match="scores WikiText-2's articles"):
        evaluate_checkpoint(str(ckpt), documents=True)
    with pytest.raises(ValueError, match="precision=bf16-true"):
        evaluate_checkpoint(str(ckpt), stride=8, precision="bf16-true")
    with pytest.raises(ValueError, match=r"eval.stride=33 must be in \[1, 32\]"):
        evaluate_checkpoint(str(ckpt), stride=33)
