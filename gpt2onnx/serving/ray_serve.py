"""gpt2onnx on Ray Serve: the app of `gpt2onnx serve` (server.create_app, unchanged) as a Ray Serve
deployment, one engine per replica, on one machine or a cluster (`gpt2onnx serve --ray`, or `serve run` with
an import path to build_app).

Each replica loads the export once (checking every file's sha256 against the manifest) and runs ONNX Runtime
on `threads` threads while Ray reserves `cpus_per_replica` CPUs for it, so replicas x threads never exceed
the cores Ray was given. Ray's proxy routes HTTP to the replicas; what a replica holds at once and what waits
in front of them are Ray's settings, derived from the engine's:

    max_ongoing_requests = max_batch   a replica gets no more requests than it has rows to run them in (a
                                       request of n > 1 rows may still wait in its engine's own queue)
    max_queued_requests  = max_queue   requests waiting in each proxy for a free replica (each proxy keeps
                                       its own queue: one per node); beyond, 429 with Retry-After
    autoscaling          min_replicas .. max_replicas, aiming at target_ongoing_requests per replica

check_health() fails once a replica's engine thread has died (Ray then replaces the replica); a stopping
replica first lets its requests in flight finish, for at most drain_timeout seconds. Every response carries
`x-gpt2onnx-replica` = the Ray replica id (`SERVE_REPLICA::app#deployment#id`, also its actor's name in the
"serve" namespace). Metrics: the app's Prometheus metrics are copied every second into Ray metrics
(ray.serve.metrics, tagged with deployment and replica), which Ray's metrics agent exports on each node for
Prometheus to scrape and sum over replicas; a /metrics request through the proxy reaches one replica only.

The app is given to Ray the documented way, `@serve.ingress(app)`: a small ASGI app that hands each request
to the app its replica built in its constructor (see _ReplicaApp). Ray is optional
(`pip install 'gpt2onnx[ray]'`); nothing else in gpt2onnx imports this module.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import socket
import threading
import time

from ..errors import Gpt2OnnxError, InvalidArgumentError, MissingDependencyError, ModelLoadError
from .options import RayServeOptions

try:
    from ray import serve
    from ray.serve.exceptions import RayServeException
except ImportError as error:  # pragma: no cover - exercised without ray
    raise MissingDependencyError(f"running on Ray Serve needs the ray extra (cannot import {error.name or error})",
                                 hint="pip install 'gpt2onnx[ray]'") from error

log = logging.getLogger("gpt2onnx.ray")
APP_NAME = "gpt2onnx"
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": a local cluster advertises 127.0.0.1 only
METRICS_PERIOD = 1.0  # seconds between copies of a replica's Prometheus metrics into Ray's
JOIN_HINT = ("is it running (ray status --address ADDRESS)? With token authentication (Ray 2.60 turns it on when "
             "`ray start` finds a token), this process needs the same token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH "
             "or ~/.ray/auth_token and RAY_AUTH_MODE=token set before Python imports ray (`gpt2onnx serve "
             "--ray-address` sets it when it finds a token)")


def deployment_options(options: RayServeOptions) -> dict:
    """The @serve.deployment options these settings mean."""
    scaling = {"num_replicas": options.replicas}
    if options.max_replicas is not None:
        target = options.target_ongoing_requests or max(1.0, 0.75 * options.engine.max_batch)
        scaling = {"autoscaling_config": {"min_replicas": options.autoscale_min, "max_replicas": options.max_replicas,
                                          "initial_replicas": max(options.autoscale_min, 1),
                                          "target_ongoing_requests": target}}
    return {"name": options.name, **scaling,
            "ray_actor_options": {"num_cpus": options.cpus_per_replica},
            "max_ongoing_requests": options.engine.max_batch,
            "max_queued_requests": options.engine.max_queue,
            **_backpressure(options.server.retry_after),
            # a stopping replica waits for its requests in flight (Ray counts a stream until its end)
            "graceful_shutdown_timeout_s": options.server.drain_timeout + 5,
            "graceful_shutdown_wait_loop_s": 0.5,
            "health_check_period_s": 2.0, "health_check_timeout_s": 10.0,
            **options.extra}


def _backpressure(retry_after: int) -> dict:
    """A full proxy queue answers 429 with Retry-After where Ray has backpressure_config (2.60 has; older
    versions answer 503, which the openai client retries too)."""
    import inspect

    if "backpressure_config" not in inspect.signature(serve.deployment).parameters:
        return {}
    return {"backpressure_config": {"status_code": 429, "retry_after_s": retry_after}}


# --- one replica -----------------------------------------------------------------------------------------

# Ray runs each replica in a process of its own; this is the app its constructor built around its engine.
_replica_app = None


class _ReplicaApp:
    """The ASGI app given to @serve.ingress: it hands every request (and the lifespan events) to the app
    of the replica in this process. Ray pickles the app it is given when the class is decorated, before any
    engine exists, so the real app, built per replica, is looked up when a request comes."""

    async def __call__(self, scope, receive, send):
        if _replica_app is None:
            raise RuntimeError("no gpt2onnx replica was constructed in this process")
        await _replica_app(scope, receive, send)


@serve.ingress(_ReplicaApp())
class Gpt2OnnxReplica:
    """One replica: the model loaded once, its engine, and server.create_app's app around it."""

    def __init__(self, options: RayServeOptions):
        global _replica_app
        from ..generation.engine import Engine
        from ..generation.loader import load
        from ..runtime.heap import freeze_startup_heap
        from .server import create_app

        self.options = options
        self.replica_id = _replica_id()
        _keep_internal_grpc_on_loopback()
        started = time.perf_counter()
        model = load(options.model_dir, threads=options.ort_threads, check_hashes=options.check_hashes)
        self.app_metrics = None  # the app's metrics; the engine's steps feed its batch-size histogram
        self.engine = Engine(model, dataclasses.replace(options.engine, on_step=self._on_step))
        app = create_app(self.engine, dataclasses.replace(options.server, replica_id=self.replica_id))
        self.app_metrics = app.state.gpt2onnx.metrics
        self.bridge = _MetricsBridge(self.app_metrics.registry)
        _replica_app = app
        freeze_startup_heap()  # a replica's process serves this model alone
        log.info("replica %s: %s loaded in %.1f s (%d ORT thread(s), pid %d)", self.replica_id, options.model_dir,
                 time.perf_counter() - started, options.ort_threads, os.getpid())

    def _on_step(self, rows: int) -> None:
        if self.app_metrics is not None:
            self.app_metrics.on_step(rows)

    def check_health(self) -> None:
        """Ray calls this every health_check_period_s; raising marks the replica unhealthy (it is replaced)."""
        if not self.engine.alive:
            raise RuntimeError(f"replica {self.replica_id}: the engine's scheduler thread has stopped")

    def __del__(self):
        """Ray has let the requests in flight finish (graceful_shutdown_timeout_s); stop the engine."""
        if getattr(self, "bridge", None) is not None:
            self.bridge.stop()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close(drain=True, timeout=self.options.server.drain_timeout)


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.to_full_id_str()
    except (RayServeException, AttributeError):  # outside a replica, or an older Ray's context
        return f"{socket.gethostname()}-{os.getpid()}"


GRPC_PATCH_CHECKED_ON = ("2.60",)  # Ray versions whose replica.py binds "[::]:0" the way the patch below expects


def _keep_internal_grpc_on_loopback() -> None:
    """On a loopback-only cluster, bind the replica's inter-deployment gRPC server to 127.0.0.1.

    Ray Serve 2.60 binds it to "[::]:0" (every interface) with no setting and no public API to change that
    (ray-project/ray#64544); the proxy reaches a replica at its node's address, which on a local cluster is
    127.0.0.1, so loopback suffices there. On a real cluster (a node address other than 127.0.0.1) nothing
    changes. The server starts after this replica's constructor, so replacing the private
    `ray.serve._private.replica.add_port_to_grpc_server` here is in time; on a Ray version the patch was not
    checked on (GRPC_PATCH_CHECKED_ON) it is left alone, and a line in the replica's log says so.
    """
    import ray

    try:
        if ray.util.get_node_ip_address() != "127.0.0.1":
            return
        version = ".".join(ray.__version__.split(".")[:2])
        if version not in GRPC_PATCH_CHECKED_ON:
            log.warning("Ray %s: Ray Serve's inter-deployment gRPC server keeps Ray's own address (every "
                        "interface): gpt2onnx binds it to 127.0.0.1 on Ray %s only (ray-project/ray#64544)",
                        ray.__version__, ", ".join(GRPC_PATCH_CHECKED_ON))
            return
        from ray.serve._private import replica as ray_replica

        bind = getattr(ray_replica, "add_port_to_grpc_server", None)
        if bind is None or getattr(bind, "gpt2onnx_loopback", False):  # no such server, or done already
            return

        def loopback(server, address):
            return bind(server, "127.0.0.1:0" if address == "[::]:0" else address)

        loopback.gpt2onnx_loopback = True
        ray_replica.add_port_to_grpc_server = loopback
    except Exception:  # another Ray version: leave its default
        log.warning("could not keep Ray Serve's inter-deployment gRPC server on 127.0.0.1", exc_info=True)


class _MetricsBridge:
    """Copies a replica's Prometheus registry into Ray metrics every METRICS_PERIOD seconds: counters by their
    increase, gauges by value, histograms bucket by bucket (bucket counts exact; the sum approximated by
    each bucket's middle). Ray adds the deployment, replica and application tags."""

    def __init__(self, registry, period: float = METRICS_PERIOD):
        self.registry, self.period = registry, period
        self.ray_metrics: dict[str, object] = {}
        self.last: dict[tuple, float] = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="gpt2onnx-ray-metrics", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()

    def _run(self) -> None:
        while not self.stopping.wait(self.period):
            try:
                self.copy()
            except Exception:  # metrics never take a replica down
                log.exception("copying metrics to Ray failed")

    def copy(self) -> None:
        from ray.serve import metrics

        for family in self.registry.collect():
            kind = family.type
            if kind not in ("counter", "gauge", "histogram"):
                continue
            labels = tuple(sorted({k for s in family.samples for k in s.labels if k != "le"}))
            if kind == "counter":
                ray_metric = self._metric(family.name, metrics.Counter, family.documentation, labels)
                for sample in family.samples:
                    if sample.name.endswith("_total"):
                        delta = self._delta(sample, sample.value)
                        if delta > 0:
                            ray_metric.inc(delta, tags=dict(sample.labels) or None)
            elif kind == "gauge":
                ray_metric = self._metric(family.name, metrics.Gauge, family.documentation, labels)
                for sample in family.samples:
                    ray_metric.set(sample.value, tags=dict(sample.labels) or None)
            else:
                buckets = sorted({float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket")})
                finite = [b for b in buckets if math.isfinite(b)]
                ray_metric = self._metric(family.name, metrics.Histogram, family.documentation, labels,
                                          boundaries=finite)
                previous_bound, previous_count = 0.0, 0.0
                for sample in sorted((s for s in family.samples if s.name.endswith("_bucket")),
                                     key=lambda s: float(s.labels["le"])):
                    bound = float(sample.labels["le"])
                    in_bucket = sample.value - previous_count  # prometheus buckets are cumulative
                    previous_count = sample.value
                    new = int(self._delta(sample, in_bucket))
                    value = (previous_bound + bound) / 2 if math.isfinite(bound) else previous_bound * 1.5 or 1.0
                    previous_bound = bound if math.isfinite(bound) else previous_bound
                    for _ in range(max(0, new)):
                        ray_metric.observe(value)

    def _metric(self, name, cls, documentation, labels, **options):
        found = self.ray_metrics.get(name)
        if found is None:
            found = self.ray_metrics[name] = cls(name, description=documentation, tag_keys=labels or None,
                                                 **options)
        return found

    def _delta(self, sample, value: float) -> float:
        key = (sample.name, tuple(sorted(sample.labels.items())))
        delta = value - self.last.get(key, 0.0)
        self.last[key] = value
        return delta


# --- building and running the application ----------------------------------------------------------------


def deployment(options: RayServeOptions):
    """The Ray Serve application: the deployment bound to its options (pass it to serve.run)."""
    return serve.deployment(Gpt2OnnxReplica, **deployment_options(options)).bind(options)


def build_app(args: dict):
    """The application builder for `serve run gpt2onnx.serving.ray_serve:build_app key=value ...` or a config file's
    `import_path: gpt2onnx.serving.ray_serve:build_app` with `args:` (RayServeOptions.from_dict's flat keys)."""
    return deployment(RayServeOptions.from_dict(dict(args)))


def run(options: RayServeOptions, *, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
        num_cpus: float | None = None, metrics_port: int | None = None, ready_timeout: float = 300.0,
        on_ready=None) -> int:
    """Deploy on Ray and serve on host:port through Ray's proxy until SIGTERM / Ctrl-C; then delete the
    application (each replica first finishes its requests in flight) and stop the Ray cluster if this call
    started it. Returns 0; raises ModelLoadError when the replicas could not start.

    address: a running cluster ("auto", "ray://..." or "host:port"); None starts a local cluster on
        127.0.0.1 with num_cpus CPUs (default: replicas x cpus_per_replica, at least the machine's cores).
    metrics_port: where a local cluster's metrics agent serves Prometheus text (None: Ray picks a port).
    on_ready: called with the Ray metrics URL once the deployment answers /health.
    """
    import ray

    started_ray = address is None
    if started_ray:
        from .server import check_address

        check_address(host, port)  # a busy port fails in one line now, not after Ray started
        wanted = options.cpus_per_replica * (options.max_replicas or options.replicas)
        start_local_cluster(num_cpus=num_cpus or max(wanted, os.cpu_count() or 1), metrics_port=metrics_port)
    else:
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except ConnectionError as error:
            raise Gpt2OnnxError(f"cannot join the Ray cluster at {address}: {error}", hint=JOIN_HINT) from None
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
        try:
            serve.run(deployment(options), name=APP_NAME, route_prefix="/", blocking=False)
        except RuntimeError as error:  # the replicas' constructors failed (Ray retried them)
            first = next((line for line in str(error).splitlines() if "Error" in line), str(error).splitlines()[0])
            raise ModelLoadError(f"the replicas could not start: {first.strip()}",
                                 hint="see the replicas' logs in /tmp/ray/session_latest/logs/serve/") from None
        _wait_ready(f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/health", ready_timeout, stop)
        if on_ready is not None:
            node = next((n for n in ray.nodes() if n.get("Alive")), {})
            on_ready(f"http://{node.get('NodeManagerAddress', '127.0.0.1')}:{node.get('MetricsExportPort')}/metrics")
        stop.wait()
        log.info("stopping: deleting the application (replicas drain for at most %.0f s)",
                 options.server.drain_timeout)
        serve.delete(APP_NAME)
        if started_ray:
            serve.shutdown()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if started_ray:
            ray.shutdown()
    return 0


def start_local_cluster(*, num_cpus: float, metrics_port: int | None = None) -> None:
    """ray.init of a one-machine cluster bound to 127.0.0.1 only, without the dashboard.

    Ray picks the machine's network address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set before ray
    was first imported (it reads it at import): `gpt2onnx serve --ray` sets it; a program that imports ray
    itself must set it first. A cluster that would not stay on loopback is stopped again, with that hint.
    """
    import ray

    os.environ.setdefault(LOOPBACK_ENV, "0")  # for the processes Ray starts
    extra = {} if metrics_port is None else {"_metrics_export_port": metrics_port}
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False, **extra)
    node = ray.util.get_node_ip_address()
    if node != "127.0.0.1":
        ray.shutdown()
        raise InvalidArgumentError(f"the local Ray cluster would listen on {node}, not only on 127.0.0.1",
                                   hint=f"set {LOOPBACK_ENV}=0 in the environment before Python imports ray")


def _wait_ready(url: str, timeout: float, stop: threading.Event) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while not stop.is_set():
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:  # our own proxy
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise InvalidArgumentError(f"the deployment did not become healthy at {url} in {timeout:.0f} s",
                                       hint="see the replicas' logs under /tmp/ray/session_latest/logs/serve")
        stop.wait(0.5)
