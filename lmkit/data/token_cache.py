"""The token cache of a corpus: its fingerprint, its meta.json, encoding the splits, and the
char vocabulary's count of characters that only val or test has."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers as hf_tokenizers

from lmkit.data.corpora import Corpus
from lmkit.data.tokenizers import Tokenizer

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the cache layout or the tokenization changes
ENCODE_BATCH_LINES = 1000


def cache_fingerprint(corpus: Corpus, shas: dict[Path, str], tok: dict[str, Any]) -> str:
    key = {
        "version": CACHE_VERSION,
        "tokenizers": hf_tokenizers.__version__,
        "splits": {
            split: [shas[src.path], src.start, src.stop]
            for split, src in sorted(corpus.splits.items())
        },
        "tokenizer": [tok["kind"], tok["vocab_size"]],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def unseen_chars(tokenizer: Tokenizer, ids: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Per split other than train: how many of its characters never occur in the train split
    (``count``) and which (``chars``, sorted, at most 20)."""
    seen = np.bincount(np.asarray(ids["train"]), minlength=tokenizer.vocab_size) > 0
    out = {}
    for split, split_ids in ids.items():
        if split == "train":
            continue
        split_ids = np.asarray(split_ids)
        unseen = ~seen[split_ids]
        chars = [tokenizer.decode([i]) for i in np.unique(split_ids[unseen])]
        out[split] = {"count": int(unseen.sum()), "chars": chars[:20]}
    return out


def log_unseen_chars(unseen: Mapping[str, Any], corpus: str) -> None:
    """One line per preparation: the characters of each split that train lacks (a warning when
    there are some: the model is scored on characters it never saw as a target)."""
    if not unseen:
        return
    parts = [
        f"{split} {u['count']}" + (f" ({u['chars']!r})" if u["count"] else "")
        for split, u in unseen.items()
    ]
    if any(u["count"] for u in unseen.values()):
        log.warning(
            "characters of %s that never occur in the train split: %s; they are in the char "
            "vocabulary (built from every split) and scored at their true UTF-8 bytes, as "
            "tokens the model never saw in training",
            corpus,
            ", ".join(parts),
        )
    else:
        log.info(
            "characters of %s that never occur in the train split: %s", corpus, ", ".join(parts)
        )


def read_meta(cache_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    """The cache's meta.json when the cache is complete and consistent, else None."""
    try:
        meta = json.loads((cache_dir / "meta.json").read_text())
        if meta["fingerprint"] != fingerprint or not (cache_dir / "tokenizer.json").is_file():
            return None
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split, n in meta["tokens"].items():
            if (cache_dir / f"{split}.bin").stat().st_size != n * itemsize:
                return None
    except (OSError, ValueError, KeyError):
        return None
    return meta


def encode(ds: Any, tokenizer: Tokenizer, split: str, fingerprint: str) -> np.ndarray:
    """Token ids of a split's lines, concatenated (equal to encoding the whole text)."""
    encoded = ds.map(
        lambda batch: {"ids": tokenizer.encode_batch(batch["text"])},
        batched=True,
        batch_size=ENCODE_BATCH_LINES,
        remove_columns=["text"],
        keep_in_memory=True,
        new_fingerprint=f"lmkit-{fingerprint}-{split}",
        desc=f"tokenizing {split}",
    )
    chunks = [c.flatten().to_numpy() for c in encoded.data.column("ids").chunks]
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
