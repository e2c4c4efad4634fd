"""transformers' `pipeline("text-generation")`, reproduced without torch: its defaults, its quirks, its output.

    from gpt2onnx.pipeline import pipeline
    generator = pipeline("text-generation", model="out/gpt2")
    generator("Hello, I'm a language model,", max_length=30, num_return_sequences=5, seed=42)

gives the `[{"generated_text": ...}, ...]` that `set_seed(42)` and transformers 4.57's pipeline give for the
same weights. That includes what the pipeline really does with that call: its own defaults
(max_new_tokens=256, do_sample=True, temperature=0.7) fill in what the model's generation_config.json
leaves at transformers' defaults, and a default max_new_tokens=256 silently beats the caller's
max_length=30. `Model.generate` does not do that; this module exists so that migrating code gets the very
same texts. `seed=` stands for `transformers.set_seed(seed)` before the call.
"""

from __future__ import annotations

import secrets

from .defaults import TRANSFORMERS_DEFAULTS
from .errors import InvalidArgumentError
from .model import Model, load
from .settings import OPTIONS, GenerationSettings
from .torch_random import TorchGenerator

# TextGenerationPipeline._default_generation_config in transformers 4.57
PIPELINE_DEFAULTS = {"max_new_tokens": 256, "do_sample": True, "temperature": 0.7}
_GLOBAL = {**TRANSFORMERS_DEFAULTS, "max_new_tokens": None}
_KEYS = set(_GLOBAL)
# what a call may pass: the generation options transformers' GenerationConfig has (in our table's order)
CALL_OPTIONS = tuple(name for name in OPTIONS if name in _KEYS)


class TextGenerationPipeline:
    """Call it like transformers' text-generation pipeline; `seed=` replaces `set_seed`."""

    def __init__(self, model: Model):
        self.model = model
        config = dict(_GLOBAL)
        config.update(PIPELINE_DEFAULTS)
        # the model's generation_config.json fills in only what is still at transformers' global default
        for key, value in model.generation_config.items():
            if key in _KEYS and config.get(key) == _GLOBAL.get(key) and value != _GLOBAL.get(key):
                config[key] = value
        # a model max_length other than 20 is honoured over the pipeline's default max_new_tokens
        if config["max_new_tokens"] == PIPELINE_DEFAULTS["max_new_tokens"] and config["max_length"] != 20:
            config["max_new_tokens"] = None
        task = (model.raw_config.get("task_specific_params") or {}).get("text-generation") or {}
        config.update({k: v for k, v in task.items() if k in _KEYS})
        self.generation_config = config

    def __call__(self, text_inputs: str | list[str], *, return_full_text: bool = True,
                 clean_up_tokenization_spaces: bool = True, seed: int | None = None, **generate_kwargs):
        """[{"generated_text": ...}] per prompt (a list of those for a list of prompts), as the pipeline."""
        unknown = sorted(set(generate_kwargs) - set(CALL_OPTIONS))
        if unknown:
            raise InvalidArgumentError(f"unsupported pipeline option(s) {', '.join(unknown)}",
                                       hint=f"supported: {', '.join(CALL_OPTIONS)}, return_full_text, "
                                            "clean_up_tokenization_spaces, seed")
        seed = secrets.randbelow(2**32) if seed is None else seed
        GenerationSettings(seed=seed)  # checks the range
        rng = TorchGenerator(seed)
        prompts = [text_inputs] if isinstance(text_inputs, str) else text_inputs
        if not isinstance(text_inputs, str):
            # a list goes through torch's DataLoader, whose iterator first draws an int64 base seed (2 words)
            rng.bit_generator.random_raw(2)
        # the pipeline runs a list one prompt at a time (no padding), on one random stream
        results = [self._one(p, generate_kwargs, rng, return_full_text, clean_up_tokenization_spaces)
                   for p in prompts]
        return results[0] if isinstance(text_inputs, str) else results

    def _one(self, prompt: str, call: dict, rng, full: bool, clean: bool) -> list[dict]:
        ids = self.model.encode_prompt(prompt, allow_special=True)  # the HF tokenizer reads special tokens
        options = {**self.generation_config, **call}
        # generate's length rule: a max_new_tokens anywhere wins; an untouched max_length=20 means 20 new
        if options["max_new_tokens"] is None:
            if "max_length" not in call and options["max_length"] == 20:
                options["max_new_tokens"] = min(20 + len(ids), self.model.config.n_positions) - len(ids)
            else:
                options["max_new_tokens"] = options["max_length"] - len(ids)
        options.pop("max_length")
        settings = GenerationSettings(**options, sampler="torch")
        if len(ids) + settings.max_new_tokens > self.model.config.n_positions:
            raise InvalidArgumentError(
                f"the prompt ({len(ids)} tokens) plus {settings.max_new_tokens} new tokens exceed n_positions="
                f"{self.model.config.n_positions}",
                hint="the pipeline's default is max_new_tokens=256; pass a smaller max_new_tokens")
        self.model.check_budget([ids], settings)
        decode = self.model.tokenizer.decode_text
        prompt_text = decode(ids, clean_up=clean)
        records = []
        for new_ids in self.model.generate_rows([ids], settings, rng if not settings.greedy else None):
            text = decode(ids + new_ids, clean_up=clean)[len(prompt_text):]
            records.append({"generated_text": prompt + text if full else text})
        return records


def pipeline(task: str = "text-generation", model: str | None = None, **load_options) -> TextGenerationPipeline:
    """Like transformers.pipeline for the text-generation task; `model` is an exported model directory."""
    if task != "text-generation":
        raise InvalidArgumentError(f"task must be 'text-generation', got {task!r}")
    if model is None:
        raise InvalidArgumentError("pipeline() needs model=DIR, an exported model directory")
    return TextGenerationPipeline(load(model, **load_options))
