"""Per-token decoding latency after a short and a long prompt, qwen_lora beside mlx-lm, as the
KVCacheVsRecompute benchmark decodes (greedy): to see where a slow token comes from."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import W, load_model, token_ids, write_model_dir  # noqa: E402
from benchmarks.inference import token_times  # noqa: E402

model_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/qwen-model-default")
if not (model_dir / "config.json").exists():
    write_model_dir(model_dir, W.model)
for impl in ("qwen_lora", "mlx_lm"):
    model = load_model(impl, str(model_dir), inference=True)
    for _ in token_times(impl, model, token_ids(8, W.vocab, seed=3), 2):
        pass
    for prompt_len in (W.prompt, W.context - 1):
        prompt = token_ids(prompt_len, W.vocab, seed=4)
        for run in range(3):
            start = time.perf_counter()
            times = [start, *token_times(impl, model, prompt, 1 + W.cached_tokens, sample=False)]
            gaps = [round((b - a) * 1e3, 2) for a, b in zip(times, times[1:], strict=False)]
            print(f"{impl} prompt {prompt_len} run {run}: first {gaps[0]} ms, then "
                  f"{gaps[1:]} (median {statistics.median(gaps[1:]):.2f} ms)", flush=True)
