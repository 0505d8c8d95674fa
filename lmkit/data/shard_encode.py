"""The worker side of a shard preparation: encode a batch of documents into token ids, each
followed by the end-of-text id. Imports no torch, so a worker process starts in a fraction of a
second and holds a few tens of MB."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from lmkit.data.tokenizers import Tokenizer
from lmkit.words import count_words

_WORKER: dict[str, Any] = {}


def start_worker(tokenizer_json: str, dtype: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    tokenizer = Tokenizer.from_json(tokenizer_json)
    _WORKER.update(tokenizer=tokenizer, dtype=np.dtype(dtype), bytes=tokenizer.token_bytes)


def encode_documents(texts: list[str], targets: np.ndarray) -> dict[int, dict[str, Any]]:
    """Per target split code: the documents' ids (each followed by EOT) as bytes, and their
    token, byte, word and document counts. Empty documents are dropped."""
    tokenizer, dtype = _WORKER["tokenizer"], _WORKER["dtype"]
    eot = tokenizer.eot_id
    out: dict[int, dict[str, Any]] = {}
    for code in np.unique(targets):
        docs = [t for t, c in zip(texts, targets, strict=True) if c == code and t]
        ids = tokenizer.encode_batch(docs) if docs else []
        lengths = np.array([len(i) + 1 for i in ids], dtype=np.int64)
        flat = np.empty(int(lengths.sum()), dtype=dtype)
        pos = 0
        for doc_ids in ids:
            flat[pos : pos + len(doc_ids)] = doc_ids
            flat[pos + len(doc_ids)] = eot
            pos += len(doc_ids) + 1
        out[int(code)] = {
            "ids": flat.tobytes(),
            "tokens": int(flat.size),
            "bytes": int(_WORKER["bytes"][flat].sum()),
            "words": sum(count_words(d) for d in docs),
            "documents": len(docs),
        }
    return out
