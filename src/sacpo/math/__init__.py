"""Pure math of sacpo: torch only, no I/O, no config objects, no devices. Importing it never imports transformers."""

from sacpo.math.bon import (
    bon_kl_bound,
    bon_kl_estimate,
    bon_kl_exact,
    bon_kl_level_estimate,
    bon_level_frequencies,
    bon_pmf,
    bon_reward_levels,
    bon_win_rate_bound,
    bon_win_rate_exact,
)
from sacpo.math.kl import KL_ESTIMATORS, get_kl_estimator, kl_health, kl_k1, kl_k2, kl_k3, sequence_kl
from sacpo.math.lagrange import calibrate_lambda, constrained_optimum, dual_objective
from sacpo.math.logprobs import masked_mean, masked_sum, token_logprobs
from sacpo.math.merging import (
    MergeError,
    add_deltas,
    concat_lora,
    linear_merge,
    lora_delta,
    lora_scaling,
    merge_lora_deltas,
)
from sacpo.math.preference import (
    LOSSES,
    PreferenceLossOutput,
    dpo_loss,
    get_loss,
    ipo_loss,
    kto_loss,
    kto_reference_point,
)
from sacpo.math.tabular import dpo_optimum_tabular, expected_dpo_loss, kl_regularized_optimum, sacpo_tabular

__all__ = [
    "KL_ESTIMATORS",
    "LOSSES",
    "MergeError",
    "PreferenceLossOutput",
    "add_deltas",
    "bon_kl_bound",
    "bon_kl_estimate",
    "bon_kl_exact",
    "bon_kl_level_estimate",
    "bon_level_frequencies",
    "bon_pmf",
    "bon_reward_levels",
    "bon_win_rate_bound",
    "bon_win_rate_exact",
    "calibrate_lambda",
    "concat_lora",
    "constrained_optimum",
    "dpo_loss",
    "dpo_optimum_tabular",
    "dual_objective",
    "expected_dpo_loss",
    "get_kl_estimator",
    "get_loss",
    "ipo_loss",
    "kl_health",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_regularized_optimum",
    "kto_loss",
    "kto_reference_point",
    "linear_merge",
    "lora_delta",
    "lora_scaling",
    "masked_mean",
    "masked_sum",
    "merge_lora_deltas",
    "sacpo_tabular",
    "sequence_kl",
    "token_logprobs",
]
