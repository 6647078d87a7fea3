"""Builds a CUDA kernel's source, with tests/cuda_emu.h, into a shared library that runs it on
the CPU (each thread a fiber): the kernels' own code checked where no GPU is."""

from __future__ import annotations

import ctypes
import hashlib
import subprocess
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
CTYPES = {np.float32: "float", np.float16: "_Float16"}  # g++'s half: 2 bytes, as __half


def build_library(source: str, root: Path) -> ctypes.CDLL:
    """Compiles `source` (which includes "cuda_emu.h") under `root`, named by its hash."""
    name = hashlib.sha256(source.encode()).hexdigest()[:16]
    (root / f"{name}.cpp").write_text(source)
    proc = subprocess.run(
        # CUDA reads half values through a uint4 (16-byte loads): type punning that nvcc
        # allows and g++'s strict aliasing does not
        # -fsanitize=alignment: a 16-byte load from an address that is not a multiple of 16
        # faults on a GPU ("misaligned address"); here UBSan stops the process instead
        ["g++", "-std=c++20", "-O2", "-fno-strict-aliasing", "-fsanitize=alignment",
         "-fno-sanitize-recover=alignment", "-shared", "-fPIC", "-Wall",
         "-Werror", "-Wno-unknown-pragmas", "-Wno-sign-compare", f"-I{HERE}", f"{name}.cpp",
         "-o", f"{name}.so"],
        cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return ctypes.CDLL(str(root / f"{name}.so"))
