"""How a server behaves, composed once: the engine's EngineOptions, the HTTP side's ServerOptions, and for Ray
Serve both of them plus the deployment's own settings (RayServeOptions). Each default is written here or in
EngineOptions, nowhere else: the CLI's flags and `serve run`'s keys read them. No FastAPI and no Ray are
imported here, so that `gpt2onnx serve --help` works without the serve or ray extras.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..errors import InvalidArgumentError
from ..generation.engine import EngineOptions

MAX_LOGPROBS = 5  # OpenAI's legacy Completions allow logprobs 0..5
LOG_FORMATS = ("text", "json")
_NAME = re.compile(r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*\.?")


@dataclass(frozen=True)
class ServerOptions:
    """How the HTTP side behaves (the engine has its own EngineOptions)."""

    model_name: str = "gpt2"  # the `model` clients pass and /v1/models lists
    api_keys: tuple[str, ...] = ()  # accepted bearer keys; empty: no authentication
    replica_id: str = ""  # the x-gpt2onnx-replica header; "" means hostname-pid
    drain_timeout: float = 30.0  # seconds a SIGTERM waits for the requests in flight before ending them
    retry_after: int = 1  # seconds a 429 (queue full) or a 503 (draining, busy) asks the client to wait
    max_logprobs: int = MAX_LOGPROBS
    accept_any_model: bool = False  # answer to any `model` name (clients that insist on e.g. gpt-3.5-turbo-instruct)
    # where a request may come from (serving/guards.py): Host names beyond loopback and the address the client
    # connected to ("*.example.com" for subdomains, "*" for any); origins of other web pages allowed to call the
    # API ("https://app.example.com", "*" for any)
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    # the connections of `gpt2onnx serve` (uvicorn; on Ray, its proxy holds them and these two do nothing)
    read_timeout: float = 30.0  # seconds a client has to send a request's headers, then as long for its body
    limit_concurrency: int = 1024  # open connections (and requests) at most; a request beyond gets 503
    log_format: str = "text"  # "text" (uvicorn's lines) or "json" (one object per line, for log shippers)

    def __post_init__(self):
        if not isinstance(self.api_keys, tuple) or not all(isinstance(k, str) and k for k in self.api_keys):
            raise InvalidArgumentError("api_keys must be a tuple of non-empty strings",
                                       hint="pass api_keys=('KEY',), or --api-key-file with one key per line")
        if not self.model_name:
            raise InvalidArgumentError("model_name must not be empty", hint="pass --model-name NAME")
        for name in ("drain_timeout", "read_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise InvalidArgumentError(f"{name} must be a number of seconds >= 0, got {value!r}",
                                           hint=f"e.g. --{name.replace('_', '-')} 30")
        if not self.read_timeout > 0:
            raise InvalidArgumentError("read_timeout must be > 0 seconds", hint="e.g. --read-timeout 30")
        for name in ("limit_concurrency", "retry_after"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"{name} must be an integer >= 1, got {value!r}",
                                           hint=f"e.g. {name}={getattr(ServerOptions, name)} (the default)")
        if self.log_format not in LOG_FORMATS:
            raise InvalidArgumentError(f"log_format must be one of {', '.join(LOG_FORMATS)}, got {self.log_format!r}",
                                       hint="--log-format json writes one JSON object per line")
        for name, pattern in (("allowed_hosts", host_pattern), ("allowed_origins", origin_pattern)):
            values = getattr(self, name)
            if not isinstance(values, (tuple, list)):  # a list: from a YAML config's args
                raise InvalidArgumentError(f"{name} must be a tuple of strings, got {type(values).__name__}",
                                           hint=f"e.g. {name}=('*.example.com',)" if name == "allowed_hosts"
                                           else f"e.g. {name}=('https://app.example.com',)")
            object.__setattr__(self, name, tuple(pattern(value) for value in values))  # normalized


@dataclass(frozen=True)
class RayServeOptions:
    """One gpt2onnx deployment on Ray Serve: each replica's engine and HTTP options, and how Ray runs the
    replicas. Build it with keywords, or from `serve run`'s flat keys with from_dict."""

    model_dir: str  # an export directory at this path on every node (a shared or copied path; hashes checked)
    engine: EngineOptions = EngineOptions()  # each replica's engine (its max_batch and max_queue size Ray's queues)
    server: ServerOptions | None = None  # each replica's HTTP side; None: ServerOptions named after model_dir
    replicas: int = 1  # fixed number of replicas (ignored when max_replicas is set)
    cpus_per_replica: float = 1.0  # Ray CPUs reserved per replica (may be fractional, e.g. 0.5)
    threads: int = 0  # ONNX Runtime threads per replica; 0: cpus_per_replica rounded, at least 1
    min_replicas: int | None = None  # autoscaling lower bound (default 1 when max_replicas is set)
    max_replicas: int | None = None  # set it to autoscale between min_replicas and max_replicas
    target_ongoing_requests: float | None = None  # autoscaling aim per replica (default 0.75 x max_batch)
    check_hashes: bool = True  # verify every model file against the manifest's sha256 when a replica loads
    name: str = "Gpt2Onnx"  # the deployment's name
    extra: dict = field(default_factory=dict, compare=False)  # more @serve.deployment options, passed as given

    def __post_init__(self):
        if not self.model_dir:
            raise InvalidArgumentError("model_dir must name an exported model directory",
                                       hint="model_dir=/path/to/export (the same path on every node)")
        if self.server is None:
            object.__setattr__(self, "server", ServerOptions(model_name=Path(self.model_dir).resolve().name))
        for name, kind in (("engine", EngineOptions), ("server", ServerOptions)):
            if not isinstance(getattr(self, name), kind):
                given = type(getattr(self, name)).__name__
                raise InvalidArgumentError(f"{name} must be a {kind.__name__}, got {given}",
                                           hint=f"pass {name}={kind.__name__}(...)")
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, int) or self.replicas < 1:
            raise InvalidArgumentError(f"replicas must be an integer >= 1, got {self.replicas!r}", hint="e.g. 2")
        if not self.cpus_per_replica > 0:
            raise InvalidArgumentError(f"cpus_per_replica must be > 0, got {self.cpus_per_replica!r}",
                                       hint="e.g. 1, or 0.5 to pack two replicas per core")
        if self.threads < 0:
            raise InvalidArgumentError(f"threads must be >= 0 (0: from cpus_per_replica), got {self.threads}",
                                       hint="0 takes cpus_per_replica, rounded")
        if self.max_replicas is None and self.min_replicas is not None:
            raise InvalidArgumentError("min_replicas needs max_replicas", hint="give --max-replicas to autoscale")
        if self.max_replicas is not None and not (
                self.max_replicas >= 1 and 0 <= self.autoscale_min <= self.max_replicas):
            raise InvalidArgumentError(f"autoscaling needs 0 <= min_replicas <= max_replicas and max_replicas >= 1, "
                                       f"got {self.min_replicas}..{self.max_replicas}", hint="e.g. 1..4")
        if self.target_ongoing_requests is not None and not self.target_ongoing_requests > 0:
            raise InvalidArgumentError(f"target_ongoing_requests must be > 0, got {self.target_ongoing_requests}",
                                       hint="leave it unset for 0.75 x max_batch")

    @property
    def ort_threads(self) -> int:
        return self.threads or max(1, round(self.cpus_per_replica))

    @property
    def autoscale_min(self) -> int:
        return 1 if self.min_replicas is None else self.min_replicas

    @classmethod
    def from_dict(cls, args: dict) -> RayServeOptions:
        """From `serve run`'s args (strings from the command line, or YAML values), flat: a key names a field of
        RayServeOptions, EngineOptions or ServerOptions; unknown keys fail."""
        parts = {"": _fields(cls, ("engine", "server")), "engine": _fields(EngineOptions, ("on_step",)),
                 "server": _fields(ServerOptions, ("replica_id",))}
        known = {name: (part, kind) for part, names in parts.items() for name, kind in names.items()}
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise InvalidArgumentError(f"unknown option(s) {', '.join(unknown)}",
                                       hint=f"known: {', '.join(sorted(known))}")
        values: dict[str, dict] = {part: {} for part in parts}
        for key, value in args.items():
            part, kind = known[key]
            values[part][key] = _parse(key, value, kind) if isinstance(value, str) and kind != "str" else value
        model_dir = values[""].get("model_dir", "")
        server = values["server"]
        if model_dir and "model_name" not in server:
            server["model_name"] = Path(model_dir).resolve().name
        return cls(**values[""], engine=EngineOptions(**values["engine"]),
                   server=ServerOptions(**server) if model_dir else None)

    def flat(self) -> dict:
        """The keys from_dict takes, with their values (the engine's and server's too)."""
        flat = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("engine", "server")}
        flat |= {k: v for k, v in dataclasses.asdict(self.engine).items() if k != "on_step"}
        return flat | {k: v for k, v in dataclasses.asdict(self.server).items() if k != "replica_id"}


def host_pattern(text: str) -> str:
    """An allowed Host: a DNS name, "*.domain" (its subdomains), an IP address, or "*" (any); lower-cased."""
    value = text.strip().lower() if isinstance(text, str) else ""
    name = value[2:] if value.startswith("*.") else value
    if value == "*" or (_NAME.fullmatch(name) and not name.isdigit()):
        return value
    if _is_ip(value.strip("[]")):
        return value.strip("[]")  # as the Host check compares it: no brackets
    raise InvalidArgumentError(f"allowed host {text!r} is not a host name, *.domain, an IP address or *",
                               hint="e.g. --allowed-hosts gpt2.example.com,*.internal.example.com (no port, no scheme)")


def origin_pattern(text: str) -> str:
    """An allowed origin: "http(s)://host[:port]" as a browser sends it (no path), or "*" (any); lower-cased."""
    value = text.strip().lower() if isinstance(text, str) else ""
    scheme, sep, rest = value.partition("://")
    host, _, port = rest.rpartition(":") if rest.rfind(":") > rest.rfind("]") else (rest, "", "")
    if value == "*" or (sep and scheme in ("http", "https") and host and "/" not in rest
                        and (not port or (port.isdigit() and 0 < int(port) < 65536))
                        and (_NAME.fullmatch(host) or _is_ip(host.strip("[]")))):
        return value
    raise InvalidArgumentError(f"allowed origin {text!r} is not scheme://host[:port] or *",
                               hint="e.g. --allowed-origins https://app.example.com,http://localhost:3000 (no path)")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _fields(cls, leave_out: tuple[str, ...]) -> dict[str, str]:
    return {f.name: f.type for f in fields(cls) if f.name not in leave_out}


def _parse(key: str, text: str, kind: str):
    try:
        if kind.startswith("int"):
            return None if text.lower() == "none" else int(text)
        if kind.startswith("float"):
            return None if text.lower() == "none" else float(text)
        if kind == "bool":
            return {"true": True, "1": True, "false": False, "0": False}[text.lower()]
        if kind.startswith("tuple"):
            return tuple(k for k in text.split(",") if k)
    except (ValueError, KeyError):
        raise InvalidArgumentError(f"{key}={text!r} is not a valid {kind}", hint=f"give {key} as a {kind}") from None
    raise InvalidArgumentError(f"{key} cannot be given as text", hint="set it in the config file's args instead")
