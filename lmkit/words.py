"""Words as the word-level literature counts them, without importing torch (the data
preparation's worker processes count them)."""


def count_words(text: str) -> int:
    """Words as the word-level literature counts them (WikiText's perplexities): whitespace
    tokens plus one end-of-line per line (the `\\n` that lmkit's word tokenizer scores as
    <eos>)."""
    return len(text.split()) + text.count("\n")
