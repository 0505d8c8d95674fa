"""Evaluations with rolling windows (lmkit.rolling): a whole split with every token seeing up to a
full context, and WikiText-2 article by article as lm-evaluation-harness scores it."""

from __future__ import annotations

import contextlib
import math
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from lmkit.data.corpora import data_root, read_text
from lmkit.data.tokenizers import Tokenizer, document_prefix_id
from lmkit.data.wikitext import detokenize, document_metrics, split_articles, wikitext_split_file
from lmkit.evaluation import summarize, word_perplexity
from lmkit.rolling import check_rolling, rolling_nll, rolling_windows
from lmkit.run.checkpoint import Restored

MIXED = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
FULL = ("32-true", "32")


def model_context(restored: Restored) -> int:
    """The context the model is evaluated with: the block_size it trained with, capped by a
    bounded positional embedding."""
    context = int(restored.config.data.block_size)
    max_len = getattr(restored.model, "max_len", None)
    return context if max_len is None else min(context, int(max_len))


def evaluation_device(accelerator: str) -> torch.device:
    """The device the rolling evaluations and the harness run on: the GPU where the run's
    accelerator allows one and one is present, else the CPU."""
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def check_precision_name(precision: str) -> None:
    if precision not in MIXED and precision not in FULL:
        raise ValueError(
            f"precision={precision} (the run's trainer.precision unless precision= is given) has "
            f"no rolling evaluation; pass precision=32-true or precision=bf16-mixed"
        )


def precision_context(precision: str, device: torch.device):
    """torch.autocast for a mixed precision, nothing for full precision."""
    check_precision_name(precision)
    if precision in MIXED:
        return torch.autocast(device.type, dtype=MIXED[precision])
    return contextlib.nullcontext()


def stride_evaluation(
    restored: Restored, datamodule, split: str, stride: int, *, batch_size: int, precision: str
) -> dict:
    """loss, ppl, bpb (and word_ppl where the data counts words) of a whole split with rolling
    windows of the model's block_size advancing `stride` tokens."""
    context = model_context(restored)
    check_rolling(context, stride)
    if not hasattr(datamodule, "ids"):
        raise ValueError(
            f"eval.stride scores a corpus's token stream; {type(datamodule).__name__} has "
            "independent examples instead: drop eval.stride"
        )
    tokens = torch.from_numpy(np.asarray(datamodule.ids[split], dtype=np.int64))
    started = time.perf_counter()
    nll = _score(restored, [tokens], context, stride, batch_size, precision)[0].double()
    token_bytes = torch.from_numpy(restored.tokenizer.token_bytes)
    total = float(nll.sum())
    metrics = summarize(total, nll.numel(), float(token_bytes[tokens[1:]].double().sum()))
    words = (datamodule.word_counts().get(split) or {}).get("words")
    if words:
        metrics["word_ppl"] = word_perplexity(total, words)
    return {
        "protocol": f"rolling windows of {context} tokens advancing {stride}: every token after "
        f"the first window sees >= {context - stride} tokens before it (the n-gram baseline "
        "sees its whole history)",
        **metrics,
        "tokens": nll.numel(),
        "seconds": time.perf_counter() - started,
    }


def document_evaluation(
    restored: Restored,
    split: str,
    stride: int,
    *,
    batch_size: int,
    precision: str,
    detokenized: bool = True,
) -> dict:
    """WikiText-2's articles scored as lm-evaluation-harness's `wikitext` task scores them:
    each detokenized article on its own (its first token after a newline), rolling windows
    of block_size advancing `stride`, word and byte perplexity and bits per byte.
    detokenized=False scores the articles as stored (WikiText's spaced tokens, the text a model
    trained on WikiText-2 saw), with the same counts."""
    context = model_context(restored)
    check_rolling(context, stride)
    path, variant = wikitext_split_file(data_root(), split)
    pages = split_articles(read_text(path))
    started = time.perf_counter()
    texts = [detokenize(p) for p in pages] if detokenized else pages
    streams = document_streams(restored.tokenizer, texts)
    nll = _score(restored, streams, context, stride, batch_size, precision)
    logliks = [-math.fsum(n.double().tolist()) for n in nll]
    form = "detokenized (as the harness)" if detokenized else "as stored (not detokenized)"
    return {
        "protocol": f"lm-evaluation-harness wikitext: each article {form}, scored on its own "
        f"after a newline token, rolling windows of {context} tokens advancing {stride}",
        "data": f"{path.parent.name}/{path.name} ({variant})",
        **document_metrics(logliks, pages),
        "seconds": time.perf_counter() - started,
    }


def document_streams(tokenizer: Tokenizer, documents: list[str]) -> list[torch.Tensor]:
    """[prefix token] + the document's tokens, per document."""
    prefix = [document_prefix_id(tokenizer)]
    encoded = tokenizer.encode_batch(documents)
    return [torch.tensor(prefix + ids, dtype=torch.long) for ids in encoded]


def _score(
    restored: Restored, streams, context: int, stride: int, batch_size: int, precision: str
) -> list[torch.Tensor]:
    model = restored.model
    device = next(model.parameters()).device
    total = sum(len(rolling_windows(len(s), context, stride)) for s in streams)
    with tqdm(total=total, desc="rolling windows", unit="window") as bar:
        with precision_context(precision, device):
            return rolling_nll(
                model, streams, context, stride, batch_size=batch_size, progress=bar.update
            )
