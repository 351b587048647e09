"""Extract the names of TensorRT's Python API from the published bindings wheels.

TensorRT's libraries come only from NVIDIA's index, but its Python bindings
wheels (``tensorrt_cu12_bindings`` for 10.x, ``tensorrt_cu13_bindings`` for
11.x) are on PyPI. They hold no ``.pyi`` stubs, only the compiled pybind11
module, whose names are registered at import time. So this script imports the
*real* module: it compiles three empty stand-ins for ``libnvinfer``,
``libnvonnxparser`` and ``libnvinfer_plugin`` (the nine C entry points the
module links against, each returning 0; module import calls none of them),
imports the bindings in a subprocess with those on ``LD_LIBRARY_PATH``, and
walks ``dir()`` of the module, of every class and of nested classes (such as
``ILogger.Severity``). The names are exactly what ``hasattr`` would see on a
machine with TensorRT installed; nothing is guessed from strings.

For each major version it takes the oldest and the newest release on PyPI and
keeps the names present in both, so a name that passes the check exists in
every release of that major version (TensorRT does not remove names within a
major version). Needs: Linux x86-64, a C compiler (``cc``), network access to
PyPI, and a Python for which the wheels exist (3.8-3.13).

    python tools/extract_trt_api.py            # writes tests/data/tensorrt_api_{10,11}.txt
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# major version -> (distribution, pinned oldest release, newest-in-major specifier)
SOURCES = {
    "10": ("tensorrt_cu12_bindings", "==10.0.1", "<11"),
    "11": ("tensorrt_cu13_bindings", "==11.0.0.114", "<12"),
}

# Every undefined symbol the bindings take from TensorRT's libraries (`nm -D --undefined-only`).
_STUB_C = """
void* createInferBuilder_INTERNAL(void) { return 0; }
void* createInferRefitter_INTERNAL(void) { return 0; }
void* createInferRuntime_INTERNAL(void) { return 0; }
void* createNvOnnxParserRefitter_INTERNAL(void) { return 0; }
void* createNvOnnxParser_INTERNAL(void) { return 0; }
void* getBuilderPluginRegistry(void) { return 0; }
int getNvOnnxParserVersion(void) { return 0; }
void* getPluginRegistry(void) { return 0; }
int initLibNvInferPlugins(void) { return 0; }
"""

# Run inside the subprocess: walk the imported module and print the names as JSON.
_WALK = r"""
import inspect, json, sys
import tensorrt_bindings as trt

names = set()

def walk(prefix, obj, depth):
    for attr in dir(obj):
        if attr.startswith("_") and attr != "__version__":
            continue
        qualified = f"{prefix}.{attr}" if prefix else attr
        names.add(qualified)
        value = getattr(obj, attr, None)
        if inspect.isclass(value) and depth < 2 and value is not obj:
            walk(qualified, value, depth + 1)

walk("", trt, 0)
print(json.dumps({"version": trt.__version__, "names": sorted(names)}))
"""


def _platform_args() -> list[str]:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    args = ["--only-binary=:all:", "--python-version", version]
    for tag in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"):
        args += ["--platform", tag]
    return args


def download(requirement: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), requirement]
        + _platform_args(),
        check=True,
    )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"expected one wheel for {requirement} in {dest}, found {wheels}")
    return wheels[0]


def build_stubs(workdir: Path, major: str) -> Path:
    libdir = workdir / f"stubs{major}"
    libdir.mkdir(parents=True, exist_ok=True)
    source = workdir / "stub.c"
    source.write_text(_STUB_C)
    for lib in ("nvinfer", "nvonnxparser", "nvinfer_plugin"):
        subprocess.run(
            ["cc", "-shared", "-fPIC", "-o", str(libdir / f"lib{lib}.so.{major}"), str(source)],
            check=True,
        )
    return libdir


def api_names(wheel: Path, libdir: Path) -> tuple[str, list[str]]:
    unpacked = wheel.parent / "unpacked"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(unpacked)
    result = subprocess.run(
        [sys.executable, "-c", _WALK],
        env={"PYTHONPATH": str(unpacked), "LD_LIBRARY_PATH": str(libdir), "PATH": "/usr/bin:/bin"},
        check=True,
        capture_output=True,
        text=True,
    )
    data = json.loads(result.stdout)
    return data["version"], data["names"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=REPO / "tests" / "data")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="trt-api-") as tmp:
        workdir = Path(tmp)
        for major, (dist, oldest, newest) in SOURCES.items():
            libdir = build_stubs(workdir, major)
            versions, sets = [], []
            for label, spec in (("oldest", oldest), ("newest", newest)):
                wheel = download(dist + spec, workdir / f"{major}-{label}")
                version, names = api_names(wheel, libdir)
                versions.append(version)
                sets.append(set(names))
            common = sorted(sets[0] & sets[1])
            out = args.out_dir / f"tensorrt_api_{major}.txt"
            header = (
                f"# TensorRT {major}.x Python API: names present in both {dist} {versions[0]} and "
                f"{versions[1]}\n# generated by tools/extract_trt_api.py (imports the real bindings "
                "module); do not edit\n"
            )
            out.write_text(header + "".join(f"{name}\n" for name in common))
            print(f"{out}: {len(common)} names ({dist} {versions[0]} & {versions[1]})")


if __name__ == "__main__":
    main()
