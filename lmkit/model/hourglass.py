"""HourglassLM: a decoder whose middle layers run on a k times shorter sequence (Nawrot et al.
2021, "Hierarchical Transformers Are More Efficient Language Models")."""

from __future__ import annotations

from torch import Tensor, nn

from lmkit.mixers.base import Cache, TreeStep
from lmkit.model.decoder import DecoderLM
from lmkit.model.resampling import ResampleState, Shorten, Upsample
from lmkit.ops.flops import linear_flops, train_flops


class HourglassCaches(list):
    """One cache per block (in execution order, as DecoderLM's) plus one ResampleState per
    shortening level; `length` is the number of tokens decoded so far."""

    def __init__(self, caches: list[Cache], levels: int) -> None:
        super().__init__(caches)
        self.levels = [ResampleState() for _ in range(levels)]

    @property
    def length(self) -> int:
        return self.levels[0].position


class HourglassLM(DecoderLM):
    """Pre-layers at full length, shorten by k, the middle layers on T / k vectors (recursively
    for a list of factors), upsample by k with a residual from before the shortening, then
    post-layers at full length. Every block uses the configured mixer and MLP.

    shorten: factors, outermost first (e.g. [3] or [2, 2]). num_layers counts every layer;
    outer_layers of them run before and as many after each level (times layer_multiplier),
    the rest in the middle. downsample: mean | linear; upsample: repeat | linear | attention.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        shorten: list[int] | tuple[int, ...] = (3,),
        outer_layers: int = 1,
        downsample: str = "linear",
        upsample: str = "linear",
        **kwargs,
    ) -> None:
        factors = [int(k) for k in shorten]
        if not factors or any(k < 1 for k in factors):
            raise ValueError(
                f"model.shorten={list(shorten)} must be a non-empty list of factors >= 1"
            )
        num_layers = kwargs.get("num_layers", 4)
        middle = num_layers - 2 * outer_layers * len(factors)
        if outer_layers < 1:
            raise ValueError(f"model.outer_layers={outer_layers} must be >= 1 (full-length layers)")
        if middle < 1:
            raise ValueError(
                f"model.num_layers={num_layers} leaves {middle} middle layers after "
                f"model.outer_layers={outer_layers} before and after each of {len(factors)} "
                f"shortening levels; raise num_layers or lower outer_layers"
            )
        super().__init__(vocab_size, **kwargs)
        self.shorten_factors, self.outer_blocks = (
            factors,
            outer_layers * kwargs.get("layer_multiplier", 1),
        )
        d, heads, norm = self.d_model, self.num_heads, kwargs.get("norm", "layernorm")
        self.shortens = nn.ModuleList(Shorten(d, k, downsample) for k in factors)
        self.upsamples = nn.ModuleList(
            Upsample(d, k, upsample, num_heads=heads, norm=norm) for k in factors
        )
        for module in (self.shortens, self.upsamples):
            module.apply(self._init_weights)

    @property
    def supports_tree(self) -> bool:
        return False

    def _level_blocks(self, level: int) -> tuple[range, range]:
        """Indices of the blocks before and after shortening level `level`; the middle (level
        = number of levels) has them all in the first range and none in the second."""
        o, n = self.outer_blocks, len(self.blocks)
        if level == len(self.shorten_factors):
            return range(o * level, n - o * level), range(0)
        return range(level * o, (level + 1) * o), range(n - (level + 1) * o, n - level * o)

    def hidden_states(
        self, idx: Tensor, caches: list[Cache] | None = None, tree: TreeStep | None = None
    ) -> Tensor:
        if tree is not None:
            raise ValueError("hourglass models cannot verify a candidate tree in one pass")
        if idx.dim() != 2:
            raise ValueError(f"idx must be [batch, time] token ids, got shape {tuple(idx.shape)}")
        if caches is not None and not isinstance(caches, HourglassCaches):
            raise TypeError("an hourglass model decodes with the caches of its init_caches()")
        offset = caches.length if caches is not None else 0
        x = self.embedding(idx, offset)
        return self.final_norm(self._run(0, x, caches))

    def _run(self, level: int, x: Tensor, caches: HourglassCaches | None) -> Tensor:
        def blocks(indices, x):
            for i in indices:
                x = self.blocks[i](x, caches[i] if caches is not None else None)
            return x

        before, after = self._level_blocks(level)
        if level == len(self.shorten_factors):  # the middle, on the shortest sequence
            return blocks(before, x)
        state = caches.levels[level] if caches is not None else ResampleState()
        x = blocks(before, x)
        short = self.shortens[level](x, state)
        if short.shape[1]:
            short = self._run(level + 1, short, caches)
        return blocks(after, self.upsamples[level](x, short, state))

    def init_caches(self, batch_size, max_len, device=None, dtype=None) -> HourglassCaches:
        caches = super().init_caches(batch_size, max_len, device=device, dtype=dtype)
        return HourglassCaches(caches, len(self.shorten_factors))

    def flops_per_token(self, seq_len: int) -> dict[str, float]:
        """As DecoderLM's, with every block counted at its level's length and rate: a block on
        the sequence shortened by K costs its per-token FLOPs at T / K, paid once per K tokens."""
        mixer = mlp = resample = 0.0
        rate, length = 1, seq_len
        levels = len(self.shorten_factors)
        for level in range(levels + 1):
            before, after = self._level_blocks(level)
            for i in (*before, *after):
                mixer += self.blocks[i].mixer.flops_per_token(length) / rate
                mlp += linear_flops(self.blocks[i].mlp) / rate
            if level < levels:
                k = self.shorten_factors[level]
                resample += self.shortens[level].flops_per_token() / rate
                resample += self.upsamples[level].flops_per_token(length) / rate
                rate, length = rate * k, -(-length // k)
        parts = {"mixer": mixer, "mlp": mlp, "resample": resample, "head": linear_flops(self.head)}
        forward = sum(parts.values())
        return {**parts, "forward": forward, "train": train_flops(forward)}
