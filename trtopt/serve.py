"""Serve compiled modules on NVIDIA Triton Inference Server: ``trtopt.serve`` and ``trtopt serve``.

The server is the real ``tritonserver`` (KServe v2 over HTTP and gRPC,
dynamic batching, Prometheus metrics) with its Python backend, both shipped
in the ``nvidia-pytriton`` wheel (``pip install "trtopt[serve]"``). Each
module is exported with ``export_triton(..., flavour="python")`` into a
private model repository, so the served config is exactly the exported one
and Triton's Python backend runs the module with trtopt
(``trtopt.triton_python``).

Processes (``kill -9`` of any one leaves nothing behind)::

    caller (trtopt serve, or a Python program)        -- Server handle
      '-- supervisor  (python, own session and process group)
            '-- tritonserver                          -- the worker
                  '-- triton_python_backend_stub, one per model instance

The supervisor holds the read end of a pipe whose write end only the caller
holds: when the caller dies, even by SIGKILL, the pipe reads EOF and the
supervisor kills the server. When tritonserver dies, the supervisor kills the
stubs. Either way it removes the shared-memory segments (named with this
server's prefix) and, if the caller is gone, the workspace. tritonserver dies
with the supervisor (PR_SET_PDEATHSIG), and the caller cleans up when the
supervisor dies. Whatever a machine crash or a ``kill -9`` of both leaves
behind is removed by the next start (``clean_stale``).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.util
import json
import logging
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from .errors import ConfigError, DependencyError, ServeError
from .files import atomic_write
from .compiler import load
from .module import CompiledModule
from .triton import export_triton

logger = logging.getLogger(__name__)

SERVE_INSTALL_HINT = 'install it with `pip install "trtopt[serve]"` (NVIDIA PyTriton, which bundles tritonserver)'
DEFAULT_HOST = "127.0.0.1"  # loopback: pass host="0.0.0.0" to accept connections from other machines
MIN_GLIBC = (2, 35)  # the nvidia-pytriton wheel is manylinux_2_35
STUB_PYTHONS = ("3.10", "3.11", "3.12")  # the Python backend stubs nvidia-pytriton 0.7 ships
MACHINES = ("x86_64", "aarch64")
# A graceful stop first unloads every model through the repository API (in-flight requests finish;
# unloading takes ~2 s), then signals tritonserver, which waits up to EXIT_TIMEOUT_S for clients'
# open HTTP connections to close. Signalled with models still loaded, the unload would have to fit
# in what is left of that timeout, and ends in "Exit timeout expired" with the stubs killed.
UNLOAD_TIMEOUT_S = 30.0
EXIT_TIMEOUT_S = 3
STOP_TIMEOUT_S = UNLOAD_TIMEOUT_S + EXIT_TIMEOUT_S + 15  # the caller's bound on a graceful stop
STARTUP_TIMEOUT_S = 180.0
# Endpoints that need the access token (as PyTriton protects them): statistics, the repository
# API, shared-memory registration, tracing and log settings. Health, metadata, config and inference
# stay open.
PROTECTED_APIS = "shared-memory,model-repository,statistics,trace,logging"
ACCESS_HEADER = "triton-access-token"
_RUNTIME_ROOT = "trtopt-serve"
_STATE_FILE = "state.json"
_LAUNCH_FILE = "launch.json"
_LOG_FILE = "tritonserver.log"
_PR_SET_PDEATHSIG = 1

ModelSource = Union[CompiledModule, str, os.PathLike]


# ------------------------------------------------------------------ environment


@dataclass(frozen=True)
class TritonDistribution:
    """Where the tritonserver of the installed nvidia-pytriton wheel and its Python backend are."""

    server: Path
    python_backend: Path  # directory with libtriton_python.so and triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub for this Python version
    libraries: Path  # the wheel's bundled shared libraries


def serving_unavailable_reason() -> str | None:
    """Why ``trtopt serve`` cannot run here, or None when it can."""
    machine = platform.machine()
    if sys.platform != "linux" or machine not in MACHINES:
        return (
            f"the bundled Triton server runs on Linux x86-64 and aarch64 only (this is {sys.platform} "
            f"{machine}); serve the model with a Triton container instead (see export_triton)"
        )
    libc, version = platform.libc_ver()
    parsed = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if libc != "glibc" or parsed < MIN_GLIBC:
        return (
            f"the bundled Triton server needs glibc >= {'.'.join(map(str, MIN_GLIBC))}, this system has "
            f"{libc or 'no glibc'} {version}; use a newer distribution (e.g. Ubuntu 22.04, Debian 12) or a "
            "Triton container"
        )
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if python not in STUB_PYTHONS:
        return (
            f"nvidia-pytriton 0.7 ships Triton's Python backend for Python {', '.join(STUB_PYTHONS)}, "
            f"not {python}; serve from a virtual environment of one of those"
        )
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return (
            f"this Python ({sys.executable}) is built without a shared libpython{python}.so (a static "
            "interpreter), which Triton's Python backend loads; use a Python built with --enable-shared "
            "(pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared pyenv install ...; distribution and conda "
            "Pythons are)"
        )
    if _libpython_dir() is None:
        return (
            f"libpython{python}.so of this Python is not in {sysconfig.get_config_var('LIBDIR')}; "
            "reinstall this Python with its shared library"
        )
    if importlib.util.find_spec("pytriton") is None:
        return f"nvidia-pytriton is not installed: {SERVE_INSTALL_HINT}"
    dist = _distribution()
    missing = [p for p in (dist.server, dist.python_backend / "libtriton_python.so", dist.stub) if not p.exists()]
    if missing:
        return f"the nvidia-pytriton install is incomplete ({missing[0]} is missing); reinstall it"
    return None


def require_serving() -> TritonDistribution:
    """The bundled Triton server, or a DependencyError saying why it cannot run here."""
    reason = serving_unavailable_reason()
    if reason is not None:
        raise DependencyError(f"trtopt serve cannot run: {reason}")
    return _distribution()


def _distribution() -> TritonDistribution:
    spec = importlib.util.find_spec("pytriton")
    assert spec is not None and spec.origin is not None  # checked by the caller
    root = Path(spec.origin).parent
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    return TritonDistribution(
        server=root / "tritonserver" / "bin" / "tritonserver",
        python_backend=root / "tritonserver" / "backends" / "python",
        stub=root / "tritonserver" / "python_backend_stubs" / python / "triton_python_backend_stub",
        libraries=root.parent / "nvidia_pytriton.libs",
    )


def _libpython_dir() -> Path | None:
    """The directory of the running interpreter's shared libpython.

    The backend stub loads ``libpython3.X.so.1.0`` by soname; under pyenv or any
    Python that is not the system's, the loader would pick the system's library
    of another patch release and model load fails ("'_thread.RLock' object has
    no attribute '_recursion_count'"). This directory goes first on the
    server's LD_LIBRARY_PATH.
    """
    libdir = sysconfig.get_config_var("LIBDIR")
    name = sysconfig.get_config_var("INSTSONAME") or sysconfig.get_config_var("LDLIBRARY")
    if libdir and name and (Path(libdir) / name).exists():
        return Path(libdir)
    return None


def server_environment(dist: TritonDistribution) -> dict[str, str]:
    """tritonserver's environment: this interpreter's libpython, venv and trtopt for the stubs."""
    env = dict(os.environ)
    libpython = _libpython_dir()
    paths = [str(libpython)] if libpython else []
    paths += [str(dist.libraries)] + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(paths)
    # The embedded interpreter finds its prefix (and so this virtual environment's packages) from the
    # first `python3` on PATH; the trtopt this process runs goes first on PYTHONPATH.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    source = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([source] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.pop("PYTHONHOME", None)
    return env


# ------------------------------------------------------------------ ports


def _check_port(host: str, port: int, what: str) -> int:
    """``port`` if free on ``host`` (0: pick a free one), else a ConfigError instead of a server that hangs."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"{what}_port={port!r} must be a port number 1..65535, or 0 to pick a free port")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # Like the server: a port in TIME_WAIT is free, one with a listener is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(
                f"{what} port {port} on {host} is not available ({exc.strerror}); stop what listens there "
                f"or pass another {what}_port (--{what}-port; 0 picks a free port)"
            ) from exc
        return probe.getsockname()[1]


# ------------------------------------------------------------------ processes and leftovers


def _runtime_root() -> Path:
    return Path(tempfile.gettempdir()) / f"{_RUNTIME_ROOT}-{os.getuid()}"


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (tells a live pid from a reused one), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains ``text`` (the server's workspace path), this one excepted."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            found.append(int(entry.name))
    return found


def _kill_processes_of(workspace: Path, timeout_s: float = 5.0) -> None:
    """SIGKILL every process of the server in ``workspace`` (tritonserver, stubs, supervisor)."""
    deadline = time.monotonic() + timeout_s
    while True:
        pids = _processes_mentioning(str(workspace))
        if not pids or time.monotonic() > deadline:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    if pids:
        logger.warning("serve: processes %s of %s did not go away", pids, workspace)


def _remove_segments(prefix: str) -> list[str]:
    """Unlink the POSIX shared-memory segments the server's Python backend named with ``prefix``."""
    removed: list[str] = []
    shm = Path("/dev/shm")
    if not prefix or not shm.is_dir():
        return removed
    for segment in shm.iterdir():
        if segment.name.startswith(prefix):
            with contextlib.suppress(FileNotFoundError):
                segment.unlink()
                removed.append(segment.name)
    return removed


def clean_stale(root: Path | None = None) -> list[Path]:
    """Remove what servers whose caller is gone left behind: processes, segments, workspaces.

    A workspace records its caller's pid and start time; a workspace whose
    caller is not that process any more is stale. Returns the workspaces removed.
    """
    root = root or _runtime_root()
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for workspace in sorted(root.iterdir()):
        try:
            state = json.loads((workspace / _STATE_FILE).read_text())
        except (OSError, ValueError):
            # Being written right now, or not ours: leave it unless it is old.
            if not workspace.is_dir() or time.time() - workspace.stat().st_mtime < 3600:
                continue
            state = {}
        caller = state.get("caller_pid")
        if caller is not None and _start_time(caller) == state.get("caller_start"):
            continue  # a live server
        _kill_processes_of(workspace)
        _remove_segments(state.get("shm_prefix", ""))
        shutil.rmtree(workspace, ignore_errors=True)
        logger.info("serve: removed the leftovers of a server whose caller is gone (%s)", workspace)
        removed.append(workspace)
    return removed


def _set_parent_death_signal(sig: int) -> None:
    """In a child before exec: receive ``sig`` when the parent (thread) that forked us exits."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, sig)


def supervise_main() -> int:
    """The supervisor process (``python -c`` from ``Server._start``; argv[1] is the workspace).

    Runs tritonserver as its child, in its own process group, and waits for one of:
    the caller asks it to stop (SIGTERM/SIGINT: stop gracefully), the caller is gone
    (EOF on the pipe: kill at once, nobody waits for answers), tritonserver exited.
    Then it kills what is left, removes the segments, and exits with tritonserver's code.
    """
    workspace = Path(sys.argv[1])
    launch = json.loads((workspace / _LAUNCH_FILE).read_text())
    stop_requested = threading.Event()
    caller_gone = threading.Event()
    wake = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop_requested.set()
        wake.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def watch_caller(fd: int) -> None:
        while os.read(fd, 1):  # the caller never writes: this returns b"" when it is gone
            pass
        caller_gone.set()
        wake.set()

    with open(workspace / _LOG_FILE, "ab") as log:
        server = subprocess.Popen(
            launch["argv"],
            env=launch["env"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: _set_parent_death_signal(signal.SIGKILL),  # noqa: PLW0108 - runs in the child
        )

        def watch_server() -> None:
            server.wait()
            wake.set()

        # Threads only after the fork: preexec_fn is not safe while other threads run.
        threading.Thread(target=watch_caller, args=(launch["caller_fd"],), daemon=True).start()
        threading.Thread(target=watch_server, daemon=True).start()
        while not wake.wait(timeout=1.0):
            pass
        if caller_gone.is_set() and server.poll() is None:
            server.kill()
        elif stop_requested.is_set() and server.poll() is None:
            _unload_models(launch)
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=EXIT_TIMEOUT_S + 10)
            except subprocess.TimeoutExpired:
                server.kill()
        code = server.wait()
    # The stubs (and anything else of this server) go with tritonserver.
    _kill_processes_of(workspace)
    _remove_segments(launch["shm_prefix"])
    if caller_gone.is_set():
        shutil.rmtree(workspace, ignore_errors=True)  # nobody else will
    if stop_requested.is_set() and code in (0, -signal.SIGINT):
        return 0
    return 128 - code if code < 0 else (code or 1)  # killed by a signal: the shell's 128 + N


def _repository_call(launch: Mapping[str, Any], path: str, timeout: float) -> Any:
    """POST to the (token-protected) repository API; the decoded JSON answer, if any."""
    request = urllib.request.Request(
        f"{launch['http']}/v2/repository{path}",
        data=b"{}",
        headers={ACCESS_HEADER: launch["access_token"], "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=max(0.5, timeout)) as response:  # noqa: S310 - our server
        body = response.read()
    return json.loads(body) if body else None


def _unload_models(launch: Mapping[str, Any]) -> None:
    """Unload every model and wait until the stubs are gone (in-flight requests are answered first).

    Triton's unload call returns before the unload is done; the repository index
    says when every model is UNAVAILABLE. Bounded by UNLOAD_TIMEOUT_S; errors go to
    the supervisor's log (the signal that follows stops the server regardless).
    """
    deadline = time.monotonic() + UNLOAD_TIMEOUT_S
    try:
        for name in launch["models"]:
            _repository_call(launch, f"/models/{name}/unload", deadline - time.monotonic())
        while time.monotonic() < deadline:
            index = _repository_call(launch, "/index", deadline - time.monotonic()) or []
            if all(entry.get("state") not in ("READY", "UNLOADING", "LOADING") for entry in index):
                return
            time.sleep(0.1)
        print("unloading the models timed out", file=sys.stderr)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"unloading the models failed: {exc}", file=sys.stderr)


# ------------------------------------------------------------------ the server


def _model_sources(models: ModelSource | Mapping[str, ModelSource]) -> dict[str, ModelSource]:
    """``{name: module or .trtopt path}``; a bare module is served as ``model``, a path under its stem."""
    if isinstance(models, Mapping):
        sources = dict(models)
        if not sources:
            raise ConfigError("serve() got no models; pass a CompiledModule, a .trtopt path or {name: module}")
    elif isinstance(models, CompiledModule):
        sources = {"model": models}
    elif isinstance(models, (str, os.PathLike)):
        sources = {Path(models).stem: models}
    else:
        raise ConfigError(
            f"serve() takes a CompiledModule, a .trtopt path, {{name: module_or_path}} or a model repository "
            f"directory, not {type(models).__name__}"
        )
    for name, source in sources.items():
        if not isinstance(source, (CompiledModule, str, os.PathLike)):
            raise ConfigError(f"model {name!r} is a {type(source).__name__}; pass a CompiledModule or a .trtopt path")
        if isinstance(source, (str, os.PathLike)) and not Path(source).is_file():
            raise ConfigError(f"model {name!r}: {source} is not a file; pass a .trtopt file written by save()")
    return sources


def _repository_models(repository: Path) -> list[str]:
    """The models of a model repository directory (an ``export_triton`` output)."""
    names = sorted(p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file())
    if not names:
        raise ConfigError(
            f"{repository} holds no model (no <name>/config.pbtxt); write one with "
            "export_triton(module, repo, name, flavour='python'), or pass .trtopt files"
        )
    return names


class Server:
    """A running Triton server (returned by ``serve(..., block=False)``; a context manager).

    ``urls`` maps ``http``, ``grpc`` and ``metrics`` to their endpoints; the
    statistics and repository endpoints need ``access_token`` in the
    ``triton-access-token`` header. ``stop()`` shuts down gracefully (in-flight
    requests finish); ``wait()`` blocks until the server exits.
    """

    def __init__(
        self,
        models: dict[str, ModelSource] | Path,
        *,
        host: str,
        ports: dict[str, int],
        export_options: dict[str, Any],
        startup_timeout_s: float,
    ) -> None:
        self.host = host
        self.ports = dict(ports)
        self.access_token = secrets.token_urlsafe(24)
        self.exit_code: int | None = None
        self._stopping = False
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._caller_fd: int | None = None
        self._cleaned = False
        root = _runtime_root()
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if root.stat().st_uid != os.getuid() or root.is_symlink():
            raise ConfigError(f"{root} belongs to another user; remove it, or set TMPDIR to a private directory")
        self.workspace = Path(tempfile.mkdtemp(dir=root, prefix=f"{os.getpid()}-"))
        self.shm_prefix = f"trtopt_{self.workspace.name.replace('-', '_')}_"
        try:
            self._write_state()
            if isinstance(models, Path):
                self.repository = models.resolve()
            else:
                self.repository = self.workspace / "models"
                self._export(models, export_options)
            self.models = _repository_models(self.repository)
            self._start(require_serving())
            self._wait_ready(startup_timeout_s)
        except BaseException:
            self._shutdown(graceful=False)
            raise

    # -------------------------------------------------------------- public

    @property
    def urls(self) -> dict[str, str]:
        host = self._client_host()
        return {
            "http": f"http://{host}:{self.ports['http']}",
            "grpc": f"grpc://{host}:{self.ports['grpc']}",
            "metrics": f"http://{host}:{self.ports['metrics']}/metrics",
        }

    @property
    def log_path(self) -> Path:
        """tritonserver's log (gone once the server has stopped)."""
        return self.workspace / _LOG_FILE

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def ready(self) -> bool:
        """True while the server answers ready (every model loaded)."""
        return self.alive() and self._http_status("/v2/health/ready") == 200

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until the server exits (None after ``timeout`` s); its exit code (0: stopped on request)."""
        assert self._process is not None
        try:
            self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        self._shutdown(graceful=False)
        return self.exit_code

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """Stop gracefully (in-flight requests finish), clean up; idempotent. The exit code."""
        self._stopping = True
        self._shutdown(graceful=True, timeout=timeout)
        return self.exit_code

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.alive() else f"stopped ({self.exit_code})"
        return f"Server({', '.join(self.models)} at {self.urls['http']}, {state})"

    # -------------------------------------------------------------- start

    def _client_host(self) -> str:
        return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)

    def _write_state(self) -> None:
        state = {
            "caller_pid": os.getpid(),
            "caller_start": _start_time(os.getpid()),
            "shm_prefix": self.shm_prefix,
            "ports": self.ports,
        }
        atomic_write(self.workspace / _STATE_FILE, json.dumps(state))

    def _export(self, models: dict[str, ModelSource], options: dict[str, Any]) -> None:
        """Each model into the workspace's repository, as ``export_triton(flavour="python")`` writes it."""
        for name, source in models.items():
            # A file is loaded on the CPU only to read its specs and copy it: the server loads it for real.
            module = source if not isinstance(source, (str, os.PathLike)) else load(source, backend="onnxruntime")
            export_triton(module, self.repository, name, flavour="python", **options)

    def _start(self, dist: TritonDistribution) -> None:
        backends = self.workspace / "backends" / "python"
        backends.mkdir(parents=True)
        for source in (dist.python_backend / "libtriton_python.so", dist.python_backend / "triton_python_backend_utils.py", dist.stub):
            (backends / source.name).symlink_to(source)
        restricted = f"{PROTECTED_APIS}:{ACCESS_HEADER}={self.access_token}"
        argv = [
            str(dist.server),
            f"--model-repository={self.repository}",
            # Explicit control, every model loaded at start: a graceful stop can unload them first.
            "--model-control-mode=explicit",
            "--load-model=*",
            f"--backend-directory={self.workspace / 'backends'}",
            f"--http-address={self.host}",
            f"--http-port={self.ports['http']}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.ports['grpc']}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.ports['metrics']}",
            "--allow-gpu-metrics=false",
            f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--http-restricted-api={restricted}",
            f"--grpc-restricted-protocol={restricted}",
        ]
        read_fd, self._caller_fd = os.pipe()  # both close-on-exec; read_fd is handed on explicitly
        env = server_environment(dist)
        launch = {
            "argv": argv,
            "env": env,
            "caller_fd": read_fd,
            "shm_prefix": self.shm_prefix,
            "http": self.urls["http"],
            "access_token": self.access_token,
            "models": self.models,
        }
        atomic_write(self.workspace / _LAUNCH_FILE, json.dumps(launch), mode=0o600)  # holds the access token
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-c", "import sys; from trtopt.serve import supervise_main; sys.exit(supervise_main())", str(self.workspace)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=open(self.workspace / "supervisor.log", "wb"),  # noqa: SIM115 - the child holds it
                pass_fds=(read_fd,),
                start_new_session=True,  # Ctrl-C in a terminal reaches the caller, which stops the server
            )
        finally:
            os.close(read_fd)
        logger.info("serve: tritonserver starting (workspace %s, log %s)", self.workspace, self.log_path)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if not self.alive():
                raise self._startup_error()
            if time.monotonic() > deadline:
                raise ServeError(
                    f"the Triton server did not become ready within {timeout_s:.0f} s; "
                    f"its last log lines: {self._log_tail()}"
                )
            time.sleep(0.1)
        logger.info("serve: ready: %s at %s", ", ".join(self.models), self.urls)

    def _startup_error(self) -> Exception:
        tail = self._log_tail()
        lowered = tail.lower()
        if "address already in use" in lowered or "failed to start" in lowered and "service" in lowered:
            return ConfigError(
                f"the Triton server could not bind its ports ({self.ports} on {self.host}): {tail}; "
                "choose other ports (0 picks free ones)"
            )
        return ServeError(f"the Triton server exited while starting; its last log lines: {tail}")

    def _log_tail(self, lines: int = 8) -> str:
        """The server's last error lines (or last lines), for an exception message."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        errors = [line for line in text if line.startswith("E") or "error" in line.lower()]
        return " | ".join((errors or text)[-lines:]) or "(empty log)"

    def _http_status(self, path: str, headers: Mapping[str, str] | None = None) -> int | None:
        request = urllib.request.Request(self.urls["http"] + path, headers=dict(headers or {}))
        try:
            with urllib.request.urlopen(request, timeout=2) as response:  # noqa: S310 - our own server
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except (urllib.error.URLError, OSError):
            return None

    # -------------------------------------------------------------- stop

    def _shutdown(self, graceful: bool, timeout: float = STOP_TIMEOUT_S) -> None:
        with self._lock:
            process = self._process
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
                try:
                    process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            if self._cleaned:
                return
            self._cleaned = True
            if process is not None:
                self.exit_code = process.returncode
                if process.returncode and not self._stopping:
                    logger.error("serve: the Triton server stopped unexpectedly (exit code %s): %s",
                                 process.returncode, self._log_tail())
            # The supervisor cleans up after itself; this covers a supervisor killed with -9.
            _kill_processes_of(self.workspace)
            _remove_segments(self.shm_prefix)
            if self._caller_fd is not None:
                os.close(self._caller_fd)
                self._caller_fd = None
            shutil.rmtree(self.workspace, ignore_errors=True)


def serve(
    models: ModelSource | Mapping[str, ModelSource],
    *,
    host: str = DEFAULT_HOST,
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    max_batch_size: int | None = None,
    max_queue_delay_us: int = 100,
    dynamic_batching: bool = True,
    instances: int = 1,
    block: bool = True,
    startup_timeout_s: float = STARTUP_TIMEOUT_S,
) -> Server:
    """Serve ``models`` on NVIDIA Triton Inference Server until stopped.

    ``models``: a CompiledModule (served as ``model``), a ``.trtopt`` path
    (served under its file name), ``{name: module_or_path}``, or a model
    repository directory written by ``export_triton(..., flavour="python")``
    (served as it is; the options below are then the repository's). Each model's
    Triton config is derived from its specs as ``export_triton`` derives it
    (batching from the optimization profiles, the profiles' opt batches as
    preferred batch sizes), with ``max_batch_size``, ``max_queue_delay_us``
    (how long the dynamic batcher may hold a request), ``dynamic_batching``
    and ``instances`` (model copies) as there. The server listens on ``host``
    (loopback by default; ``"0.0.0.0"`` for every interface); a port of 0
    picks a free one.

    Returns once every model is ready. ``block=True`` then serves until
    Ctrl-C (or the server exits) and returns the stopped server;
    ``block=False`` returns the running ``Server``. Raises ConfigError for a
    port in use or a model Triton cannot serve, DependencyError where the
    bundled Triton cannot run, ServeError when the server fails to start.
    """
    require_serving()
    sources: dict[str, ModelSource] | Path
    if isinstance(models, (str, os.PathLike)) and Path(models).is_dir():
        sources = Path(models)  # a model repository
    else:
        sources = _model_sources(models)
    ports = {}
    for what, port in (("http", http_port), ("grpc", grpc_port), ("metrics", metrics_port)):
        ports[what] = _check_port(host, port, what)
    if len(set(ports.values())) < 3:
        raise ConfigError(f"the http, grpc and metrics ports must differ (got {ports})")
    clean_stale()
    options = {
        "max_batch_size": max_batch_size,
        "max_queue_delay_us": max_queue_delay_us,
        "dynamic_batching": dynamic_batching,
        "instances": instances,
    }
    server = Server(sources, host=host, ports=ports, export_options=options, startup_timeout_s=startup_timeout_s)
    if not block:
        return server
    try:
        server.wait()
    except KeyboardInterrupt:
        logger.info("serve: interrupted, stopping")
    finally:
        server.stop()
    return server
