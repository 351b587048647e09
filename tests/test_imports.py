"""Every trtopt module imports with tensorrt and pycuda absent."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import trtopt

BLOCKER = """
import importlib, pkgutil, sys

class Block:
    # A meta-path finder that makes tensorrt, pycuda and pytriton unimportable, as on a machine without them.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorrt", "pycuda", "tensorrt_bindings", "pytriton"):
            raise ImportError(f"{name} is blocked for this test")
        return None

sys.meta_path.insert(0, Block())
import trtopt
names = [m.name for m in pkgutil.walk_packages(trtopt.__path__, "trtopt.")]
for name in names:
    importlib.import_module(name)
assert not any(m.split(".")[0] in ("tensorrt", "pycuda") for m in sys.modules)
print(len(names))
"""


def test_every_submodule_imports_without_tensorrt_or_pycuda():
    result = subprocess.run([sys.executable, "-c", BLOCKER], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    expected = len(list(pkgutil.walk_packages(trtopt.__path__, "trtopt.")))
    assert int(result.stdout.strip().splitlines()[-1]) == expected >= 8

