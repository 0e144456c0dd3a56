"""Pure math of sacpo: torch only, no I/O, no config objects, no devices. Importing it never imports transformers."""

from sacpo.math.kl import KL_ESTIMATORS, get_kl_estimator, kl_health, kl_k1, kl_k2, kl_k3, sequence_kl
from sacpo.math.logprobs import masked_mean, masked_sum, token_logprobs
from sacpo.math.merging import MergeError, linear_merge, lora_delta, merge_lora_deltas
from sacpo.math.preference import (
    LOSSES,
    PreferenceLossOutput,
    dpo_loss,
    get_loss,
    ipo_loss,
    kto_loss,
    kto_reference_point,
)

__all__ = [
    "KL_ESTIMATORS",
    "LOSSES",
    "MergeError",
    "PreferenceLossOutput",
    "dpo_loss",
    "get_kl_estimator",
    "get_loss",
    "ipo_loss",
    "kl_health",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kto_loss",
    "kto_reference_point",
    "linear_merge",
    "lora_delta",
    "masked_mean",
    "masked_sum",
    "merge_lora_deltas",
    "sequence_kl",
    "token_logprobs",
]
