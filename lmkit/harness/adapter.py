"""lm-evaluation-harness's `LM` interface on any lmkit model (pip install -e ".[eval]").

- ``loglikelihood``: the continuation's log-probability after its context, batched (longest
  first), the context cut on the left to the model's context length.
- ``loglikelihood_rolling``: a whole document in the harness's rolling windows
  (``get_rolling_token_windows``), advancing ``stride`` tokens (the model's context by default,
  as the harness's own models do), its first token conditioned on the prefix token.
- ``generate_until``: cached decoding (lmkit.decoding.sampling.generate), greedy unless the task
  asks to sample, batched over requests of equal context length and options, cut at the first
  stop string.

lmkit's tokenizers have no end-of-text token, so the prefix token (what stands before a document
or an empty context) is the newline, the separator the models saw before every line in training.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import LM
from lm_eval.models.utils import normalize_gen_kwargs
from tqdm.auto import tqdm

from lmkit.data.tokenizers import Tokenizer, document_prefix_id
from lmkit.decoding.sampling import generate

DEFAULT_MAX_GEN_TOKS = 256


class LMKitLM(LM):
    """An lmkit language model and its tokenizer as an lm-evaluation-harness model."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Tokenizer,
        *,
        max_length: int,
        stride: int | None = None,
        batch_size: int = 8,
        autocast_dtype: torch.dtype | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_length = max_length
        self.stride = max_length if stride is None else stride
        if not 1 <= self.stride <= max_length:
            raise ValueError(f"stride={stride} must be in [1, {max_length}] (the context)")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.batch_size, self.autocast_dtype, self.seed = batch_size, autocast_dtype, seed
        self.prefix_token_id = document_prefix_id(tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- the harness's three request types ----------------------------------------------
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(*req.args) for req in requests]
        return self.loglikelihood_tokens(pairs, desc="loglikelihood")

    def loglikelihood_rolling(self, requests) -> list[float]:
        context_len = self.max_length - self.stride + 1  # the harness's windows advance by this
        windows, owner = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            rolling = lm_eval_utils.get_rolling_token_windows(
                token_list=self.tokenizer.encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=context_len,
            )
            for window in map(lm_eval_utils.make_disjoint_window, rolling):
                windows.append(window)
                owner.append(i)
        totals = [0.0] * len(requests)
        scores = self.loglikelihood_tokens(windows, desc="loglikelihood_rolling")
        for i, (logprob, _) in zip(owner, scores, strict=True):
            totals[i] += logprob
        return totals

    def generate_until(self, requests) -> list[str]:
        groups: dict[tuple, list[int]] = defaultdict(list)
        encoded, options = [], []
        for i, req in enumerate(requests):
            context, kwargs = req.args
            option = generation_options(kwargs)
            keep = self.max_length - option["max_gen_toks"]
            if keep < 1:
                raise ValueError(
                    f"the task asks for {option['max_gen_toks']} new tokens, which leaves no room "
                    f"for its prompt in the model's context of {self.max_length} tokens"
                )
            ids = self.tokenizer.encode(context) or [self.prefix_token_id]
            encoded.append(ids[-keep:])
            options.append(option)
            groups[(len(encoded[-1]), repr(sorted(option.items())))].append(i)
        out = [""] * len(requests)
        for indices in tqdm(list(groups.values()), desc="generate_until", unit="group"):
            for batch in _chunks(indices, self.batch_size):
                for i, text in zip(batch, self._generate(encoded, options, batch), strict=True):
                    out[i] = text
        return out

    # ---- shared pieces ------------------------------------------------------------------
    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids, the continuation's tokens taken from the encoding of
        the whole text (so a token that spans the border is scored where it falls), trailing
        spaces of the context moved to the continuation; an empty context is the prefix token."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return [self.prefix_token_id], self.tokenizer.encode(continuation)
        whole = self.tokenizer.encode(context + continuation)
        context_ids = self.tokenizer.encode(context)
        return context_ids, whole[len(context_ids) :]

    @torch.no_grad()
    def loglikelihood_tokens(
        self, pairs: Sequence[tuple[list[int], list[int]]], desc: str = "scoring"
    ) -> list[tuple[float, bool]]:
        """(sum of log-probabilities, whether greedy decoding gives it) of each continuation
        after its context; batches of similar length, longest first."""
        for _, continuation in pairs:
            if not continuation:
                raise ValueError("a request's continuation encodes to no tokens; nothing to score")
            if len(continuation) > self.max_length:
                raise ValueError(
                    f"a continuation of {len(continuation)} tokens cannot be scored in the "
                    f"model's context of {self.max_length} tokens"
                )
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        for batch in tqdm(list(_chunks(order, self.batch_size)), desc=desc, unit="batch"):
            for i, score in zip(batch, self._score_batch([pairs[i] for i in batch]), strict=True):
                results[i] = score
        return results

    def _score_batch(self, pairs) -> list[tuple[float, bool]]:
        rows = [(ctx + cont)[-(self.max_length + 1) :][:-1] for ctx, cont in pairs]
        width = max(len(r) for r in rows)
        inputs = torch.zeros(len(rows), width, dtype=torch.long)
        for j, row in enumerate(rows):
            inputs[j, : len(row)] = torch.tensor(row)
        with self._autocast():
            logits = self.model(inputs.to(self.device))
        logprobs = F.log_softmax(logits.float(), dim=-1).cpu()
        scores = []
        for j, ((_, cont), row) in enumerate(zip(pairs, rows, strict=True)):
            positions = torch.arange(len(row) - len(cont), len(row))
            target = torch.tensor(cont)
            token_logprobs = logprobs[j, positions, target]
            greedy = bool((logprobs[j, positions].argmax(-1) == target).all())
            scores.append((float(token_logprobs.double().sum()), greedy))
        return scores

    def _generate(self, encoded: list[list[int]], options: list[dict], batch: list[int]):
        option = options[batch[0]]
        prompt = torch.tensor([encoded[i] for i in batch], device=self.device)
        with self._autocast():
            tokens = generate(
                self.model,
                prompt,
                option["max_gen_toks"],
                temperature=option["temperature"],
                generator=torch.Generator(device=self.device).manual_seed(self.seed),
            )
        texts = [self.tokenizer.decode(row[prompt.shape[1] :].tolist()) for row in tokens]
        return [cut_at_stop(text, option["until"]) for text in texts]

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def generation_options(kwargs: dict) -> dict:
    """until (stop strings), max_gen_toks and temperature (0: greedy) from a task's generation
    kwargs, read as the harness's own models read them (normalize_gen_kwargs: its aliases of
    max_gen_toks, and sampling when do_sample is set or a temperature is given without it)."""
    kwargs = normalize_gen_kwargs(dict(kwargs or {}), DEFAULT_MAX_GEN_TOKS)
    until = kwargs.get("until") or []
    return {
        "until": tuple(until),
        "max_gen_toks": int(kwargs["max_gen_toks"]),
        "temperature": float(kwargs.get("temperature") or 0.0) if kwargs["do_sample"] else 0.0,
    }


def cut_at_stop(text: str, until: Iterable[str]) -> str:
    """The text up to the first occurrence of any stop string."""
    cut = len(text)
    for stop in until:
        at = text.find(stop) if stop else -1
        if at >= 0:
            cut = min(cut, at)
    return text[:cut]


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]
