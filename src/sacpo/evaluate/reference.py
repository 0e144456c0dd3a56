"""The reference (SFT) side of an evaluation, loaded once for every model it scores.

`generate_samples` needs, for each model, the reference's tokenizer (the model's must be the same: a log-ratio
of sequences tokenized differently is no KL estimate), the reference's weight fingerprint (the sample cache key)
and, when it samples, log π_SFT of the samples. `Reference` holds them across the models of an evaluation: the
tokenizer loaded and fingerprinted once, the weights hashed once, the model loaded on first use and its prompts
prefilled once (`sacpo.models.prefix_logps.PromptCachedLogps`: every model is evaluated on the same prompts).
A model's own tokenizer is fingerprinted without loading it again when its files are byte-identical to ones
already loaded (`sacpo.models.load.tokenizer_fingerprint`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sacpo.models.load import (
    default_device,
    fingerprint_model,
    load_model,
    load_tokenizer_with_fingerprint,
    tokenizer_fingerprint,
)
from sacpo.models.prefix_logps import PromptCachedLogps


@dataclass
class Reference:
    """A reference model directory with its tokenizer and fingerprints (`Reference.load`); `model()` and
    `scorer()` load the weights on first use only (a fully cached evaluation never does)."""

    dir: Path
    tokenizer: Any
    tokenizer_fingerprint: str
    fingerprint: str
    device: str
    dtype: torch.dtype | None = None
    _model: Any = field(default=None, repr=False)
    _scorer: PromptCachedLogps | None = field(default=None, repr=False)

    @classmethod
    def load(
        cls, ref_dir: str | Path, device: str | None = None, dtype: torch.dtype | None = None
    ) -> Reference:
        tokenizer, tok_fp = load_tokenizer_with_fingerprint(ref_dir)
        return cls(
            Path(ref_dir), tokenizer, tok_fp, fingerprint_model(ref_dir), device or default_device(), dtype
        )

    def check_tokenizer(self, model_dir: str | Path) -> None:
        """Raise when `model_dir`'s tokenizer differs from the reference's."""
        if tokenizer_fingerprint(model_dir) != self.tokenizer_fingerprint:
            raise ValueError(
                f"{model_dir} and the reference {self.dir} have different tokenizers: the log-ratio of sequences "
                "tokenized differently is not a KL estimate"
            )

    def model(self) -> Any:
        if self._model is None:
            self._model = load_model(self.dir, dtype=self.dtype).to(self.device).eval()
        return self._model

    def scorer(self) -> PromptCachedLogps:
        """log π_ref of encoded sequences, each batch of prompts prefilled once for the whole evaluation."""
        if self._scorer is None:
            self._scorer = PromptCachedLogps(self.model(), self.tokenizer.pad_token_id)
        return self._scorer
