"""The `gpt2onnx` command: a thin layer over the Python API. Each command parses, calls, prints.

The runtime's own commands are here; `export`, `verify` and `bench` come from the export side through the
entry-point group `gpt2onnx.commands` (gpt2onnx/tools/plugins.py), loaded only when the command line may name them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing

from ..errors import Gpt2OnnxError, InvalidArgumentError, MissingDependencyError
from ..generation.settings import OPTIONS, GenerationSettings
from . import plugins

EXAMPLES = """examples:
  gpt2onnx export gpt2 out/gpt2                 # download, convert, verify against PyTorch
  gpt2onnx export random:gpt2 out/random-gpt2   # offline: seeded random weights, real tokenizer
  gpt2onnx export random:gpt2 out/gpt2-int4 --precision int4   # 4-bit weights, gated on quality
  gpt2onnx generate "Hello, I'm a language model," --model out/random-gpt2
  gpt2onnx verify out/random-gpt2                      # side by side with PyTorch: logits, greedy, seeded sampling
  gpt2onnx inspect out/random-gpt2                     # weights, shapes, dtypes, inputs/outputs, ops, manifest
  gpt2onnx plot out/random-gpt2 --out plots --prompt "The cat sat on the mat"   # embeddings, weights, attention
  gpt2onnx bench                                # speed next to torch, Optimum and CTranslate2
"""


GENERATE_EXAMPLES = """examples:
  gpt2onnx generate "Hello, I'm a language model," -m out/random-gpt2 --max-length 30 -n 5 --do-sample --seed 42
  gpt2onnx generate "def main():" -m out/random-gpt2 --max-new-tokens 64 --stop "\\n\\n" --stream
  echo "Once upon a time" | gpt2onnx generate - -m out/random-gpt2 --do-sample --top-p 0.9 --json
"""


def _unescape(text: str) -> str:
    """Let a shell user type a newline or tab in --stop / --stop-strings as \\n or \\t."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _read_stdin() -> str:
    """The prompt from stdin, as UTF-8 whatever the locale; invalid bytes are a one-line error."""
    stream = sys.stdin
    if stream is None:
        raise InvalidArgumentError("PROMPT is - but there is no stdin", hint="pipe the prompt in, or pass it as text")
    data = stream.buffer.read() if hasattr(stream, "buffer") else stream.read()
    if isinstance(data, str):
        return data
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidArgumentError(
            f"stdin is not valid UTF-8: byte 0x{data[error.start]:02x} at offset {error.start} ({error.reason})",
            hint="convert the input to UTF-8 first, e.g. iconv -f latin1 -t utf-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as text-mode stdin reads


def cmd_generate(args: argparse.Namespace) -> int:
    from ..generation.loader import load

    if args.stream and args.json:
        raise InvalidArgumentError("--stream and --json do not go together", hint="pick one")
    prompt = _read_stdin() if args.prompt == "-" else args.prompt
    model = load(args.model, threads=args.threads)
    assistant = load(args.assistant_model, threads=args.threads) if args.assistant_model else None
    options = {name: value for name, value in vars(args).items() if name in OPTIONS}  # None: the model's
    options.update(stop=[_unescape(t) for t in args.stop] if args.stop else None,
                   stop_strings=[_unescape(t) for t in args.stop_strings] if args.stop_strings else None,
                   ignore_eos=args.ignore_eos or None, truncate=args.truncate,
                   allow_special_tokens=args.allow_special_tokens, assistant_model=assistant)
    if args.stream:
        pieces = model.stream(prompt, **options)  # checks all
        print(prompt, end="", flush=True)
        for piece in pieces:
            print(piece, end="", flush=True)
        print()
        return 0
    results = model.generate(prompt, **options)
    results = results if isinstance(results, list) else [results]
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in results], ensure_ascii=False, indent=2))
    else:
        print("\n\n".join(prompt + r.text for r in results))
    if results[0].speculation is not None:  # prompt lookup or an assistant model ran
        stats = results[0].speculation
        print(f"speculation: {stats.accepted} of {stats.drafted} drafted tokens kept ({stats.acceptance_rate:.0%}), "
              f"{len(results[0].token_ids)} tokens in {stats.runs + 1} runs of the model", file=sys.stderr)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspection import inspect_model

    report = inspect_model(args.model_dir, check_hashes=args.check_hashes)
    print(report.to_json() if args.json else report.format())
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .plot import plot_model

    paths = plot_model(args.model_dir, args.out, prompt=args.prompt, weight=args.weight, weight_slice=args.slice,
                       dims=args.dims, positions=args.positions, layers=args.layers, heads=args.heads,
                       threads=args.threads)
    print("\n".join(str(path) for path in paths))
    return 0


SERVE_EXAMPLES = """examples:
  gpt2onnx serve out/random-gpt2                                   # http://127.0.0.1:8000 (playground at /)
  gpt2onnx serve out/random-gpt2 --api-key-file key.txt --max-batch 32 --port 9000
  gpt2onnx serve out/random-gpt2 --host 0.0.0.0 --api-key-file key.txt --allowed-hosts gpt2.example.com
  gpt2onnx serve out/random-gpt2 --ray --replicas 2 --cpus-per-replica 1   # 2 replicas on Ray Serve, 1 core each
  gpt2onnx serve out/random-gpt2 --ray --ray-address 127.0.0.1:6379        # join a cluster started by `ray start`
  # then, from Python:  OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY").completions.create(
  #                         model="gpt2", prompt="Hello", max_tokens=20, seed=1)
"""


def cmd_serve(args: argparse.Namespace) -> int:
    import dataclasses
    import os
    from pathlib import Path

    try:
        from ..serving import logs, server
    except ImportError as error:
        raise _serve_extra_error(error) from error
    from ..generation.engine import Engine, EngineOptions
    from ..generation.loader import load
    from ..runtime.manifest import read_manifest
    from ..serving.options import ServerOptions

    directory = Path(args.model_dir)
    read_manifest(directory, check_hashes=False)  # a wrong directory fails now, not after the server started
    keys = [args.api_key] if args.api_key else []
    if args.api_key_file:
        try:
            keys += [line.strip() for line in Path(args.api_key_file).read_text().splitlines() if line.strip()]
        except OSError as error:
            raise InvalidArgumentError(f"cannot read --api-key-file {args.api_key_file}: {error.strerror}",
                                       hint="give a file holding one key per line") from None
        if not keys:
            raise InvalidArgumentError(f"--api-key-file {args.api_key_file} holds no key",
                                       hint="write the key on the file's first line")
    keys += [os.environ["GPT2ONNX_API_KEY"]] if not keys and os.environ.get("GPT2ONNX_API_KEY") else []
    # bad values fail here, before the port opens or the model loads
    engine_options = EngineOptions(max_batch=args.max_batch, max_queue=args.max_queue, prefill_chunk=args.prefill_chunk,
                                   batch_invariant=args.batch_invariant)
    options = ServerOptions(model_name=args.model_name or directory.resolve().name, api_keys=tuple(keys),
                            drain_timeout=args.drain_timeout, read_timeout=args.read_timeout,
                            limit_concurrency=args.limit_concurrency, allowed_hosts=tuple(args.allowed_hosts),
                            allowed_origins=tuple(args.allowed_origins), accept_any_model=args.any_model_name,
                            log_format=args.log_format)
    if args.ray:
        return _serve_on_ray(args, directory, engine_options, options)
    _no_ray_options(args)
    server.check_address(args.host, args.port)  # a busy or impossible address fails before anything starts

    def load_engine(on_step):
        return Engine(load(directory, threads=args.threads), dataclasses.replace(engine_options, on_step=on_step))

    logs.announce(f"gpt2onnx: serving {directory} as {options.model_name!r} on http://{args.host}:{args.port} "
                  f"(playground at /, API at /v1; {'API key required' if keys else 'no API key'})", options.log_format)
    return server.serve(options=options, load=load_engine, host=args.host, port=args.port, log_level=args.log_level)


def _serve_extra_error(error: ImportError) -> MissingDependencyError:
    """Name the real cause of a failed import of the server: a package of the serve extra that is missing, or
    one installed at a version the extra does not take (pydantic 1 beside FastAPI), not just the import."""
    from importlib import metadata

    hint = "pip install 'gpt2onnx[serve]'"
    try:
        pydantic = metadata.version("pydantic")
    except metadata.PackageNotFoundError:
        pydantic = None
    if pydantic is not None and pydantic.split(".")[0].isdigit() and int(pydantic.split(".")[0]) < 2:
        return MissingDependencyError(f"pydantic {pydantic} is installed; the serve extra needs pydantic>=2 "
                                      f"(importing the server failed: {error})", hint=f"pip install 'pydantic>=2' "
                                      f"(or {hint}, which upgrades it)")
    for package in ("fastapi", "uvicorn", "starlette", "pydantic", "prometheus-client"):
        try:
            metadata.version(package)
        except metadata.PackageNotFoundError:
            return MissingDependencyError(f"serving needs the serve extra: {package} is not installed", hint=hint)
    return MissingDependencyError(f"serving needs the serve extra, whose packages are installed but do not import: "
                                  f"{type(error).__name__}: {error}", hint=f"reinstall them: {hint}")


# the flags of `serve --ray` alone (their defaults are RayServeOptions'; unset, they are None here)
RAY_DEPLOYMENT_FLAGS = ("replicas", "cpus_per_replica", "min_replicas", "max_replicas", "target_ongoing_requests")
RAY_FLAGS = (*RAY_DEPLOYMENT_FLAGS, "ray_address", "ray_metrics_port")


def _no_ray_options(args: argparse.Namespace) -> None:
    given = [name for name in RAY_FLAGS if getattr(args, name) is not None]
    if given:
        raise InvalidArgumentError(f"--{given[0].replace('_', '-')} needs --ray",
                                   hint="add --ray to serve on Ray Serve (pip install 'gpt2onnx[ray]')")


def _serve_on_ray(args: argparse.Namespace, directory, engine_options, server_options) -> int:
    """`gpt2onnx serve --ray`: the same app as replicas on Ray Serve (gpt2onnx/serving/ray_serve.py)."""
    import os

    from ..runtime.manifest import read_manifest
    from ..serving.options import RayServeOptions

    given = {name: getattr(args, name) for name in RAY_DEPLOYMENT_FLAGS if getattr(args, name) is not None}
    options = RayServeOptions(model_dir=str(directory.resolve()), engine=engine_options, server=server_options,
                              threads=args.threads, **given)
    if not args.ray_address:  # a local cluster: Ray reads this when imported; "0" keeps it on 127.0.0.1
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        read_manifest(directory, check_hashes=True)  # a damaged file fails now, not in every replica
    else:
        _ray_token_auth()
    from ..serving import ray_serve  # raises MissingDependencyError without ray

    scale = (f"{options.autoscale_min}..{options.max_replicas} replicas (autoscaling)"
             if options.max_replicas is not None else f"{options.replicas} replica(s)")
    print(f"gpt2onnx: starting {scale} of {directory} on Ray ({options.cpus_per_replica:g} CPU and "
          f"{options.ort_threads} ORT thread(s) each) at {args.ray_address or 'a local cluster on 127.0.0.1'}",
          file=sys.stderr, flush=True)
    keys = server_options.api_keys

    def ready(metrics_url: str):
        print(f"gpt2onnx: serving {server_options.model_name!r} on http://{args.host}:{args.port} through Ray's "
              f"proxy (playground at /, API at /v1; {'API key required' if keys else 'no API key'}); metrics of all "
              f"replicas for Prometheus at {metrics_url}; Ctrl-C stops", file=sys.stderr, flush=True)

    return ray_serve.run(options, host=args.host, port=args.port, address=args.ray_address,
                         metrics_port=args.ray_metrics_port, on_ready=ready)


def _ray_token_auth() -> None:
    """Before joining a cluster: export RAY_AUTH_MODE=token when it is unset and Ray's token is found where Ray
    looks (RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names, else ~/.ray/auth_token).

    Ray 2.60's `ray start --head` turns token authentication on when it finds a token there, but a program that
    joins by address looks for the token only when RAY_AUTH_MODE=token is set (ray.init(address="auto") alone
    looks by itself); without it every call fails with InvalidAuthToken. A client with a token joins a
    cluster without authentication as well. Ray reads the variable when imported: this runs before."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    token = os.environ.get("RAY_AUTH_TOKEN", "")
    if not token.strip():
        path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
        try:
            with open(path, encoding="utf-8") as file:
                token = file.read()
        except OSError:
            return
    if token.strip():
        os.environ["RAY_AUTH_MODE"] = "token"


def _numbers(text: str) -> list[int]:
    """"0,2,5" -> [0, 2, 5]."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0,1,2, got {text!r}") from None


def _selection(text: str) -> list[int] | None:
    """"0,2,5" -> [0, 2, 5]; "all" -> None."""
    return None if text.strip() == "all" else _numbers(text)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults (an unset option, None, says its default in its help); epilogs keep their lines."""

    unset = ""  # what an option left unset (None) means, if the help should say it

    def _get_help_string(self, action):
        if action.default is None and action.option_strings and not action.required:
            return action.help + (f" (default: {self.unset})" if self.unset else "")
        return super()._get_help_string(action)


class _GenerateFormatter(_Formatter):
    unset = "the model's"  # generate's unset options come from the model directory


def _add_generation_flags(parser: argparse.ArgumentParser) -> None:
    """A flag per generation option in settings.OPTIONS, in its order: --max-new-tokens for max_new_tokens, with
    the table's help; its type is the GenerationSettings field's (a bool is --name/--no-name) unless the table
    says otherwise. Unset (None) means the model's."""
    types = typing.get_type_hints(GenerationSettings)
    for name, option in OPTIONS.items():
        flag = dict(option.flag)
        short = [flag.pop("short")] if "short" in flag else []
        alias = [flag.pop("alias")] if "alias" in flag else []  # a shorter long flag, listed after the full one
        if "action" not in flag and types.get(name) is bool:
            flag.update(action=argparse.BooleanOptionalAction, default=None)
        elif not {"action", "type", "choices"} & set(flag):
            flag["type"] = next(t for t in typing.get_args(types[name]) or [types[name]] if t is not type(None))
        parser.add_argument(*short, "--" + name.replace("_", "-"), *alias, help=option.help, **flag)


RUNTIME_COMMANDS = ("generate", "inspect", "plot", "serve")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for `argv` (default: sys.argv[1:]): the runtime's commands, and the plugins' unless argv
    names one of the runtime's."""
    formatter = _Formatter
    parser = argparse.ArgumentParser(prog="gpt2onnx", description="GPT-2 on ONNX Runtime, verified against PyTorch.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    from ..version import __version__

    parser.add_argument("--version", action="version", version=f"gpt2onnx {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("generate", formatter_class=_GenerateFormatter, help="continue a prompt",
                            description="Continue PROMPT with an exported model and print prompt + continuation. "
                                        "Options left unset come from the model directory (generation_config.json, "
                                        "task_specific_params), then transformers' defaults.",
                            epilog=GENERATE_EXAMPLES)
    p.add_argument("prompt", metavar="PROMPT", help="text to continue; - reads it from stdin")
    p.add_argument("--model", "-m", required=True, help="exported model directory")
    _add_generation_flags(p)
    p.add_argument("--assistant-model", metavar="DIR", help="a smaller export with the same tokenizer drafts tokens "
                                                             "(the same tokens, fewer runs of the model)")
    p.add_argument("--truncate", choices=["left"], help="drop the oldest prompt tokens when it does not fit")
    p.add_argument("--allow-special-tokens", action="store_true", help="read <|endoftext|> in PROMPT as the token")
    p.add_argument("--stream", action="store_true", help="print the text as it is generated")
    p.add_argument("--json", action="store_true", help="print the results (text, token ids, finish reason, seed) "
                                                       "as JSON")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: one per physical core)")
    p.set_defaults(func=cmd_generate)

    p = commands.add_parser("inspect", formatter_class=formatter, help="list the weights, graph and manifest",
                            description="List an exported model's weights under their Hugging Face state-dict names "
                                        "(shape, dtype, bytes, quantization scheme), the graph's inputs and outputs, "
                                        "op counts and the manifest (precision, source, parity report). Needs the "
                                        "plot extra: pip install 'gpt2onnx[plot]'.")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="exported model directory")
    p.add_argument("--json", action="store_true", help="print everything as JSON, for scripts")
    p.add_argument("--check-hashes", action=argparse.BooleanOptionalAction, default=True,
                   help="verify every file's sha256 against the manifest (--no-check-hashes skips it)")
    p.set_defaults(func=cmd_inspect)

    # the other commands' parsers import their modules (the engine, plot); a command line naming one of the
    # runtime's commands needs only the names of the others (`gpt2onnx generate` then imports neither: 0.1 s)
    named = _command(sys.argv[1:] if argv is None else argv)
    for name, add in (("plot", _add_plot), ("serve", _add_serve)):
        if named in RUNTIME_COMMANDS and named != name:
            commands.add_parser(name)
        else:
            add(commands, formatter)

    if named not in commands.choices:
        plugins.register(commands, formatter)
    return parser


def _add_plot(commands, formatter) -> None:
    from . import plot

    p = commands.add_parser("plot", formatter_class=formatter, help="draw embeddings, weights and attention maps",
                            description="Write PNGs of an exported model to DIR: the positional-embedding heat map, "
                                        "chosen positional dimensions over positions, a weight matrix, and the "
                                        "attention maps of a prompt (per layer, one square per head; computed by ONNX "
                                        "Runtime from the export). Needs the plot extra: pip install 'gpt2onnx[plot]'.")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="exported model directory")
    p.add_argument("--out", "-o", required=True, default=argparse.SUPPRESS, metavar="DIR",
                   help="directory for the PNGs (created if missing)")
    p.add_argument("--prompt", default=plot.DEFAULT_PROMPT, help="text whose attention maps are drawn")
    p.add_argument("--weight", default=plot.DEFAULT_WEIGHT, metavar="NAME",
                   help="state-dict name of the weight to draw (gpt2onnx inspect lists them)")
    p.add_argument("--slice", default=plot.DEFAULT_SLICE, metavar="SLICE",
                   help="part of the weight to draw: start:stop or an index per dimension, comma-separated")
    p.add_argument("--dims", type=_numbers, default=",".join(map(str, plot.DEFAULT_DIMS)),
                   help="positional-embedding dimensions to draw over the positions")
    p.add_argument("--positions", type=int, default=plot.DEFAULT_POSITIONS, help="positions those lines cover")
    p.add_argument("--layers", type=_selection, default="all", help="layers to draw attention for (e.g. 0,5)")
    p.add_argument("--heads", type=_selection, default="all", help="heads to draw in each of those layers (e.g. 0,1)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: one per physical core)")
    p.set_defaults(func=cmd_plot)


def _add_serve(commands, formatter) -> None:
    from ..generation.engine import EngineOptions
    from ..runtime.limits import max_threads
    from ..serving.options import LOG_FORMATS, RayServeOptions, ServerOptions, host_pattern, origin_pattern

    e, h, r = EngineOptions(), ServerOptions(), RayServeOptions  # the defaults are theirs, written there once
    p = commands.add_parser("serve", formatter_class=formatter, help="serve an OpenAI-compatible API and a playground",
                            description="Serve MODEL_DIR over HTTP: OpenAI's legacy Completions API at "
                                        "/v1/completions (streaming, logprobs, echo), /v1/models, /health, "
                                        "/metrics (Prometheus), /tokenize, /detokenize, and a playground page at /. "
                                        "Concurrent requests share one continuously batched engine. SIGTERM "
                                        "drains: no new requests, the queued ones get 503, the running ones "
                                        "finish, then exit 0; a second signal stops at once (exit 130 or 143). "
                                        "Needs the serve extra: pip install 'gpt2onnx[serve]'.",
                            epilog=SERVE_EXAMPLES)
    p.error = _one_line_error(p)  # every option is checked here, before anything starts
    port, count = _number(int, 1, 65535), _number(int, 1)
    seconds = _number(float, 0)
    p.add_argument("model_dir", metavar="MODEL_DIR", help="exported model directory")
    p.add_argument("--host", type=_host, default="127.0.0.1",
                   help="address to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=port, default=8000, help="port to bind")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health "
                                                   "(visible in ps: prefer --api-key-file or $GPT2ONNX_API_KEY)")
    p.add_argument("--api-key-file", default=None, metavar="FILE",
                   help="read the accepted keys from FILE, one per line")
    p.add_argument("--max-batch", type=count, default=e.max_batch, help="rows (sequences) decoded together at most")
    p.add_argument("--max-queue", type=count, default=e.max_queue,
                   help="requests waiting to join the batch at most; beyond, 429 with Retry-After")
    p.add_argument("--prefill-chunk", type=count, default=e.prefill_chunk,
                   help="the most prompt tokens prefilled per step (a long prompt never freezes the others; "
                        "fewer when decode steps are cheaper; a burst of short prompts arriving together may take "
                        "four times as many, in one run)")
    p.add_argument("--batch-invariant", action="store_true", default=e.batch_invariant,
                   help="a seeded request's tokens never depend on the others: each runs as `generate` alone "
                        "(at int8 and int4 a sixth to a half of sequences differ without it; fp32 only by "
                        "rounding); keeps a quarter (fp32, int8) to a half (int4) of the batch's throughput")
    p.add_argument("--threads", type=_number(int, 0, max_threads()), default=0,
                   help="ONNX Runtime threads (0: one per physical core)")
    p.add_argument("--model-name", type=_text, default=None,
                   help="the model name clients pass (default: MODEL_DIR's name)")
    p.add_argument("--any-model-name", action="store_true", default=h.accept_any_model,
                   help="answer to any model name clients pass (some insist on e.g. gpt-3.5-turbo-instruct); "
                        "/v1/models still lists --model-name")
    p.add_argument("--drain-timeout", type=seconds, default=h.drain_timeout, metavar="SECONDS",
                   help="seconds SIGTERM waits for the running requests before ending them")
    p.add_argument("--read-timeout", type=_number(float, 0, open_low=True), default=h.read_timeout, metavar="SECONDS",
                   help="seconds a client has to send a request's headers, and as long again for its body; "
                        "a slower one is closed (408 once its headers came)")
    p.add_argument("--limit-concurrency", type=count, default=h.limit_concurrency, metavar="N",
                   help="open connections (and requests) at most: a request beyond gets 503 with Retry-After; "
                        "connections beyond 2N are closed at once")
    p.add_argument("--allowed-hosts", type=_items(host_pattern), action="extend", default=list(h.allowed_hosts),
                   metavar="NAMES", help="Host names to answer besides loopback and the address a client connected "
                                         "to, comma-separated: gpt2.example.com, *.example.com, or * for any")
    p.add_argument("--allowed-origins", type=_items(origin_pattern), action="extend",
                   default=list(h.allowed_origins), metavar="ORIGINS",
                   help="web pages of other origins that may call the API (CORS), comma-separated: "
                        "https://app.example.com, or * for any")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="server log level")
    p.add_argument("--log-format", default=h.log_format, choices=LOG_FORMATS,
                   help="text, or json: one JSON object per line, for log shippers")
    ray = p.add_argument_group("Ray Serve (replicas on one machine or a cluster; pip install 'gpt2onnx[ray]')")
    ray.add_argument("--ray", action="store_true", help="serve the same API as Ray Serve replicas behind Ray's proxy")
    ray.add_argument("--replicas", type=count, help=f"replicas, one engine each (default: {r.replicas})")
    ray.add_argument("--cpus-per-replica", type=_number(float, 0, open_low=True), metavar="C",
                     help="CPUs Ray reserves per replica; --threads defaults to C (replicas x C = the cores; "
                          f"default: {r.cpus_per_replica:g})")
    ray.add_argument("--min-replicas", type=_number(int, 0), default=None,
                     help="autoscale from this many replicas (default 1)")
    ray.add_argument("--max-replicas", type=count, default=None, help="autoscale up to this many replicas")
    ray.add_argument("--target-ongoing-requests", type=_number(float, 0, open_low=True), default=None, metavar="R",
                     help="autoscaling aim: requests per replica (default 0.75 x --max-batch)")
    ray.add_argument("--ray-address", type=_text, default=None, metavar="ADDRESS",
                     help="join this Ray cluster (host:port of `ray start --head`, or auto) instead of starting a "
                          "local one on 127.0.0.1; a token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
                          "~/.ray/auth_token turns on token authentication (RAY_AUTH_MODE=token)")
    ray.add_argument("--ray-metrics-port", type=port, default=None, metavar="PORT",
                     help="port where the local cluster exports every replica's metrics to Prometheus "
                          "(default: Ray picks)")
    p.set_defaults(func=cmd_serve)


def _number(kind: type, low: float, high: float | None = None, *, open_low: bool = False):
    """An argparse type: an int or a finite float from `low` (excluded with open_low) to `high`; the error says
    what is allowed."""
    name = "an integer" if kind is int else "a number"
    allowed = f"{name} from {low} to {high}" if high is not None else f"{name} {'>' if open_low else '>='} {low}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value != value or value in (float("inf"), float("-inf")) or value < low or (
                open_low and value == low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
        return value

    return parse


def _host(text: str) -> str:
    """--host: an IP address or a host name (no scheme, no port)."""
    from ..serving.options import host_pattern

    problem = argparse.ArgumentTypeError(f"must be an IP address or a host name such as 127.0.0.1, 0.0.0.0, ::1 or "
                                         f"localhost (no scheme, no port), got {text!r}")
    if text.startswith("*"):  # a pattern of --allowed-hosts, not an address
        raise problem
    try:
        return host_pattern(text)
    except InvalidArgumentError:
        raise problem from None


def _items(pattern):
    """An argparse type: comma-separated items, each checked by `pattern` (serving/options.py)."""
    def parse(text: str) -> list[str]:
        try:
            return [pattern(item) for item in text.split(",") if item.strip()]
        except InvalidArgumentError as error:
            raise argparse.ArgumentTypeError(f"{error.message}; {error.hint}") from None

    return parse


def _text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _one_line_error(parser: argparse.ArgumentParser):
    """parser.error that prints one line (no usage block): the option and what it allows, then exits 2."""
    def error(message: str):
        parser.exit(2, f"{parser.prog}: error: {message} (see {parser.prog} --help)\n")

    return error


def _command(argv: list[str]) -> str | None:
    """The command a command line names: its first argument that is not an option."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    try:
        code = args.func(args)
        if argv is None and args.command == "generate":  # the program itself (not a caller in Python)
            _exit_now(code)
        return code
    except Gpt2OnnxError as error:
        print(f"gpt2onnx: error: {error.message}", file=sys.stderr)
        if error.hint:
            print(f"hint: {error.hint}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("gpt2onnx: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (| head): not an error of ours
        sys.stderr.close()
        return 0
    except OSError as error:  # the environment (a full disk, a permission), not a bug: one line, no traceback
        print(f"gpt2onnx: error: {error}", file=sys.stderr)
        return 1
    except UnicodeEncodeError as error:  # the output's encoding (PYTHONIOENCODING, a latin-1 locale) lacks a character
        print(f"gpt2onnx: error: the output's encoding ({error.encoding}) cannot write the text ({error.reason}: "
              f"{error.object[error.start:error.end]!r})", file=sys.stderr)
        print("hint: write UTF-8: set PYTHONIOENCODING=utf-8, or a UTF-8 locale such as LANG=C.UTF-8",
              file=sys.stderr)
        return 1
    except MemoryError:  # the machine, not the arguments
        print("gpt2onnx: error: out of memory", file=sys.stderr)
        print("hint: a quantized export needs less (gpt2onnx export --precision int4 or int8); close other programs "
              "or use a machine with more memory", file=sys.stderr)
        return 1


def _exit_now(code: int) -> None:
    """End a finished one-shot process without the interpreter's teardown: freeing the model, the tokenizer
    and every module is 0.07 s of a 0.5 s `gpt2onnx generate` (paired runs on the build machine; no file is
    open and no atexit handler of ours is pending), so only the output is flushed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
