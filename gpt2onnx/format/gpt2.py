"""Facts of GPT-2 itself, written once for the runtime and the export: the state dict's names and shapes,
the attention's scale, the position ids of a left-padded batch."""

from __future__ import annotations

import math

import numpy as np

from .config import ModelConfig

_BLOCK_WEIGHTS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                  "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                  "mlp.c_proj.weight", "mlp.c_proj.bias")
TIED_HEAD, EMBEDDING = "lm_head.weight", "transformer.wte.weight"
# Weights the state dict stores as [out, in] (nn.Embedding, nn.Linear); GPT-2's Conv1D weights are [in, out].
OUT_IN_WEIGHTS = (EMBEDDING, "transformer.wpe.weight", TIED_HEAD)


def state_dict_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight of GPT2LMHeadModel's state dict, in its order, with its shape (`lm_head.weight` last,
    listed even when tied to `transformer.wte.weight`). Conv1D weights are [in, out]; wte, wpe and
    lm_head are [rows, n_embd]."""
    e, f, v = config.n_embd, config.inner_dim, config.vocab_size
    block = {"ln_1.weight": (e,), "ln_1.bias": (e,), "attn.c_attn.weight": (e, 3 * e), "attn.c_attn.bias": (3 * e,),
             "attn.c_proj.weight": (e, e), "attn.c_proj.bias": (e,), "ln_2.weight": (e,), "ln_2.bias": (e,),
             "mlp.c_fc.weight": (e, f), "mlp.c_fc.bias": (f,), "mlp.c_proj.weight": (f, e), "mlp.c_proj.bias": (e,)}
    shapes = {EMBEDDING: (v, e), "transformer.wpe.weight": (config.n_positions, e)}
    for i in range(config.n_layer):
        shapes.update({f"transformer.h.{i}.{name}": block[name] for name in _BLOCK_WEIGHTS})
    shapes.update({"transformer.ln_f.weight": (e,), "transformer.ln_f.bias": (e,), TIED_HEAD: (v, e)})
    return shapes


def weight_names(config: ModelConfig) -> list[str]:
    """The weights a model stores, in state-dict order: every one, less the head when it is tied."""
    return [name for name in state_dict_shapes(config) if name != TIED_HEAD or not config.tie_word_embeddings]


def attention_scale(config: ModelConfig, layer: int) -> float:
    """The factor GPT-2 multiplies q·kᵀ by in `layer` (as transformers' GPT2Attention does)."""
    scale = 1.0
    if config.scale_attn_weights:
        scale /= math.sqrt(config.head_dim)
    if config.scale_attn_by_inverse_layer_idx:
        scale /= layer + 1
    return scale


def position_ids(attention_mask: np.ndarray) -> np.ndarray:
    """Positions of a left-padded batch [batch, length]: they count only the real tokens, so a padded row
    starts at position 0 like an unpadded one (padding gets 1, as transformers gives it; it is masked)."""
    return np.where(attention_mask == 1, attention_mask.cumsum(axis=1) - 1, 1)
