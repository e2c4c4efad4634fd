"""`gpt2onnx serve --ray`: the server's own OpenAI-client tests, unchanged, through Ray's proxy to 2 replicas
(a local cluster on 127.0.0.1, started by the CLI: 0.5 CPU and 1 ORT thread per replica); both replicas
serve; a replica killed in the middle of 40 requests costs no request and comes back; 429 on overflow; a
closed stream frees its rows on its replica; metrics reach Ray's exporter; SIGTERM drains, then stops Ray."""

import asyncio
import collections
import concurrent.futures
import ipaddress
import os
import re
import signal
import subprocess
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from helpers import openai_client

pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install 'gpt2onnx[ray]')")

# the serve suite's tests, run here unchanged against the Ray proxy (fixtures live, client, model, reference)
from test_server import (  # noqa: F401
    NAME,
    PROMPT,
    free_port,
    library,
    start_cli,
    stop_cli,
    test_a_drawn_seed_is_reported_and_replays,
    test_chat_route_says_to_use_completions,
    test_echo_logprobs_scores_the_prompt_like_pytorch,
    test_generated_logprobs_equal_pytorch,
    test_logit_bias_forces_a_token,
    test_n3_times_two_prompts_gives_six_choices_in_order,
    test_seeded_request_alone_and_among_15_concurrent_ones,
    test_seeded_request_equals_library,
    test_stop_string_ends_with_finish_reason_stop,
    test_stream_chunks_join_to_the_whole_text,
    test_tokenize_detokenize_round_trip,
    test_unknown_route_and_models,
)

import gpt2onnx

REPLICAS, MAX_BATCH, MAX_QUEUE = 2, 4, 40  # 2 x 4 requests run, 40 wait in the proxy, the next one gets 429
REPLICA_PROCESS = b"ray::ServeReplica:gpt2onnx:Gpt2Onnx"  # the title Ray gives a replica's process
HEADER = "x-gpt2onnx-replica"


@dataclass
class Cluster:
    process: subprocess.Popen
    url: str
    port: int
    metrics_url: str


@pytest.fixture(scope="module")
def cluster(trained_export):
    metrics_port = free_port()
    process, url = start_cli(trained_export, "--ray", "--replicas", str(REPLICAS), "--cpus-per-replica", "0.5",
                             "--threads", "1", "--max-batch", str(MAX_BATCH), "--max-queue", str(MAX_QUEUE),
                             "--ray-metrics-port", str(metrics_port), "--drain-timeout", "60")
    yield Cluster(process, url, int(url.rsplit(":", 1)[1]), f"http://127.0.0.1:{metrics_port}/metrics")
    stop_cli(process)


@pytest.fixture(scope="module")
def live(cluster):
    return cluster


@pytest.fixture(scope="module")
def client(cluster):
    return openai_client(cluster.url, timeout=60)


@pytest.fixture(scope="module")
def model(trained_export):
    return gpt2onnx.load(trained_export)


@pytest.fixture(scope="module")
def reference(trained_reference):
    return trained_reference


def replica_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and Path(f"/proc/{entry}/cmdline").read_bytes().startswith(REPLICA_PROCESS):
                pids.append(int(entry))
        except OSError:
            pass
    return sorted(pids)


def descendants(root: int) -> set[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit():
                parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            pass
    found, grew = {root}, True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in found} - found
        found |= more
        grew = bool(more)
    return found


def replicas_answering(url: str, requests: int = 20) -> collections.Counter:
    """Replica ids in the header of `requests` concurrent completions."""
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = pool.map(lambda i: httpx.post(url + "/v1/completions", timeout=60, json={
            "prompt": PROMPT, "max_tokens": 8, "seed": i}), range(requests))
        return collections.Counter(answer.headers[HEADER] for answer in answers if answer.status_code == 200)


def replica_metric(url: str, replica: str, name: str, timeout: float = 10, absent: float | None = None) -> float:
    """A metric of one replica (`absent` if it has no sample yet): /metrics through the proxy reaches one
    replica, named by the header."""
    deadline = time.monotonic() + timeout
    while True:
        answer = httpx.get(url + "/metrics", timeout=10)
        if answer.headers[HEADER] == replica:
            found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", answer.text, re.MULTILINE)
            assert found or absent is not None, f"{name} not in /metrics"
            return float(found.group(1)) if found else absent
        assert time.monotonic() < deadline, f"/metrics never reached replica {replica}"


# --- Ray's side ---------------------------------------------------------------------------------------------


def test_both_replicas_serve_on_loopback_only(cluster):
    seen = replicas_answering(cluster.url)
    print(f"20 requests over the replicas: {dict(seen)}")
    assert len(seen) == REPLICAS and all(r.startswith("SERVE_REPLICA::gpt2onnx#Gpt2Onnx#") for r in seen)
    assert len(replica_pids()) == REPLICAS
    # every socket the CLI and the Ray processes it started listen on is on loopback (read from /proc: no tool needed)
    addresses = listening_addresses(descendants(cluster.process.pid))
    assert (ipaddress.ip_address("127.0.0.1"), cluster.port) in addresses  # the proxy is seen: real sockets are read
    exposed = [(ip, port) for ip, port in addresses if not (ip.is_loopback or getattr(ip, "ipv4_mapped", None)
                                                            and ip.ipv4_mapped.is_loopback)]
    assert not exposed, f"listening beyond loopback: {exposed}"


def listening_addresses(pids) -> set[tuple]:
    """The TCP (address, port) pairs these processes listen on, read from /proc."""
    inodes = set()
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:  # the process ended
            continue
        for fd in fds:
            try:
                link = os.readlink(fd)
            except OSError:  # closed meanwhile
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: LISTEN
                address, port = local.split(":")
                words = [bytes.fromhex(address[i:i + 8])[::-1] for i in range(0, len(address), 8)]
                found.add((ipaddress.ip_address(b"".join(words)), int(port, 16)))
    return found


def wait_for(value: float, read, seconds: float = 5) -> float:
    """Poll read() until it returns value; the time that took."""
    start = time.monotonic()
    while read() != value:
        assert time.monotonic() - start < seconds, f"not {value} after {seconds} s"
    return time.monotonic() - start


def test_a_closed_stream_frees_its_rows_on_its_replica(cluster, client):
    """One long stream held on each replica (streams are opened until both replicas hold one); closing one
    frees its row on its replica, whose /metrics the proxy then reaches (it has nothing left in flight)."""
    held: dict[str, list] = {}
    for seed in range(1, 9):
        stream = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=900, stream=True, seed=seed,
                                           extra_body={"ignore_eos": True})
        next(iter(stream))
        held.setdefault(stream.response.headers[HEADER], []).append(stream)
        if len(held) == REPLICAS:
            break
    assert len(held) == REPLICAS, "8 streams all went to one replica"
    for streams in held.values():
        for extra in streams[1:]:
            extra.close()
    (replica, streams), (_, others) = held.items()
    stream, other = streams[0], others[0]

    def rows() -> float:
        return replica_metric(cluster.url, replica, "gpt2onnx_rows_running")

    wait_for(1, rows)
    cancelled = replica_metric(cluster.url, replica, 'gpt2onnx_requests_total{status="cancelled"}', absent=0)
    stream.close()
    print(f"row freed on {replica} {1000 * wait_for(0, rows):.0f} ms after close")
    assert replica_metric(cluster.url, replica, 'gpt2onnx_requests_total{status="cancelled"}') == cancelled + 1
    other.close()


async def _flood(url: str, held: int):
    """`held` long requests, one every 20 ms (n=4 rows each: a replica runs one at a time), then probes until
    one is refused. Returns (refused among the held ones, probes sent, the refusal)."""
    client = openai_client(url, asynchronous=True, timeout=120)
    options = {"model": NAME, "prompt": PROMPT, "max_tokens": 1000, "n": MAX_BATCH, "seed": 3, "stream": True,
               "extra_body": {"ignore_eos": True}}
    tasks = []
    try:
        for _ in range(held):
            tasks.append(asyncio.create_task(client.completions.create(**options)))
            await asyncio.sleep(0.02)
        deadline = time.monotonic() + 60
        # a replica takes MAX_BATCH requests and runs one (n=4 rows): its stream starts, the others wait in its
        # engine's queue, unanswered until they start (a stream answers once its request leaves the queue)
        while sum(task.done() for task in tasks) < REPLICAS:
            assert time.monotonic() < deadline, "the replicas did not take their requests"
            await asyncio.sleep(0.02)
        await asyncio.sleep(1.0)
        refused = [task for task in tasks if task.done() and task.exception() is not None]
        probe = client.with_options(timeout=5)
        for probes in range(1, 6):  # Ray counts its queue loosely under bursts: a probe may still be queued
            try:
                await probe.completions.create(**{**options, "stream": False, "max_tokens": 2})
            except openai.RateLimitError as error:
                return refused, probes, error
            except openai.APITimeoutError:
                continue
        raise AssertionError("5 requests beyond the limit were queued, none refused")
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await (await task).close()
            except (asyncio.CancelledError, openai.APIError):  # cancelled before it answered, or refused
                pass
        await client.close()


def test_queue_overflow_is_a_rate_limit_error_with_retry_after(cluster):
    """2 replicas x 4 running + 40 waiting in the proxy fit; the next request gets Ray's 429."""
    refused, probes, error = asyncio.run(_flood(cluster.url, REPLICAS * MAX_BATCH + MAX_QUEUE))
    print(f"{REPLICAS * MAX_BATCH + MAX_QUEUE} requests sent: {len(refused)} refused; refused probe: #{probes}")
    assert len(refused) <= 2, [task.exception() for task in refused]  # within the limits (Ray's count is loose)
    assert error.status_code == 429 and error.response.headers["retry-after"] == "1"
    deadline = time.monotonic() + 30  # the flood was cancelled (the waiting ones too): the replicas are free
    for replica in replicas_answering(cluster.url, 8):
        while replica_metric(cluster.url, replica, "gpt2onnx_rows_running"):
            assert time.monotonic() < deadline, f"the cancelled flood still runs on {replica}"
            time.sleep(0.2)


def test_a_replica_killed_amid_40_requests_costs_none_and_comes_back(cluster, model):
    attempts, statuses, served_by = collections.Counter(), collections.defaultdict(list), collections.Counter()

    def answered(response):
        statuses[response.request.headers["x-call"]].append(response.status_code)
        if response.status_code == 200:
            served_by[response.headers[HEADER]] += 1

    http = httpx.Client(timeout=60, event_hooks={
        "request": [lambda request: attempts.update([request.headers["x-call"]])], "response": [answered]})
    client = openai_client(cluster.url, max_retries=2, timeout=60,
                           http_client=http)
    before_ids, before_pids = set(replicas_answering(cluster.url, 8)), replica_pids()

    def call(i: int):
        try:
            return client.completions.create(model=NAME, prompt=PROMPT, max_tokens=48, seed=i, temperature=1,
                                             extra_headers={"x-call": str(i)}, extra_body={"ignore_eos": True})
        except openai.APIError as error:
            return error

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        calls = [pool.submit(call, i) for i in range(40)]
        deadline = time.monotonic() + 20
        while sum(1 for codes in statuses.values() if 200 in codes) < 4:  # some answered: the rest in flight
            assert time.monotonic() < deadline
            time.sleep(0.01)
        victim = before_pids[0]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic() - started
        _, pending = concurrent.futures.wait(calls, timeout=120)
    assert not pending, f"{len(pending)} requests still hang 120 s after the kill"
    answers = [future.result() for future in calls]
    first = sum(1 for i in range(40) if attempts[str(i)] == 1 and not isinstance(answers[i], Exception))
    retried = sum(1 for i in range(40) if attempts[str(i)] > 1 and not isinstance(answers[i], Exception))
    failed = [answer for answer in answers if isinstance(answer, Exception)]
    print(f"killed replica pid {victim} at {killed_at:.1f} s; 40 requests: {first} completed first try, {retried} "
          f"after a retry, {len(failed)} failed; all done at {time.monotonic() - started:.1f} s; statuses seen: "
          f"{dict(collections.Counter(code for codes in statuses.values() for code in codes))}")
    assert not failed, f"{len(failed)} requests failed: {failed[0]}"
    for i in (0, 17, 39):  # a retried request is the same seeded request: the same text
        assert answers[i].choices[0].text == library(model, PROMPT, max_new_tokens=48, seed=i, do_sample=True,
                                                      ignore_eos=True).text
    recovered = time.monotonic()
    while True:  # Serve replaces the dead replica: two replicas again, one of them new
        ids, pids = set(replicas_answering(cluster.url, 8)), replica_pids()
        if len(ids) == REPLICAS and len(pids) == REPLICAS and victim not in pids:
            break
        assert time.monotonic() - recovered < 90, f"not back to {REPLICAS} replicas: {ids}, pids {pids}"
        time.sleep(0.5)
    print(f"{REPLICAS} replicas answer again {time.monotonic() - recovered:.1f} s after the burst; new: "
          f"{sorted(ids - before_ids)}; the 40 answered by {dict(served_by)}")
    assert len(ids - before_ids) == 1


def test_metrics_reach_rays_exporter_per_replica(cluster):
    """The replicas' metrics, copied into Ray's: one series per replica on the node's exporter."""
    deadline = time.monotonic() + 60
    while True:
        text = httpx.get(cluster.metrics_url, timeout=10).text
        series = re.findall(r'^ray_gpt2onnx_generation_tokens_total\{[^}]*replica="([^"]+)"[^}]*\} ([0-9.e+]+)$',
                            text, re.MULTILINE)
        if len({replica for replica, _ in series}) >= REPLICAS:
            break
        assert time.monotonic() < deadline, "ray_gpt2onnx_generation_tokens_total per replica never appeared"
        time.sleep(1)
    total = sum(float(value) for _, value in series)
    print(f"ray_gpt2onnx_generation_tokens_total over {len(series)} replica series: {total:.0f}")
    assert total > 0
    for name in ("ray_gpt2onnx_time_to_first_token_seconds_bucket", "ray_gpt2onnx_rows_running",
                 "ray_gpt2onnx_requests_total"):
        assert re.search(rf"^{name}\{{", text, re.MULTILINE), f"{name} missing"


# --- last: SIGTERM drains the stream in flight, then the CLI stops the application and Ray -------------------


def test_sigterm_lets_a_stream_finish_then_stops_ray(cluster):
    client = openai_client(cluster.url, timeout=60)
    stream = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=300, stream=True, seed=4, logprobs=0,
                                       extra_body={"ignore_eos": True})
    chunks = iter(stream)
    got = [next(chunks), next(chunks)]
    cluster.process.send_signal(signal.SIGTERM)
    got += list(chunks)
    assert sum(len(c.choices[0].logprobs.tokens) for c in got) == 300
    assert got[-1].choices[0].finish_reason == "length"
    assert cluster.process.wait(60) == 0
    assert replica_pids() == []


# --- without a cluster ----------------------------------------------------------------------------------------


def test_options_map_to_ray_serve_settings():
    from ray.serve.schema import ServeDeploySchema

    from gpt2onnx.generation.engine import EngineOptions
    from gpt2onnx.serving.options import RayServeOptions
    from gpt2onnx.serving.ray_serve import Gpt2OnnxReplica, build_app, deployment_options

    options = RayServeOptions(model_dir="/m", replicas=3, cpus_per_replica=0.5,
                              engine=EngineOptions(max_batch=8, max_queue=20))
    settings = deployment_options(options)
    assert options.ort_threads == 1 and settings["num_replicas"] == 3
    assert settings["ray_actor_options"] == {"num_cpus": 0.5}
    assert (settings["max_ongoing_requests"], settings["max_queued_requests"]) == (8, 20)
    assert settings["backpressure_config"] == {"status_code": 429, "retry_after_s": 1}
    scaled = deployment_options(RayServeOptions(model_dir="/m", max_replicas=4, cpus_per_replica=2))
    assert "num_replicas" not in scaled and scaled["autoscaling_config"]["max_replicas"] == 4
    assert scaled["autoscaling_config"]["target_ongoing_requests"] == 12  # 0.75 x max_batch 16
    # `serve run gpt2onnx.serving.ray_serve:build_app key=value`: text values are parsed to the fields' types
    parsed = RayServeOptions.from_dict({"model_dir": "/m", "replicas": "2", "cpus_per_replica": "1.5",
                                        "api_keys": "a,b", "check_hashes": "false"})
    assert (parsed.replicas, parsed.cpus_per_replica, parsed.server.api_keys, parsed.check_hashes) == (
        2, 1.5, ("a", "b"), False)
    assert parsed.server.model_name == "m"  # the directory's name, as `gpt2onnx serve` names it
    for bad in ({"model_dir": "/m", "replica": 2}, {"model_dir": "/m", "replicas": 0},
                {"model_dir": "/m", "min_replicas": 2}, {"model_dir": "/m", "max_batch": "x"}):
        with pytest.raises(gpt2onnx.errors.InvalidArgumentError):
            RayServeOptions.from_dict(bad)
    # the shipped `serve run` config is valid for Ray and builds
    import yaml

    config = yaml.safe_load((Path(__file__).parents[1] / "deploy" / "ray_serve.yaml").read_text())
    ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") else \
        ServeDeploySchema.parse_obj(config)
    application = config["applications"][0]
    assert application["import_path"] == "gpt2onnx.serving.ray_serve:build_app"
    # the application serves the replica class with the file's settings (Application has no public accessor)
    args = application["args"]
    built = build_app(args)._bound_deployment
    assert built.func_or_class is Gpt2OnnxReplica and len(built.init_args) == 1 and not built.init_kwargs
    # the replica gets the file's values, and the defaults where the file has none (its autoscaling is commented out)
    expected = {"model_dir": "/shared/models/gpt2-int4", "model_name": "gpt2", "replicas": 4, "cpus_per_replica": 2,
                "threads": 2, "max_batch": 16, "max_queue": 64, "drain_timeout": 30, "min_replicas": None,
                "max_replicas": None, "target_ongoing_requests": None, "prefill_chunk": 64, "api_keys": (),
                "retry_after": 1, "check_hashes": True, "name": "Gpt2Onnx", "extra": {}}
    options = built.init_args[0]
    assert isinstance(options, RayServeOptions) and {k: options.flat()[k] for k in expected} == expected
    assert options.ort_threads == 2
    assert (built.num_replicas, built.ray_actor_options, built.max_ongoing_requests, built.max_queued_requests) == (
        args["replicas"], {"num_cpus": args["cpus_per_replica"]}, args["max_batch"], args["max_queue"]) == (
        4, {"num_cpus": 2}, 16, 64)

    replica = types.SimpleNamespace(engine=types.SimpleNamespace(alive=False), replica_id="r")
    with pytest.raises(RuntimeError, match="engine"):
        Gpt2OnnxReplica.check_health(replica)  # Ray then replaces the replica
    replica.engine.alive = True
    Gpt2OnnxReplica.check_health(replica)


def test_ray_flags_need_ray(tiny_export):
    root = str(Path(gpt2onnx.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "gpt2onnx", "serve", str(tiny_export), "--replicas", "2"],
                          check=False, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--replicas needs --ray" in done.stderr and "Traceback" not in done.stderr


# --- last (the module's cluster has stopped): the cluster recipe of docs/ray.md, as written ----------------------


def recipe() -> list[list[str]]:
    """The commands of docs/ray.md's "Join a cluster started with `ray start`" block, split as a shell would."""
    import shlex

    text = (Path(__file__).parents[1] / "docs" / "ray.md").read_text(encoding="utf-8")
    block = text.split("<!-- recipe: ray start -->", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True) for line in block.splitlines() if shlex.split(line, comments=True)]


def test_the_cluster_recipe_works_as_written(trained_export, tmp_path, monkeypatch):
    """`ray start --head` on 127.0.0.1, then `gpt2onnx serve DIR --ray --ray-address 127.0.0.1:PORT`, one request
    through the openai client, then the cluster stops. The issue: on Ray 2.60, with token authentication on (a token
    in ~/.ray/auth_token or RAY_AUTH_TOKEN_PATH), serve failed with InvalidAuthToken unless RAY_AUTH_MODE=token was
    exported. Here the token is a file of the test's own (RAY_AUTH_TOKEN_PATH) and RAY_AUTH_MODE is unset.

    Run on a machine shared with other tests, the recipe gets free ports and its own --temp-dir, and `ray start`
    gets --block so that the head is stopped by its pid: `ray stop` would stop every Ray process of the machine."""
    import shutil
    import tempfile
    import uuid

    ray_cli = Path(sys.executable).with_name("ray")
    if not ray_cli.exists() and shutil.which("ray") is None:
        pytest.skip("the `ray` command is not installed (pip install 'gpt2onnx[ray]')")
    exports, start, serve, stop = recipe()
    assert exports[:2] == ["export", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"] and stop == ["ray", "stop"]
    assert start[:3] == ["ray", "start", "--head"] and serve[:2] == ["gpt2onnx", "serve"]
    for flag in ("--node-ip-address=127.0.0.1", "--num-cpus=2", "--include-dashboard=false"):
        assert flag in start
    gcs = free_port()
    head_command = [str(ray_cli if ray_cli.exists() else shutil.which("ray")), *start[1:]]
    head_command = [f"--port={gcs}" if part.startswith("--port=") else part for part in head_command]
    scratch = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    head_command += ["--block", f"--ray-client-server-port={free_port()}",
                     f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={scratch}"]
    token = tmp_path / "auth_token"
    token.write_text(uuid.uuid4().hex)
    monkeypatch.setenv(exports[1].split("=")[0], exports[1].split("=")[1])
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    monkeypatch.setenv("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "1")  # our head holds nothing to drain
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    log = (tmp_path / "head.log").open("w")
    head = subprocess.Popen(head_command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    server = None
    try:
        deadline = time.monotonic() + 60
        while "Ray runtime started" not in (tmp_path / "head.log").read_text():
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "ray start did not start the head in 60 s"
            time.sleep(0.5)
        assert "Token authentication is enabled" in (tmp_path / "head.log").read_text()
        address = [part for part in serve if part.startswith("127.0.0.1:")]
        assert address and "--ray" in serve and "--ray-address" in serve
        args = [f"127.0.0.1:{gcs}" if part == address[0] else part for part in serve[3:]]
        started = time.monotonic()
        server, url = start_cli(trained_export, *args)
        answer = openai_client(url, timeout=60).completions.create(model=NAME, prompt=PROMPT, max_tokens=8, seed=1)
        print(f"serving through the joined cluster {time.monotonic() - started:.1f} s after `gpt2onnx serve`: "
              f"{answer.choices[0].text!r}")
        assert answer.choices[0].text and answer.usage.completion_tokens == 8
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0
    finally:
        if server is not None:
            stop_cli(server)
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes of its head
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        log.close()
        shutil.rmtree(scratch, ignore_errors=True)
