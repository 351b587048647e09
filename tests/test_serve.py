"""``trtopt serve`` against a live Triton Inference Server (the one bundled in nvidia-pytriton).

The server listens on 127.0.0.1 only, on ports picked at run time; every load
loop is bounded in count and time. One server is shared by the module's core
tests; the tests that kill or stop a server start their own through the CLI
and are marked slow. Skipped, with the reason, where the bundled server
cannot run (not Linux x86-64/aarch64, glibc < 2.35, a Python it has no
backend for, a static interpreter, or nvidia-pytriton not installed).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import trtopt
from trtopt.errors import ConfigError, DependencyError, InputError
from trtopt.module import CompiledModule
from trtopt.serve import (
    ACCESS_HEADER,
    clean_stale,
    require_serving,
    server_environment,
    serving_unavailable_reason,
)
from trtopt.triton import build_config, export_triton

try:  # the clients come with trtopt[serve]; without them only the live tests are skipped
    import tritonclient.grpc as grpc_client
    import tritonclient.http as http_client
    from tritonclient.utils import InferenceServerException
except (ImportError, RuntimeError) as exc:  # tritonclient raises RuntimeError for a missing protocol extra
    CLIENTS_MISSING: str | None = f"tritonclient[grpc,http] is not installed ({exc})"
    InferenceServerException = Exception
else:
    CLIENTS_MISSING = None

REASON = serving_unavailable_reason() or CLIENTS_MISSING
live = pytest.mark.skipif(REASON is not None, reason=f"the bundled Triton server cannot run here: {REASON}")

HOST = "127.0.0.1"
CLIENT_TIMEOUT_S = 60.0


# ------------------------------------------------------------------ models


class Tagger(torch.nn.Module):
    """float features + int64 ids (shape [N]) -> a dict of a float and a bool output."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.embed = torch.nn.Embedding(10, 3)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        score = self.linear(x) + self.embed(ids)
        return {"score": score, "positive": score > 0}


class HalfPair(torch.nn.Module):
    """Two FP16 inputs -> a tuple of two FP16 outputs."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a + b, a * b


def _compile_tagger() -> CompiledModule:
    torch.manual_seed(0)
    return trtopt.compile(
        Tagger().eval(),
        (torch.randn(2, 4), torch.tensor([1, 2])),
        dynamic_shapes={"x": {0: (1, 4, 16)}, "ids": {0: (1, 4, 16)}},
        backend="onnxruntime",
    )


@pytest.fixture(scope="module")
def tagger() -> CompiledModule:
    return _compile_tagger()


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory) -> Path:
    module = trtopt.compile(
        HalfPair().eval(),
        (torch.randn(2, 3).half(), torch.randn(2, 3).half()),
        dynamic_shapes={"a": {0: (1, 4, 8)}, "b": {0: (1, 4, 8)}},
        backend="onnxruntime",
    )
    return module.save(tmp_path_factory.mktemp("pair") / "pair.trtopt")


@pytest.fixture(scope="module")
def pair(pair_file) -> CompiledModule:
    return trtopt.load(pair_file, backend="onnxruntime")


# A long batching window, so that 16 concurrent requests are batched even on a busy machine.
QUEUE_DELAY_US = 50_000


@pytest.fixture(scope="module")
def server(tagger, pair_file):
    """One live server for the core tests: a module object and a module file, on free ports."""
    if REASON is not None:
        pytest.skip(f"the bundled Triton server cannot run here: {REASON}")
    with trtopt.serve(
        {"tagger": tagger, "pair": pair_file},
        host=HOST,
        http_port=0,
        grpc_port=0,
        metrics_port=0,
        max_queue_delay_us=QUEUE_DELAY_US,
        block=False,
    ) as running:
        yield running
    assert not running.workspace.exists()


# ------------------------------------------------------------------ clients


def _address(url: str) -> str:
    return url.split("://", 1)[1]


def infer(server, protocol: str, model: str, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
    """One request over ``protocol`` ('http' or 'grpc'); the named outputs."""
    client_module = http_client if protocol == "http" else grpc_client
    if protocol == "http":
        client = client_module.InferenceServerClient(_address(server.urls["http"]), network_timeout=CLIENT_TIMEOUT_S)
    else:
        client = client_module.InferenceServerClient(_address(server.urls["grpc"]))
    try:
        inputs = []
        for name, array in feeds.items():
            tensor = client_module.InferInput(name, list(array.shape), _triton_type(array.dtype))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        kwargs = {"client_timeout": CLIENT_TIMEOUT_S} if protocol == "grpc" else {}
        result = client.infer(model, inputs, **kwargs)
        return [result.as_numpy(name) for name in outputs]
    finally:
        client.close()


def _triton_type(dtype: np.dtype) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(dtype)


def tagger_feeds(batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((batch, 4)).astype(np.float32),
        # A batch-only input is [1] per request in the config (reshaped to [] for the model).
        "ids": rng.integers(0, 10, size=(batch, 1)).astype(np.int64),
    }


def expected_tagger(tagger, feeds) -> list[np.ndarray]:
    out = tagger(feeds["x"], feeds["ids"][:, 0])
    return [out["score"], out["positive"]]


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
        return True


def processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found.append(f"{entry.name}: {cmdline[:200]}")
    return found


def segments(prefix: str) -> list[str]:
    return [p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(prefix)]


# ------------------------------------------------------------------ core live tests


@live
def test_ready_and_config_derived_like_export_triton(server, tagger):
    assert server.ready()
    assert server.models == ["pair", "tagger"]
    assert all(url.split("://")[1].startswith(f"{HOST}:") for url in server.urls.values())
    status, body = http_get(f"{server.urls['http']}/v2/models/tagger/config")
    assert status == 200
    served = json.loads(body)
    derived = build_config(tagger, "tagger", max_queue_delay_us=QUEUE_DELAY_US, flavour="python")
    assert served["backend"] == "python"
    assert served["max_batch_size"] == derived.max_batch_size == 16
    assert [(t["name"], t["data_type"], [int(d) for d in t["dims"]]) for t in served["input"]] == [
        ("x", "TYPE_FP32", [4]),
        ("ids", "TYPE_INT64", [1]),
    ]
    assert [t["name"] for t in served["output"]] == tagger.output_names == ["score", "positive"]
    batching = served["dynamic_batching"]
    assert [int(b) for b in batching["preferred_batch_size"]] == list(derived.dynamic_batching.preferred_batch_size) == [4]
    assert int(batching["max_queue_delay_microseconds"]) == QUEUE_DELAY_US


@live
@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("batch", [1, 5])
def test_outputs_equal_a_direct_call(server, tagger, pair, protocol, batch):
    feeds = tagger_feeds(batch, seed=batch)
    score, positive = infer(server, protocol, "tagger", feeds, ["score", "positive"])
    expected = expected_tagger(tagger, feeds)
    np.testing.assert_allclose(score, expected[0], rtol=1e-5, atol=1e-6)
    assert positive.dtype == np.bool_
    np.testing.assert_array_equal(positive, expected[1])

    rng = np.random.default_rng(batch)
    a, b = (rng.standard_normal((batch, 3)).astype(np.float16) for _ in range(2))
    total, product = infer(server, protocol, "pair", {"a": a, "b": b}, pair.output_names)
    direct = pair(a, b)  # a tuple
    assert total.dtype == product.dtype == np.float16  # as the config says
    np.testing.assert_array_equal(total, direct[0].astype(np.float16))
    np.testing.assert_array_equal(product, direct[1].astype(np.float16))


@live
def test_concurrent_clients_get_their_own_answers_in_formed_batches(server, tagger):
    token = {ACCESS_HEADER: server.access_token}
    stats_url = f"{server.urls['http']}/v2/models/tagger/stats"
    assert http_get(stats_url)[0] == 403  # statistics need the access token
    before = json.loads(http_get(stats_url, token)[1])["model_stats"][0]

    clients, rounds = 16, 3
    barrier = threading.Barrier(clients, timeout=CLIENT_TIMEOUT_S)
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def client(index: int) -> None:
        try:
            for r in range(rounds):
                feeds = tagger_feeds(1, seed=1000 * index + r)
                barrier.wait()  # all 16 requests arrive together
                results[(index, r)] = (feeds, infer(server, "http", "tagger", feeds, ["score", "positive"]))
        except BaseException as exc:  # reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=CLIENT_TIMEOUT_S * rounds)
    assert not errors, errors
    assert len(results) == clients * rounds
    for feeds, (score, positive) in results.values():
        expected = expected_tagger(tagger, feeds)
        np.testing.assert_allclose(score, expected[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(positive, expected[1])

    after = json.loads(http_get(stats_url, token)[1])["model_stats"][0]
    requests = int(after["inference_count"]) - int(before["inference_count"])
    executions = int(after["execution_count"]) - int(before["execution_count"])
    assert requests == clients * rounds
    assert executions < requests  # Triton put several requests into one model execution
    assert any(int(b["batch_size"]) > 1 for b in after["batch_stats"])


@live
@pytest.mark.parametrize(
    "feeds, match",
    [
        ({"x": np.zeros((2, 5), np.float32), "ids": np.zeros((2, 1), np.int64)}, "unexpected shape for input 'x'"),
        ({"x": np.zeros((2, 4), np.float64), "ids": np.zeros((2, 1), np.int64)}, "FP64.*FP32|FP32.*FP64"),
        ({"x": np.zeros((2, 4), np.float32), "idz": np.zeros((2, 1), np.int64)}, "unexpected inference input 'idz'"),
        ({"x": np.zeros((2, 4), np.float32)}, "expected 2 inputs but got 1"),
        ({"x": np.zeros((17, 4), np.float32), "ids": np.zeros((17, 1), np.int64)}, "batch-size must be <= 16"),
    ],
    ids=["shape", "dtype", "name", "missing", "batch"],
)
def test_bad_requests_are_rejected_and_the_server_stays_healthy(server, tagger, feeds, match):
    with pytest.raises(InferenceServerException, match=match):
        infer(server, "http", "tagger", feeds, ["score"])
    assert server.ready()
    good = tagger_feeds(2, seed=7)
    np.testing.assert_allclose(
        infer(server, "grpc", "tagger", good, ["score"])[0], expected_tagger(tagger, good)[0], rtol=1e-5, atol=1e-6
    )


@live
def test_an_error_inside_the_model_reaches_the_client_without_paths_or_traceback(server, tagger):
    feeds = {"x": np.zeros((2, 4), np.float32), "ids": np.array([[1], [300]], np.int64)}  # 300: no such row
    with pytest.raises(InferenceServerException) as caught:
        infer(server, "http", "tagger", feeds, ["score"])
    message = str(caught.value)
    assert "tagger" in message and "outside the embedding table" in message  # what failed, in trtopt's words
    for leak in ("Traceback", ".py", str(server.workspace), sys.prefix, "site-packages"):
        assert leak not in message
    assert server.ready()
    good = tagger_feeds(1, seed=8)
    np.testing.assert_allclose(
        infer(server, "http", "tagger", good, ["score"])[0], expected_tagger(tagger, good)[0], rtol=1e-5, atol=1e-6
    )


@live
def test_metrics_endpoint_lists_the_models(server):
    infer(server, "http", "tagger", tagger_feeds(1, seed=9), ["score"])
    status, body = http_get(server.urls["metrics"])
    assert status == 200
    text = body.decode()
    assert 'nv_inference_request_success{model="tagger",version="1"}' in text
    assert 'model="pair"' in text


@live
@pytest.mark.slow  # a server of its own: about 8 CPU-seconds
def test_exported_python_repository_runs_on_the_bundled_server(tagger, tmp_path):
    model_dir = export_triton(tagger, tmp_path / "repo", "tagger_py", flavour="python", max_batch_size=8)
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == ["model.py", "model.trtopt"]
    with trtopt.serve(tmp_path / "repo", host=HOST, http_port=0, grpc_port=0, metrics_port=0, block=False) as running:
        assert running.models == ["tagger_py"]
        feeds = tagger_feeds(3, seed=10)
        score, positive = infer(running, "grpc", "tagger_py", feeds, ["score", "positive"])
        expected = expected_tagger(tagger, feeds)
        np.testing.assert_allclose(score, expected[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(positive, expected[1])
        prefix, workspace = running.shm_prefix, running.workspace
    assert running.exit_code == 0
    assert not processes_mentioning(str(workspace)) and not segments(prefix) and not workspace.exists()
    assert (model_dir / "1" / "model.trtopt").is_file()  # the user's repository is left as it was


@live
@pytest.mark.slow
def test_a_model_that_fails_to_load_is_a_serve_error_quoting_the_log(tagger, tmp_path):
    model_dir = export_triton(tagger, tmp_path / "repo", "broken", flavour="python")
    module_file = model_dir / "1" / "model.trtopt"
    module_file.write_bytes(module_file.read_bytes()[:-100])  # truncated
    root = SERVE_MODULE._runtime_root()

    def own_workspaces() -> set[Path]:  # other processes (pytest-xdist workers, other runs) may be serving too
        return set(root.glob(f"{os.getpid()}-*"))

    workspaces, own_segments = own_workspaces(), set(segments(f"trtopt_{os.getpid()}_"))  # other servers'
    with pytest.raises(trtopt.ServeError, match="exited while starting.*broken.*(truncated|corrupt)"):
        trtopt.serve(tmp_path / "repo", host=HOST, http_port=0, grpc_port=0, metrics_port=0, block=False)
    assert own_workspaces() == workspaces  # its workspace is gone
    assert not processes_mentioning(str(tmp_path / "repo"))
    assert set(segments(f"trtopt_{os.getpid()}_")) <= own_segments


# ------------------------------------------------------------------ no server needed


@live
def test_a_port_in_use_is_a_config_error_not_a_hang(tagger):
    with socket.socket() as holder:
        holder.bind((HOST, 0))
        holder.listen()
        port = holder.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(ConfigError, match=f"http port {port} on {HOST} is not available"):
            trtopt.serve(tagger, host=HOST, http_port=port, grpc_port=0, metrics_port=0, block=False)
        assert time.monotonic() - started < 30  # it fails before starting anything


def test_bad_model_arguments(tagger, tmp_path):
    if REASON is not None:
        pytest.skip(REASON)
    with pytest.raises(ConfigError, match="not a file"):
        trtopt.serve({"m": tmp_path / "missing.trtopt"}, http_port=0, grpc_port=0, metrics_port=0, block=False)
    with pytest.raises(ConfigError, match="serve\\(\\) takes"):
        trtopt.serve(42, block=False)
    with pytest.raises(ConfigError, match="holds no model"):
        trtopt.serve(tmp_path, http_port=0, grpc_port=0, metrics_port=0, block=False)


SERVE_MODULE = sys.modules["trtopt.serve"]  # `trtopt.serve` itself is the function


@pytest.mark.parametrize(
    "owner, name, value, match",
    [
        (sysconfig, "get_config_var",
         lambda name, real=sysconfig.get_config_var: 0 if name == "Py_ENABLE_SHARED" else real(name),
         "static interpreter.*--enable-shared"),
        (SERVE_MODULE.platform, "libc_ver", lambda: ("glibc", "2.31"), r"glibc >= 2.35.*2.31"),
        (SERVE_MODULE.platform, "machine", lambda: "ppc64le", "Linux x86-64 and aarch64 only"),
        (SERVE_MODULE, "STUB_PYTHONS", ("3.9",), "Python 3.9, not"),
    ],
    ids=["static", "glibc", "machine", "python"],
)
def test_dependency_error_says_why_serving_cannot_run(monkeypatch, owner, name, value, match):
    monkeypatch.setattr(owner, name, value)
    assert serving_unavailable_reason() is not None
    with pytest.raises(DependencyError, match=match):
        require_serving()
    with pytest.raises(DependencyError, match=match):
        trtopt.serve({}, block=False)


@live
def test_the_server_gets_this_interpreters_libpython_first():
    env = server_environment(require_serving())
    first = Path(env["LD_LIBRARY_PATH"].split(os.pathsep)[0])
    assert first == Path(sysconfig.get_config_var("LIBDIR"))
    assert (first / sysconfig.get_config_var("LDLIBRARY")).exists()
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)


def test_clean_stale_removes_a_dead_callers_processes_segments_and_workspace(tmp_path):
    workspace = tmp_path / "root" / "12345-stale"
    workspace.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    prefix = f"trtopt_test_{os.getpid()}_"
    (workspace / "state.json").write_text(
        json.dumps({"caller_pid": int(dead.stdout), "caller_start": 1, "shm_prefix": prefix})
    )
    segment = Path("/dev/shm") / f"{prefix}region"
    segment.write_bytes(b"\0" * 16)
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", str(workspace)])
    live_workspace = tmp_path / "root" / "live"
    live_workspace.mkdir()
    (live_workspace / "state.json").write_text(
        json.dumps({"caller_pid": os.getpid(), "caller_start": _start_time_of_self(), "shm_prefix": "x"})
    )
    try:
        deadline = time.monotonic() + 30
        while not processes_mentioning(str(workspace)):  # a just-started process shows no cmdline yet
            assert time.monotonic() < deadline and orphan.poll() is None
            time.sleep(0.05)
        assert clean_stale(tmp_path / "root") == [workspace]
        assert orphan.wait(timeout=10) == -signal.SIGKILL
        assert not segment.exists() and not workspace.exists()
        assert live_workspace.exists()  # a live caller's server is left alone
    finally:
        orphan.kill()
        segment.unlink(missing_ok=True)


def _start_time_of_self() -> int:
    return int(Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19])


class FakeBackendUtils:
    """Test double of ``triton_python_backend_utils`` (Triton's Python-backend module, present only
    inside a running stub): the response, error and logger types TritonPythonModel uses."""

    logged: list[str] = []

    class TritonError:
        def __init__(self, message: str) -> None:
            self.message = message

    class InferenceResponse:
        def __init__(self, output_tensors=None, error=None) -> None:
            self.output_tensors, self.error = output_tensors, error

    class Logger:
        @staticmethod
        def log_error(message: str) -> None:
            FakeBackendUtils.logged.append(message)


def test_an_unexpected_exception_is_reported_by_type_only(tagger):
    from trtopt.triton_python import TritonPythonModel

    model = TritonPythonModel()
    model._pb, model.name = FakeBackendUtils, "tagger"
    try:
        raise RuntimeError(f"failed reading {sys.prefix}/secret/path.bin")
    except RuntimeError as exc:
        message = model._client_message(exc)
    assert message == "tagger: the model failed on this request (RuntimeError); the server log has the details"
    assert "secret/path.bin" in FakeBackendUtils.logged[-1]  # the details go to the server log
    assert model._client_message(InputError("input 'x' has dtype int32\nbut the model expects float32")) == (
        "tagger: input 'x' has dtype int32 but the model expects float32"
    )


# ------------------------------------------------------------------ the CLI, stopped and killed


def test_cli_serve_options_and_bad_model_pairs(tagger_file, capsys):
    from trtopt.cli import main

    assert main(["serve", "--help"]) == 0
    help_text = capsys.readouterr().out
    for flag in ("--name", "--host", "--http-port", "--grpc-port", "--metrics-port", "--max-batch-size",
                 "--queue-delay-us", "--no-dynamic-batching", "--instances", "--ready-file", "default 127.0.0.1"):
        assert flag in help_text
    assert main(["serve", str(tagger_file), "oops"]) == 1
    assert "give extra models as NAME=PATH" in capsys.readouterr().err
    assert main(["serve", str(tagger_file), f"tagger={tagger_file}", "--name", "tagger"]) == 1
    assert "given twice" in capsys.readouterr().err


def start_cli(module_file: Path, tmp_path: Path) -> tuple[subprocess.Popen, dict]:
    """``trtopt serve`` in a subprocess on free ports; returns it and its ready file once ready."""
    ready_file = tmp_path / "ready.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "trtopt", "serve", str(module_file), "--name", "tagger", "--host", HOST,
         "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", "--ready-file", str(ready_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not ready_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"trtopt serve did not become ready: {process.communicate()}")
        time.sleep(0.2)
    ready = json.loads(ready_file.read_text())
    line = process.stdout.readline().strip()
    assert line == f"serving tagger at {ready['urls']['http']} {ready['urls']['grpc']}"
    return process, ready


def server_processes(process_pid: int) -> dict[str, int]:
    """The supervisor and tritonserver of the ``trtopt serve`` process with this pid."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = b" ".join(cmdline).decode(errors="replace")
        if f"trtopt-serve-{os.getuid()}/{process_pid}-" not in text:
            continue
        if "supervise_main" in text:
            found["supervisor"] = int(entry.name)
        elif cmdline[0].endswith(b"tritonserver"):
            found["tritonserver"] = int(entry.name)
    return found


def assert_nothing_left(ready: dict, caller_pid: int, within_s: float = 20.0) -> None:
    deadline = time.monotonic() + within_s
    marker = f"trtopt-serve-{os.getuid()}/{caller_pid}-"
    ports = [ready["http_port"], ready["grpc_port"], ready["metrics_port"]]
    while True:
        left = {
            "processes": processes_mentioning(marker),
            "ports": [p for p in ports if not port_is_free(p)],
            "segments": segments(f"trtopt_{caller_pid}_"),
        }
        if not any(left.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"left behind after {within_s} s: {left}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def tagger_file(tagger, tmp_path_factory) -> Path:
    return tagger.save(tmp_path_factory.mktemp("cli") / "tagger.trtopt")


@live
@pytest.mark.slow
def test_sigterm_under_load_exits_zero_and_leaves_nothing(tagger_file, tmp_path):
    process, ready = start_cli(tagger_file, tmp_path)
    answered, stop = [], threading.Event()

    class Handle:  # what infer() needs of a server
        urls = ready["urls"]

    def load() -> None:
        deadline = time.monotonic() + 60
        for _ in range(500):  # bounded in count and time; stops once the server goes
            if stop.is_set() or time.monotonic() > deadline:
                return
            try:
                infer(Handle, "http", "tagger", tagger_feeds(2, seed=len(answered)), ["score"])
                answered.append(1)
            except Exception:
                if process.poll() is not None or stop.is_set():
                    return

    threads = [threading.Thread(target=load) for _ in range(8)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while len(answered) < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(answered) >= 20
    process.send_signal(signal.SIGTERM)
    try:
        assert process.wait(timeout=90) == 0, process.stderr.read()
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=CLIENT_TIMEOUT_S)
    assert_nothing_left(ready, process.pid)


@live
@pytest.mark.slow
def test_kill_9_of_trtopt_serve_leaves_nothing(tagger_file, tmp_path):
    process, ready = start_cli(tagger_file, tmp_path)
    assert set(server_processes(process.pid)) == {"supervisor", "tritonserver"}
    process.kill()  # what an orchestrator does
    process.wait(timeout=10)
    assert_nothing_left(ready, process.pid)


@live
@pytest.mark.slow
def test_kill_9_of_the_worker_leaves_nothing_and_trtopt_serve_fails(tagger_file, tmp_path):
    process, ready = start_cli(tagger_file, tmp_path)
    os.kill(server_processes(process.pid)["tritonserver"], signal.SIGKILL)
    assert process.wait(timeout=60) == 1
    assert "stopped unexpectedly" in process.stderr.read()
    assert_nothing_left(ready, process.pid)
