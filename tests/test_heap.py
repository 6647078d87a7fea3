"""Freed memory stays in the process on glibc CPUs, so large MLX arrays reuse warm pages."""

from __future__ import annotations

import ctypes
import os
import resource
import sys

import mlx.core as mx
import pytest
from subprocess_helpers import run_python

from qwen_lora.heap import heap_info

GLIBC = sys.platform == "linux" and hasattr(ctypes.CDLL(None), "gnu_get_libc_version")
glibc = pytest.mark.skipif(
    not GLIBC or mx.default_device() != mx.cpu,
    reason="the setting applies to glibc's malloc on Linux, where MLX computes on the CPU")

# Page faults of allocating a 64 MB MLX array a second time, after the first was freed.
REFAULTS = """
import resource
import qwen_lora, mlx.core as mx
from qwen_lora.heap import heap_info

def fill():
    a = mx.full((16 * 1024 * 1024,), 1.0)  # 64 MB: above glibc's largest mmap threshold
    mx.eval(a)
    return a.sum().item()

fill()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
fill()
print(heap_info().keeps_freed, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def run(code: str, **env) -> list[str]:
    out = run_python(code, **env)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def _huge_pages_always() -> bool:
    try:
        return "[always]" in open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return False


@glibc
@pytest.mark.skipif(_huge_pages_always(), reason="huge pages fault 2 MB at a time")
def test_freed_arrays_are_reused_without_page_faults():
    pages = 64 * 1024 * 1024 // resource.getpagesize()  # 16,384 faults on fresh 4 KB pages
    keeps, faults = run(REFAULTS)
    assert keeps == "True" and int(faults) < pages // 16
    # glibc's default returns the block to the system, and the next one faults in again.
    keeps, faults = run(REFAULTS, QWEN_LORA_MALLOC="default")
    assert keeps == "False" and int(faults) > pages // 2


def test_in_effect_here_or_says_why_not():
    info = heap_info()
    assert info.reason
    if GLIBC and "QWEN_LORA_MALLOC" not in os.environ:
        assert info.keeps_freed == (mx.default_device() == mx.cpu), info.reason
