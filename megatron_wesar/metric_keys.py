"""The names of the metric keys the monitors write and the study summary reads back.

One metrics record is a flat dict (one JSONL line); megatron_wesar.monitor documents what each
key holds. `<matrix>` is a logical matrix such as `decoder.layers.3.self_attention.linear_qkv.q`,
`<role>` one of megatron_wesar.init.ROLES, `<series>` one of SPIKE_SERIES and `<rule>` one of
SPIKE_RULES[<series>].
"""
from __future__ import annotations

from .init import ROLES

SPIKE_SERIES = ("loss", "grad_norm")
# the rules monitor.default_rules(series) runs on each series, in order: the gradient norm is
# noisy step to step (its running minimum is an outlier), so it is compared with its running median
SPIKE_RULES = {"loss": ("megatron", "zscore", "relmin"),
               "grad_norm": ("megatron", "zscore", "relmedian")}

SPIKE_FLAG_PREFIX = "spike/"    # spike/<series>/<rule>: 1.0 when the rule flags this step
SPIKE_COUNT_PREFIX = "spikes/"  # spikes/<series>/<rule>: spikes flagged so far
GATE_PREFIX = "gate/"           # gate/<matrix>: the gate value
TOKENS_PER_S = "tokens_per_s"

# the instability proxies of megatron_wesar.instability (Wortsman et al. 2023); a contract: every
# key of the attention-logit monitor starts with ATTN_LOGIT_MAX, every key of log Z with
# OUTPUT_LOG_Z
ATTN_LOGIT_MAX = "attn_logit_max"             # the max over layers; attn_logit_max/layer_<i>
OUTPUT_LOG_Z = "output_log_z"
OUTPUT_LOG_Z_MEAN = OUTPUT_LOG_Z + "_mean"      # mean over tokens of log Z
OUTPUT_LOG_Z_ABSMAX = OUTPUT_LOG_Z + "_absmax"  # max over tokens of |log Z|

# the per-matrix statistics: each has the keys <stat>/<matrix>, <stat>_mean/<role>, <stat>_spread
UPDATE_RATIO = "update_ratio"
WEIGHT_NORM = "weight_norm"
WEIGHT_RMS = "weight_rms"

# the FP8 statistics of the weights on the torch-native FP8 path (megatron_wesar.fp8_stats), per
# role only: <stat>_mean/<role>, the mean over the role's matrices
FP8_WEIGHT_AMAX = "fp8_weight_amax"          # max |W_bar|
FP8_WEIGHT_SCALE = "fp8_weight_scale"        # the GEMM's dequantization scale of W_bar
FP8_QUANT_REL_ERROR = "fp8_quant_rel_error"  # ||W_eff - alpha deq(q(W_bar))|| / ||W_eff||

# the last one or two components of <matrix> -> the role of that logical matrix (a fused
# weight's parts are <module>.<part>: linear_qkv.q/k/v; a SwiGLU linear_fc1.gate/up)
MATRIX_ROLES = {
    "linear_qkv.q": "q",
    "linear_qkv.k": "k",
    "linear_qkv.v": "v",
    "linear_proj": "attn_proj",
    "linear_fc1.gate": "fc1_gate",
    "linear_fc1.up": "fc1",
    "linear_fc1": "fc1",
    "linear_fc2": "fc2",
    "word_embeddings": "embedding",
    "position_embeddings": "position",
    "output_layer": "output",
}
assert set(ROLES) <= set(MATRIX_ROLES.values()), "a role without a matrix name in MATRIX_ROLES"


def spike_flag_key(series: str, rule: str) -> str:
    """spike/<series>/<rule>."""
    return f"{SPIKE_FLAG_PREFIX}{series}/{rule}"


def spike_count_key(series: str, rule: str) -> str:
    """spikes/<series>/<rule>."""
    return f"{SPIKE_COUNT_PREFIX}{series}/{rule}"


def parse_spike_key(key: str, prefix: str):
    """(series, rule) of a key `<prefix><series>/<rule>`, or None when `key` is not one."""
    if not key.startswith(prefix):
        return None
    parts = key[len(prefix):].split("/")
    return tuple(parts) if len(parts) == 2 else None


def matrix_key(stat: str, matrix: str) -> str:
    """<stat>/<matrix>."""
    return f"{stat}/{matrix}"


def attn_logit_layer_key(layer: int) -> str:
    """attn_logit_max/layer_<layer> (the global, 0-based layer index)."""
    return f"{ATTN_LOGIT_MAX}/layer_{layer}"


def role_mean_key(stat: str, role: str) -> str:
    """<stat>_mean/<role>."""
    return f"{stat}_mean/{role}"


def spread_key(stat: str) -> str:
    """<stat>_spread."""
    return f"{stat}_spread"


def role_of_matrix(matrix: str) -> str:
    """The role of a logical matrix from its name (module path, plus the part of a fused
    weight), or "other" for a matrix of no known role."""
    names = matrix.split(".")
    return MATRIX_ROLES.get(".".join(names[-2:]), MATRIX_ROLES.get(names[-1], "other"))


UPDATE_RATIO_SPREAD = spread_key(UPDATE_RATIO)
WEIGHT_NORM_SPREAD = spread_key(WEIGHT_NORM)
WEIGHT_RMS_SPREAD = spread_key(WEIGHT_RMS)

# the spike policy's marks on a step record (megatron_wesar.training.divergence)
SKIPPED_STEP = "skipped_step"  # 1.0 on a step the policy did not apply
REWIND_TO = "rewind_to"  # on the step that made the policy rewind: the iteration it rewound to
