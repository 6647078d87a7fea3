"""Running Python in a fresh interpreter: for what happens at `import qwen_lora`."""

from __future__ import annotations

import os
import subprocess
import sys


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    """`python -c code` with this environment plus `env`; text output captured."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)
