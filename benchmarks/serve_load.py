"""Load on ``trtopt serve``: throughput and latency against concurrency, with and without batching.

Two servers (the tritonserver bundled in nvidia-pytriton, on 127.0.0.1), one
with Triton's dynamic batcher and one without, each serving ResNet-18 (random
weights, 3x224x224) and a transformer encoder (4 layers, d_model 256, 64
tokens), FP32 on the CPU backend, batch range 1..16. For each model and
concurrency 1, 4, 16 and 64, that many client threads (one HTTP client each)
send batch-1 requests back to back for a bounded time and count; the table
gives throughput, p50/p99 latency, the mean batch Triton formed (from its
statistics) and the server's CPU time per request (tritonserver and its
Python-backend stubs, from /proc). The server hop's cost is the served
batch-1 latency minus the same module's in-process latency, measured in
alternation (no batching, one client).

    PYTHONPATH=. python benchmarks/serve_load.py            # JSON, markdown and a plot in benchmarks/results/
    PYTHONPATH=. python benchmarks/serve_load.py --seconds 3 --concurrency 1,4   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch

import trtopt
from trtopt.bench.results import write_results

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
STEM = "serve_load"
CONCURRENCY = (1, 4, 16, 64)
QUEUE_DELAY_US = 2000
MAX_REQUESTS = 3000  # per cell, whatever the time budget


def build_models() -> dict[str, tuple[trtopt.CompiledModule, np.ndarray]]:
    import torchvision

    torch.manual_seed(0)
    resnet = torchvision.models.resnet18().eval()
    image = torch.randn(1, 3, 224, 224)
    encoder = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(d_model=256, nhead=4, dim_feedforward=1024, batch_first=True), num_layers=4
    ).eval()
    tokens = torch.randn(1, 64, 256)
    batch = {0: (1, 8, 16)}
    return {
        "resnet18": (
            trtopt.compile(resnet, (image,), dynamic_shapes={"x": batch}, backend="onnxruntime"),
            image.numpy(),
        ),
        "encoder": (
            trtopt.compile(encoder, (tokens,), dynamic_shapes={"src": batch}, backend="onnxruntime"),
            tokens.numpy(),
        ),
    }


def hop(server: Any, name: str, module: trtopt.CompiledModule, x: np.ndarray, seconds: float) -> dict[str, float]:
    """The server hop: served batch-1 latency against the same module called in this process.

    The two alternate call by call, so both see the same machine load; medians.
    """
    import tritonclient.http as http
    from tritonclient.utils import np_to_triton_dtype

    connection = http.InferenceServerClient(server.urls["http"].split("://", 1)[1], network_timeout=120.0)
    tensor = http.InferInput(module.input_names[0], list(x.shape), np_to_triton_dtype(x.dtype))
    tensor.set_data_from_numpy(x)
    local, served = [], []
    module(x), connection.infer(name, [tensor])  # warm
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(local) < MAX_REQUESTS:
        start = time.perf_counter()
        module(x)
        middle = time.perf_counter()
        connection.infer(name, [tensor])
        local.append(middle - start)
        served.append(time.perf_counter() - middle)
    connection.close()
    in_process, over_server = statistics.median(local) * 1e3, statistics.median(served) * 1e3
    return {"in_process_ms": in_process, "served_ms": over_server, "hop_ms": over_server - in_process, "calls": len(local)}


def server_cpu_s(server: Any) -> float:
    """User + system CPU seconds of the server's processes (tritonserver and the stubs)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if str(server.workspace).encode() not in (entry / "cmdline").read_bytes():
                continue
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if "supervise_main" in (entry / "cmdline").read_bytes().decode(errors="replace"):
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def model_stats(server: Any, name: str) -> tuple[int, int]:
    request = urllib.request.Request(
        f"{server.urls['http']}/v2/models/{name}/stats", headers={"triton-access-token": server.access_token}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        stats = json.loads(response.read())["model_stats"][0]
    return int(stats["inference_count"]), int(stats["execution_count"])


def load(server: Any, name: str, input_name: str, x: np.ndarray, concurrency: int, seconds: float) -> dict[str, Any]:
    """``concurrency`` threads sending batch-1 requests back to back, bounded in time and count."""
    import tritonclient.http as http
    from tritonclient.utils import np_to_triton_dtype

    address = server.urls["http"].split("://", 1)[1]
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start_line = threading.Barrier(concurrency + 1)
    stop_at = [0.0]

    def client() -> None:
        connection = http.InferenceServerClient(address, network_timeout=120.0)
        tensor = http.InferInput(input_name, list(x.shape), np_to_triton_dtype(x.dtype))
        tensor.set_data_from_numpy(x)
        connection.infer(name, [tensor])  # warm: connection and first request untimed
        start_line.wait()
        while time.monotonic() < stop_at[0]:
            with lock:
                if len(latencies) >= MAX_REQUESTS:
                    break
            begin = time.perf_counter()
            try:
                connection.infer(name, [tensor])
            except Exception as exc:  # counted, reported
                errors.append(str(exc)[:200])
                break
            with lock:
                latencies.append(time.perf_counter() - begin)
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    stats_before, cpu_before = model_stats(server, name), server_cpu_s(server)
    stop_at[0] = time.monotonic() + seconds
    begin = time.perf_counter()
    start_line.wait()
    for thread in threads:
        thread.join(timeout=seconds + 300)
    elapsed = time.perf_counter() - begin
    stats_after, cpu_after = model_stats(server, name), server_cpu_s(server)
    requests = stats_after[0] - stats_before[0]
    executions = max(1, stats_after[1] - stats_before[1])
    ms = np.array(latencies) * 1e3
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors[:3],
        "throughput_rps": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
        "mean_batch": requests / executions,
        "server_cpu_ms_per_request": (cpu_after - cpu_before) * 1e3 / max(1, requests),
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"# trtopt serve under load ({result['machine']})",
        "",
        f"Command: `{result['command']}`. {result['note']}",
        "",
        "| model | batching | clients | req/s | p50 ms | p99 ms | mean batch | server CPU ms/req |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['model']} | {row['batching']} | {row['concurrency']} | {row['throughput_rps']:.1f} | "
            f"{row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {row['mean_batch']:.2f} | "
            f"{row['server_cpu_ms_per_request']:.1f} |"
        )
    lines += [
        "",
        "The server hop, batch 1, one client, no batching (calls alternating with in-process calls, medians):",
        "",
        "| model | in process ms | served ms | hop ms | calls |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, cost in result["hop"].items():
        lines.append(
            f"| {name} | {cost['in_process_ms']:.2f} | {cost['served_ms']:.2f} | {cost['hop_ms']:.2f} | {cost['calls']} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for model in result["models"]:
        for batching, style in (("dynamic", "-o"), ("off", "--s")):
            rows = [r for r in result["rows"] if r["model"] == model and r["batching"] == batching]
            clients = [r["concurrency"] for r in rows]
            axes[0].plot(clients, [r["throughput_rps"] for r in rows], style, label=f"{model}, batching {batching}")
            axes[1].plot(clients, [r["p99_ms"] for r in rows], style, label=f"{model}, batching {batching}")
    for axis, label in zip(axes, ("requests / s", "p99 latency, ms")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent clients (batch 1 each)")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle("trtopt serve (Triton, CPU backend) under load; shared machine", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="time budget per cell (default 8)")
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    load_before = os.getloadavg()
    models = build_models()
    hops, rows = {}, []
    for batching in ("dynamic", "off"):
        with trtopt.serve(
            {name: module for name, (module, _) in models.items()},
            http_port=0,
            grpc_port=0,
            metrics_port=0,
            dynamic_batching=batching == "dynamic",
            max_queue_delay_us=QUEUE_DELAY_US,
            block=False,
        ) as server:
            for name, (module, x) in models.items():
                if batching == "off":
                    hops[name] = hop(server, name, module, x, args.seconds)
                for concurrency in levels:
                    row = load(server, name, module.input_names[0], x, concurrency, args.seconds)
                    rows.append({"model": name, "batching": batching, **row})
                    print(json.dumps(rows[-1]), flush=True)
    result = {
        "command": "PYTHONPATH=. python benchmarks/serve_load.py"
        + (f" --seconds {args.seconds:g}" if args.seconds != 8.0 else ""),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "note": (
            f"Batch-1 requests over HTTP from client threads in the same machine, {args.seconds:g} s (at most "
            f"{MAX_REQUESTS} requests) per cell; dynamic batching with max_queue_delay_us={QUEUE_DELAY_US} and the "
            "profiles' opt batch 8 as preferred size; ONNX Runtime on the CPU. The machine was shared with other "
            f"jobs (load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after), and the clients "
            "compete with the server for the same cores: read the ratios between rows, not the absolute numbers."
        ),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "models": list(models),
        "rows": rows,
        "hop": hops,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_results(args.out, STEM, result, table(result))
    plot(result, args.out / f"{STEM}.png")


if __name__ == "__main__":
    main()
