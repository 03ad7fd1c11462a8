"""How the next token is chosen, and the one place sampling values are bounded.

The CLIs (``--temperature`` ...), the config's end-of-training answers (``train.eval_*``) and the
server's request bodies all build a :class:`SamplingConfig`, so a value is judged once, by the same
rule, and the error names the value the way each caller spells it (:class:`SamplingLimitError`).
No torch here: the config layer checks values before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_yuyuan.errors import UserError

SAMPLING_RANGE = (0.01, 100.0)
"""Temperature and repetition penalty bounds: the logits are divided by them."""


class SamplingLimitError(UserError):
    """A sampling value out of its range. ``str()`` spells it as the CLI flag (``--top-p must be
    in (0, 1], got 0``); :attr:`field` and :attr:`problem` let other callers name it their way."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        """The SamplingConfig field (``top_p``): the server's JSON field has the same name."""
        self.problem = problem
        """What is wrong, without the name (``must be in (0, 1], got 0``)."""
        super().__init__(f"--{field.replace('_', '-')} {problem}")


@dataclass
class SamplingConfig:
    """How the next token is chosen."""

    max_new_tokens: int = 128
    """Generate at most this many tokens after the prompt."""
    do_sample: bool = False
    """Sample (with temperature / top-k / top-p) instead of greedy argmax."""
    temperature: float = 1.0
    """Divide logits by this before sampling."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches p (1.0: all)."""
    seed: int = 1234
    """Seed of the sampling generator."""
    repetition_penalty: float = 1.0
    """transformers' repetition penalty: logits of tokens already in the row (prompt and padding
    included) are divided by it when positive, multiplied when negative (1.0: off)."""
    no_repeat_ngram_size: int = 0
    """Never repeat an n-gram of this size within the row, prompt included (0: off)."""

    def __post_init__(self) -> None:
        """A value that passes here never turns logits into Inf/NaN (NaN fails every bound)."""
        if not self.max_new_tokens >= 1:
            raise SamplingLimitError("max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        lo, hi = SAMPLING_RANGE
        if not lo <= self.temperature <= hi:
            raise SamplingLimitError(
                "temperature",
                f"must be in [{lo:g}, {hi:g}], got {self.temperature:g} (lower values divide the "
                f"logits into Inf: use greedy decoding for the top token)",
            )
        if not self.top_k >= 0:
            raise SamplingLimitError("top_k", f"must be >= 0 (0: no limit), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingLimitError("top_p", f"must be in (0, 1], got {self.top_p}")
        if not lo <= self.repetition_penalty <= hi:
            raise SamplingLimitError(
                "repetition_penalty",
                f"must be in [{lo:g}, {hi:g}] (1: off), got {self.repetition_penalty:g}",
            )
        if not self.no_repeat_ngram_size >= 0:
            raise SamplingLimitError(
                "no_repeat_ngram_size", f"must be >= 0 (0: off), got {self.no_repeat_ngram_size}"
            )
