"""The PyTorch reference: transformers' GPT2LMHeadModel holding the very same weights (shared, not copied)."""

from __future__ import annotations

import numpy as np

from gpt2onnx.errors import ModelLoadError


def torch_model(config_dict: dict, weights: dict[str, np.ndarray], *, attn_implementation: str = "eager"):
    """GPT2LMHeadModel in eval mode whose parameters are views of `weights` (no second copy in memory).

    Eager attention by default: it is GPT-2's own arithmetic, and transformers 4.57's sdpa path ignores
    `scale_attn_by_inverse_layer_idx`.
    """
    import torch
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()  # its notes on generation defaults are not ours to show

    config = GPT2Config(**{k: v for k, v in config_dict.items() if k not in ("transformers_version",)})
    config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    model.to_empty(device="cpu")  # storage without initialisation: the weights come next
    state = {name: torch.from_numpy(array) for name, array in weights.items()}
    missing, _ = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [m for m in missing if m != "lm_head.weight" and not m.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing:
        raise ModelLoadError(f"the reference model lacks {len(missing)} weights, e.g. {missing[:5]}",
                             hint="the checkpoint is incomplete or not a GPT-2: check the source it was loaded from")
    n = config.n_positions
    for module in model.modules():  # buffers made on the meta device hold garbage after to_empty
        if hasattr(module, "bias") and isinstance(module.bias, torch.Tensor) and module.bias.dtype == torch.bool:
            module.bias.copy_(torch.tril(torch.ones((n, n), dtype=torch.bool)).view(1, 1, n, n))
        if hasattr(module, "masked_bias"):
            module.masked_bias.fill_(-1e4)
    return model.eval()


def cache_layer(cache, layer: int):
    """(key, value) of one layer, [batch, n_head, tokens, head_dim], from transformers' cache object (or a
    legacy tuple)."""
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache[layer][0], cache[layer][1]
