"""The flags of MLX's compiled CPU kernels: in effect where the CPU has them, switchable off."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from subprocess_helpers import run_python

from qwen_lora.cpu_jit import FLAGS, _cpu_features, jit_info

applies = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64"
    or not {"avx2", "fma", "f16c"} <= _cpu_features() or shutil.which("g++") is None,
    reason="the flags apply to Linux x86-64 CPUs with AVX2, FMA and F16C, and g++")


@applies
def test_compiled_kernels_are_built_with_the_flags():
    info = jit_info()
    assert info.flags == FLAGS, info.reason
    # The g++ that MLX runs (first on PATH) compiles for FMA and AVX2.
    macros = subprocess.run(["g++", "-E", "-dM", "-x", "c++", "/dev/null"],
                            capture_output=True, text=True, check=True).stdout
    assert "#define __FMA__ 1" in macros and "#define __AVX2__ 1" in macros
    # MLX builds its kernels into our directory, apart from those built without the flags.
    fn = mx.compile(lambda x: mx.exp(x * 3.0) + 1.0, shapeless=True)
    x = mx.arange(9, dtype=mx.float32) / 9
    assert mx.allclose(fn(x), mx.exp(x * 3.0) + 1.0)
    assert list(Path(info.kernel_dir).rglob("lib*Exp*.so"))


@applies
def test_compiled_kernels_keep_nan_and_infinity():
    """The flags let GCC vectorize MLX's exp (inlined, its selects if-converted) but keep IEEE
    semantics: NaN stays NaN, overflow is infinity (no -ffast-math)."""
    x = mx.array([float("nan"), float("inf"), -float("inf"), 100.0, -100.0, 0.5] * 4)

    def fn(x):
        return mx.exp(x * 1.0), mx.sigmoid(x + 0.0), mx.sqrt(x - 1.0)

    for ours, eager in zip(mx.compile(fn, shapeless=True)(x), fn(x), strict=True):
        assert mx.array_equal(ours, eager, equal_nan=True), (ours, eager)
    assert mx.isnan(mx.compile(fn)(x)[0][0]).item()


@applies
def test_a_child_process_shares_the_kernel_directory():
    out = run_python("from qwen_lora.cpu_jit import jit_info; print(jit_info().kernel_dir)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == jit_info().kernel_dir


def test_flags_can_be_turned_off():
    code = ("import os; path, tmp = os.environ['PATH'], os.environ.get('TMPDIR'); "
            "import qwen_lora; from qwen_lora.cpu_jit import jit_info; "
            "print(jit_info().flags, os.environ['PATH'] == path, os.environ.get('TMPDIR') == tmp)")
    env = {k: v for k, v in os.environ.items() if k not in ("PATH", "TMPDIR")}
    env["PATH"] = os.defpath + os.pathsep + str(Path(sys.executable).parent)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**env, "QWEN_LORA_CPU_JIT": "off"}, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["()", "True", "True"]
