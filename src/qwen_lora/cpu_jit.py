"""Compiler flags for the CPU kernels that `mx.compile` builds on Linux x86-64.

On CPUs, `mx.compile` writes each fused elementwise kernel as C++ and builds it with the
`g++` found on PATH. MLX adds `-mavx2 -mfma -mf16c` to that command only when MLX itself was
built for AVX2 (mlx/backend/cpu/jit_compiler.cpp); the x86-64 wheels on PyPI are not, so
their kernels evaluate every `fma` of MLX's exp and sigmoid polynomials through a libm call.
Where the processor has these instructions, we put a `g++` first on PATH that adds the same
flags: a LoRA training step of Qwen2.5-0.5B (sequence 512) took 8.5 s instead of 9.8 s on a
2-core EPYC, and its sigmoid kernel runs at twice the rate. It also adds what lets GCC turn
a kernel's loop into AVX2 code (MLX writes one element per iteration and its exp stayed a
call): a fused silu(gate) * up runs at 1.4-1.5 G elements/s instead of 0.13 there.

MLX keeps built kernels in `<temp dir>/mlx/<version>/cpu` and reuses any it finds there by
name, whatever flags built them. So this also points TMPDIR at a directory of our own, in
the same temporary directory, for MLX: kernels with and without the flags never mix (a
benchmark of an older commit, built without them, keeps using MLX's default directory).
Python's `tempfile` keeps the temporary directory it had.

`QWEN_LORA_CPU_JIT=off` leaves PATH and TMPDIR alone.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

JIT_ENV = "QWEN_LORA_CPU_JIT"
# The instruction sets, then what lets GCC vectorize a kernel's loop: inlining MLX's exp (its
# default limit keeps it a call) and if-converting its selects (no FP traps, no errno: MLX
# reads neither). Not -ffast-math, which would drop MLX's NaN and infinity checks.
FLAGS = ("-mavx2", "-mfma", "-mf16c", "-finline-limit=1000", "-fno-trapping-math",
         "-fno-math-errno")
_CPU_FEATURES = ("avx2", "fma", "f16c")  # /proc/cpuinfo's names for what FLAGS use


@dataclass(frozen=True)
class JitInfo:
    """Which flags MLX's compiled CPU kernels are built with, and where they are kept."""

    flags: tuple[str, ...]
    kernel_dir: str | None
    reason: str


_jit: JitInfo | None = None


def _cpu_features() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _write_wrapper(path: Path, compiler: str) -> None:
    """A `g++` that runs `compiler` with FLAGS first; written atomically."""
    script = f'#!/bin/sh\nexec "{compiler}" {" ".join(FLAGS)} "$@"\n'
    if path.exists() and path.read_text() == script:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(script)
    tmp.chmod(0o755)
    os.replace(tmp, path)


def _skip(reason: str) -> JitInfo:
    global _jit
    _jit = JitInfo((), None, reason)
    return _jit


def use_cpu_jit_flags(cache_dir: Path | None = None) -> JitInfo:
    """Build `mx.compile`'s CPU kernels with FLAGS where the CPU has AVX2/FMA/F16C; idempotent.

    `cache_dir` (default: qwen_lora's user cache, beside the BLAS shim, which also has to be
    in a directory that allows executables) holds the `g++` wrapper. Returns what is in effect.
    """
    global _jit
    if _jit is not None:
        return _jit
    from qwen_lora.backend import OFF_VALUES
    from qwen_lora.backend import cache_dir as default_cache_dir

    if cache_dir is None:
        cache_dir = default_cache_dir()
    setting = os.environ.get(JIT_ENV, "").strip().lower()
    if setting in OFF_VALUES:
        return _skip(f"{JIT_ENV}={setting}")
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return _skip("not Linux x86-64")
    missing = [f for f in _CPU_FEATURES if f not in _cpu_features()]
    if missing:
        return _skip(f"the CPU lacks {', '.join(missing)}")
    # Wrapper and kernels are named after the flags: two versions of qwen_lora running at
    # once (asv builds of other commits) never build kernels with each other's flags.
    flags_id = hashlib.sha256(" ".join(FLAGS).encode()).hexdigest()[:8]
    bin_dir = cache_dir / f"jit-bin-{flags_id}"
    search_path = os.pathsep.join(  # the real g++, not a wrapper of ours already on PATH
        p for p in os.environ.get("PATH", "").split(os.pathsep)
        if not (Path(p).parent == cache_dir and Path(p).name.startswith("jit-bin")))
    compiler = shutil.which("g++", path=search_path)
    if compiler is None:
        return _skip("no g++ on PATH (MLX does not compile CPU kernels without it)")
    wrapper = bin_dir / "g++"
    try:
        _write_wrapper(wrapper, compiler)
        subprocess.run([str(wrapper), "--version"], check=True, capture_output=True)
        tmp_root = Path(tempfile.gettempdir())  # fixes Python's choice before TMPDIR changes
        name = f"qwen_lora-{os.getuid()}-jit-{'-'.join(_CPU_FEATURES)}-{flags_id}"
        # A child of a process that did this inherits TMPDIR already pointing here.
        kernel_root = tmp_root if tmp_root.name == name else tmp_root / name
        kernel_root.mkdir(mode=0o700, exist_ok=True)
        if kernel_root.stat().st_uid != os.getuid():
            return _skip(f"{kernel_root} belongs to another user")
    except (OSError, subprocess.CalledProcessError) as err:
        return _skip(f"the g++ wrapper in {bin_dir} does not run: {err}")
    if not os.environ.get("PATH", "").startswith(str(bin_dir) + os.pathsep):
        os.environ["PATH"] = str(bin_dir) + os.pathsep + os.environ.get("PATH", "")
    os.environ["TMPDIR"] = str(kernel_root)
    _jit = JitInfo(FLAGS, str(kernel_root / "mlx"), f"{compiler} with the flags, via {wrapper}")
    return _jit


def jit_info() -> JitInfo:
    """What `use_cpu_jit_flags` did (or `JitInfo((), None, 'not set up')` before it ran)."""
    return _jit if _jit is not None else JitInfo((), None, "not set up")
