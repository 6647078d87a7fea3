"""Device, default dtype and a fast BLAS for MLX on Linux CPUs.

MLX's Linux CPU wheel links a reference BLAS (about 5 GFLOP/s). Before `mlx.core` is first
imported we load an optimized `cblas_sgemm` with RTLD_GLOBAL so that MLX binds to it:

1. a small shim (`_blas_shim.c`) over pip's `scipy-openblas32`, compiled once into the user's
   cache; it also routes matrix-vector products (decoding) to `sgemv`, which streams weights
   near memory bandwidth where OpenBLAS's `sgemm` with M=1 does not;
2. otherwise a system OpenBLAS or MKL found by the dynamic loader.

`QWEN_LORA_BLAS=off` turns this off; `QWEN_LORA_BLAS=/path/libfoo.so` loads that library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

BLAS_ENV = "QWEN_LORA_BLAS"
OFF_VALUES = ("0", "off", "none", "false")  # what turns off a QWEN_LORA_* setting
_SHIM_SOURCE = Path(__file__).with_name("_blas_shim.c")


@dataclass(frozen=True)
class BlasInfo:
    """Which BLAS MLX's float32 matmul uses in this process."""

    name: str
    path: str | None
    reason: str


_blas: BlasInfo | None = None


def cache_dir() -> Path:
    """qwen_lora's per-user cache: the BLAS shim and the g++ wrapper of cpu_jit.py."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "qwen_lora"


def _build_shim() -> Path:
    """Compile the sgemm shim against scipy-openblas32 (once per source and library)."""
    import scipy_openblas32

    lib_dir = scipy_openblas32.get_lib_dir()
    lib_name = scipy_openblas32.get_library()
    source = _SHIM_SOURCE.read_bytes()
    key = hashlib.sha256(source + lib_dir.encode()).hexdigest()[:16]
    target = cache_dir() / f"libqwen_lora_blas-{key}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc) on PATH to build the BLAS shim")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(
            [compiler, "-O2", "-shared", "-fPIC", str(_SHIM_SOURCE), "-o", tmp,
             f"-L{lib_dir}", f"-l{lib_name}", f"-Wl,-rpath,{lib_dir}"],
            check=True, capture_output=True, text=True,
        )
        os.replace(tmp, target)  # atomic: concurrent builders never see half a library
    except subprocess.CalledProcessError as err:
        raise RuntimeError(f"building the BLAS shim failed: {err.stderr.strip()}") from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _system_blas() -> str | None:
    for name in ("openblas", "mkl_rt"):
        path = ctypes.util.find_library(name)
        if path:
            return path
    return None


def load_fast_blas() -> BlasInfo:
    """Load an optimized `cblas_sgemm` for MLX; idempotent. Returns what is in use."""
    global _blas
    if _blas is not None:
        return _blas
    setting = os.environ.get(BLAS_ENV, "").strip()
    if sys.platform != "linux":
        _blas = BlasInfo("platform", None, "not Linux: MLX uses Accelerate or its GPU backend")
        return _blas
    if setting.lower() in OFF_VALUES:
        _blas = BlasInfo("mlx-bundled", None, f"{BLAS_ENV}={setting}")
        return _blas
    if "mlx.core" in sys.modules:
        warnings.warn(
            "mlx.core was imported before qwen_lora: MLX may keep its slow reference BLAS. "
            "Import qwen_lora first.", RuntimeWarning, stacklevel=3,
        )
    attempts: list[tuple[str, object]] = []
    if setting:
        attempts.append(("custom", lambda: setting))
    else:
        attempts.append(("scipy-openblas32+sgemv-shim", lambda: str(_build_shim())))
        attempts.append(("system", _system_blas))
    errors = []
    for name, locate in attempts:
        try:
            path = locate()
            if path:
                lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                lib.cblas_sgemm  # noqa: B018 - raises AttributeError when the symbol is absent
                _blas = BlasInfo(name, path, "loaded before mlx.core")
                return _blas
        except Exception as err:  # noqa: BLE001 - every failure falls through to the next option
            errors.append(f"{name}: {err}")
    reason = "; ".join(errors) or "no optimized BLAS found"
    warnings.warn(f"MLX keeps its reference BLAS (slow float32 matmul): {reason}",
                  RuntimeWarning, stacklevel=3)
    _blas = BlasInfo("mlx-bundled", None, reason)
    return _blas


def blas_info() -> BlasInfo:
    """The BLAS chosen by `load_fast_blas` (loading it if that has not happened yet)."""
    return load_fast_blas()


def blas_core() -> str | None:
    """OpenBLAS's kernel family in use ('Haswell', 'SkylakeX', ...), or None for other BLAS.

    OpenBLAS picks it for the processor when loaded, unless OPENBLAS_CORETYPE names one.
    """
    blas = blas_info()
    if blas.path is None:
        return None
    lib = ctypes.CDLL(blas.path)  # already loaded: this only looks the symbols up
    for symbol in ("scipy_openblas_get_corename", "openblas_get_corename"):
        fn = getattr(lib, symbol, None)
        if fn is not None:
            fn.restype = ctypes.c_char_p
            return fn().decode()
    return None


def device_name() -> str:
    """'cpu', 'gpu (cuda)' or 'gpu (metal)': where MLX runs by default."""
    import mlx.core as mx

    if mx.default_device() == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "gpu (metal)"
    return "gpu (cuda)"


def is_gpu() -> bool:
    import mlx.core as mx

    return mx.default_device() != mx.cpu


def default_dtype():
    """float16 on GPUs; float32 on CPUs, where MLX's half-precision matmul is ~40x slower."""
    import mlx.core as mx

    return mx.float16 if is_gpu() else mx.float32


def set_device(name: str) -> None:
    """Select 'cpu' or 'gpu' as MLX's default device."""
    import mlx.core as mx

    if name not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', not {name!r}")
    mx.set_default_device(mx.gpu if name == "gpu" else mx.cpu)


def info() -> dict[str, str]:
    """What `qwen-lora info` prints: device, dtype, BLAS and versions."""
    import mlx.core as mx

    from qwen_lora import __version__, cuda_decode
    from qwen_lora.cpu_jit import jit_info
    from qwen_lora.heap import heap_info

    blas = blas_info()
    jit = jit_info()
    rows = {
        "qwen_lora": __version__,
        "mlx": mx.__version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "device": device_name(),
        "dtype": str(default_dtype()).replace("mlx.core.", ""),
        "blas": blas.name,
        "blas_path": blas.path or "-",
        "blas_reason": blas.reason,
        "blas_core": blas_core() or "-",
        "cpu_jit_flags": " ".join(jit.flags) or "-",
        "cpu_jit_reason": jit.reason,
        "malloc": heap_info().reason,
        "cuda_decode_kernels": cuda_decode.status(),
    }
    try:
        import mlx_lm

        rows["mlx_lm"] = mlx_lm.__version__
    except ImportError:
        pass
    return rows
