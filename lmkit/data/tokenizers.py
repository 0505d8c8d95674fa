"""Character-level, byte-level BPE and word-level tokenizers, built with the ``tokenizers`` library.

- ``char``: one token per character of the text it is trained on, ids in sorted character
  order (nanoGPT's ``stoi``). The data module trains it on every split of the corpus, as nanoGPT
  builds its vocabulary from the whole file, so any UTF-8 text trains and evaluates even when
  val has a character train lacks (it is scored like any other, never seen in training); for
  Tiny Shakespeare and WikiText-2, whose val and test characters all occur in train, this is the
  train split's vocabulary (Tiny Shakespeare's familiar 65 ids). There is no ``<unk>``: one id
  per character keeps decoding lossless and the UTF-8 bytes of every id exact (bits per byte),
  and a character outside the corpus (e.g. in a sampling prompt) raises ValueError at encode
  time rather than being hidden.
- ``bpe``: byte-level BPE (GPT-2 pre-tokenization and byte alphabet, all 256 bytes in the
  initial alphabet) that round-trips any text. Text is first split after every ``\\n``, so a
  token never spans a line break: encoding line by line gives the same ids as encoding the whole
  text at once, which is what lets the data path tokenize with ``datasets.map`` in batches of
  lines.
- ``word``: the whitespace-separated words of the training text plus the end of line ``\\n`` as
  a token of its own; any other word encodes as ``<unk>`` (always in the vocabulary). On
  WikiText-2 this is the standard word-level setup (PyTorch's word_language_model: 33,278
  types, ``\\n`` playing ``<eos>``), so perplexities compare with the literature. Ids are in
  order of decreasing train frequency (ties by the word's code points), ``<unk>`` and ``\\n``
  first. Decoding joins tokens with single spaces.

Trained with ``end_of_text=True`` (corpora of many documents, ``data=hf``), each kind also knows
``<|endoftext|>`` as a special token (``Tokenizer.eot_id``, the last id; 0 bytes): the data path
puts it after every document, so a window that crosses a document boundary holds it. Text of a
single document (Tiny Shakespeare, WikiText-2, local files) has none, keeping their vocabularies
those of the literature.

All save as a standard ``tokenizer.json``; the kind is read back from its decoder (char:
``Fuse``, bpe: ``ByteLevel``, word: none, which joins tokens with spaces).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

KINDS = ("char", "bpe", "word")
_MIN_BPE_VOCAB = 256  # the byte alphabet
UNK = "<unk>"  # the word tokenizer's token for words not in its vocabulary
EOL = "\n"  # the word tokenizer's end-of-line token
EOT = "<|endoftext|>"  # the end-of-document special token (GPT-2's spelling)


class Tokenizer:
    """A trained tokenizer: ``encode``/``decode`` plus what training and evaluation need.

    ``token_bytes[i]`` is the number of UTF-8 bytes token ``i`` stands for; summed over the
    tokens of a text it equals ``len(text.encode())``, which is what bits per byte divide by.
    For ``word`` the spaces are not in the tokens, so each token counts its UTF-8 bytes plus one
    byte for the single space that separates it from the next token (``\\n`` counts 2, ``<unk>``
    6): exact for text spaced like WikiText (``" w1 w2 ... wn \\n"`` per line), otherwise the
    bytes of the text with every run of spaces made one space and out-of-vocabulary words
    counted as ``<unk>``.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"tokenizer kind={kind!r} is unknown; choose one of {list(KINDS)}")
        self.tokenizer, self.kind = tokenizer, kind
        self._token_bytes: np.ndarray | None = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int | None:
        """The id of the end-of-document token, or None for a tokenizer trained without it."""
        return self.tokenizer.token_to_id(EOT)

    def encode(self, text: str) -> list[int]:
        try:
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        except Exception as e:
            raise self._encode_error([text], e) from e

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        try:
            encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        except Exception as e:
            raise self._encode_error(texts, e) from e
        return [enc.ids for enc in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def token_bytes(self) -> np.ndarray:
        """[V] int64: UTF-8 bytes of each token (0 for special tokens)."""
        if self._token_bytes is None:
            special = {t.content for t in self.tokenizer.get_added_tokens_decoder().values()}
            alphabet = set(pre_tokenizers.ByteLevel.alphabet())
            sizes = np.zeros(self.vocab_size, dtype=np.int64)
            for token, i in self.tokenizer.get_vocab(with_added_tokens=True).items():
                if token in special:
                    continue
                if self.kind == "bpe":
                    # a byte-level token is a string of byte symbols, one symbol per byte; a
                    # decode would be lossy for tokens that hold part of a character
                    assert set(token) <= alphabet, f"token {token!r} is not byte-level"
                    sizes[i] = len(token)
                elif self.kind == "word":
                    sizes[i] = len(token.encode("utf-8")) + 1  # + its separating space
                else:
                    sizes[i] = len(token.encode("utf-8"))
            self._token_bytes = sizes
        return self._token_bytes

    def to_json(self) -> str:
        """The standard ``tokenizer.json`` text (loadable by ``tokenizers.Tokenizer``)."""
        return self.tokenizer.to_str()

    @classmethod
    def from_json(cls, s: str) -> Tokenizer:
        tokenizer = tokenizers.Tokenizer.from_str(s)
        spec = json.loads(s)
        decoder = spec.get("decoder") or {}
        kinds = {"Fuse": "char", "ByteLevel": "bpe"}
        if not decoder and (spec.get("model") or {}).get("type") == "WordLevel":
            return cls(tokenizer, "word")
        if decoder.get("type") not in kinds:
            raise ValueError(
                f"tokenizer.json with decoder {decoder.get('type')!r} was not made by lmkit; "
                "train one with lmkit.data.tokenizers.train_tokenizer"
            )
        return cls(tokenizer, kinds[decoder["type"]])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"

    def _encode_error(self, texts: Iterable[str], error: Exception) -> Exception:
        if self.kind != "char":
            return error
        vocab = self.tokenizer.get_vocab()
        unknown = sorted({c for text in texts for c in set(text)} - vocab.keys())
        if not unknown:
            return error
        return ValueError(
            f"characters {unknown[:10]!r} are not in the char vocabulary of {self.vocab_size} "
            "characters of the corpus it was trained on; train the tokenizer on text that "
            "contains them or use tokenizer=bpe, which encodes any text."
        )


def check_tokenizer_config(kind: str, vocab_size: int | None) -> None:
    """Raise ValueError (one sentence) for an unusable tokenizer configuration."""
    if kind not in KINDS:
        raise ValueError(f"tokenizer kind={kind!r} is unknown; choose one of {list(KINDS)}")
    if kind in ("char", "word") and vocab_size is not None:
        raise ValueError(
            f"tokenizer kind={kind!r} takes its vocabulary from the train text, so "
            f"vocab_size={vocab_size} cannot be honoured; remove vocab_size or use kind='bpe'"
        )
    if kind == "bpe" and (not isinstance(vocab_size, int) or vocab_size < _MIN_BPE_VOCAB):
        raise ValueError(
            f"tokenizer kind='bpe' needs an integer vocab_size >= {_MIN_BPE_VOCAB} (the byte "
            f"alphabet), got vocab_size={vocab_size!r}; e.g. vocab_size=4096"
        )


def train_tokenizer(
    kind: str,
    texts: str | Iterable[str],
    *,
    vocab_size: int | None = None,
    end_of_text: bool = False,
) -> Tokenizer:
    """Train a ``char``, ``bpe`` or ``word`` tokenizer on a text or an iterable of texts (e.g.
    lines).

    ``vocab_size`` is the BPE target including the special token (the result is smaller when the
    text has fewer merges to learn); ``char`` and ``word`` take no vocab_size. ``end_of_text``
    adds ``<|endoftext|>`` as a special token with the last id. Training is deterministic.
    """
    check_tokenizer_config(kind, vocab_size)
    if isinstance(texts, str):
        texts = [texts]
    bpe_target = vocab_size - 1 if end_of_text and vocab_size else vocab_size  # room for EOT
    tokenizer = _train(kind, texts, bpe_target)
    if end_of_text:
        if EOT in tokenizer.tokenizer.get_vocab(with_added_tokens=True):
            raise ValueError(f"the tokenizer already has {EOT!r} as a token of the text")
        # an added special token takes the next id: the last one
        tokenizer.tokenizer.add_special_tokens([tokenizers.AddedToken(EOT, special=True)])
        tokenizer._token_bytes = None
    return tokenizer


def _train(kind: str, texts: Iterable[str], vocab_size: int | None) -> Tokenizer:
    if kind == "char":
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        if not chars:
            raise ValueError("cannot train a char tokenizer on empty text; give non-empty text")
        vocab = {c: i for i, c in enumerate(sorted(chars))}
        tokenizer = tokenizers.Tokenizer(models.WordLevel(vocab))
        # every character is its own pre-token; [\s\S] also matches newlines
        tokenizer.pre_tokenizer = pre_tokenizers.Split(
            tokenizers.Regex(r"[\s\S]"), behavior="isolated"
        )
        tokenizer.decoder = decoders.Fuse()  # concatenate, no spaces between tokens
        return Tokenizer(tokenizer, "char")
    if kind == "word":
        return _train_word(texts)

    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # end a pre-token after every newline so tokens never span lines (see module doc)
            pre_tokenizers.Split("\n", behavior="merged_with_previous"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=True,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tokenizer, "bpe")


def _word_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # drop runs of whitespace other than newlines, then make every newline its own token
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(r"[^\S\n]+"), behavior="removed"),
            pre_tokenizers.Split(EOL, behavior="isolated"),
        ]
    )


def _train_word(texts: Iterable[str]) -> Tokenizer:
    pre_tokenizer = _word_pre_tokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        # the tokenizer's own pre-tokenizer, so training and encoding split words the same way
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(text))
    if not counts:
        raise ValueError("cannot train a word tokenizer on text without words; give non-empty text")
    for reserved in (UNK, EOL, EOT):  # ids of their own (EOT only when end_of_text)
        counts.pop(reserved, None)
    words = sorted(counts, key=lambda w: (-counts[w], w))
    vocab = {w: i for i, w in enumerate([UNK, EOL, *words])}
    tokenizer = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizer
    # no decoder: decoding joins the tokens with single spaces
    return Tokenizer(tokenizer, "word")


# The text that stands before a document's first token (lmkit's tokenizers have no end-of-text
# token): a newline, the separator the models saw before every line and article in training.
DOCUMENT_PREFIX = "\n"


def document_prefix_id(tokenizer: Tokenizer) -> int:
    """The id of DOCUMENT_PREFIX, which conditions a document's (or empty context's) first token."""
    ids = tokenizer.encode(DOCUMENT_PREFIX)
    if len(ids) != 1:
        raise ValueError(
            f"the tokenizer encodes a newline as {len(ids)} tokens; scoring documents needs it "
            "as one token to stand before each document"
        )
    return ids[0]
