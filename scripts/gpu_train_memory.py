"""Peak memory of one LoRA training step, qwen_lora beside mlx-lm, with qwen_lora's memory
savers switched off one at a time: to see which part of the step holds the bytes."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

import qwen_lora.train_step as ts  # noqa: E402
from benchmarks.common import W, write_model_dir  # noqa: E402
from benchmarks.training import trainer  # noqa: E402

model_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/qwen-model-default")
if not (model_dir / "config.json").exists():
    write_model_dir(model_dir, W.model)


def peak(impl: str, label: str) -> None:
    step = trainer(impl, str(model_dir), warm=False)
    for run in ("first", "second"):
        mx.clear_cache()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        step()
        print(f"{impl:9s} {label:28s} {run}: peak {mx.get_peak_memory() / 1e9:.3f} GB "
              f"(active before {before / 1e9:.3f})", flush=True)
    del step
    mx.clear_cache()


peak("mlx_lm", "as benchmarked")
peak("qwen_lora", "as benchmarked")
ts.LOSS_CHUNK = 1 << 20
peak("qwen_lora", "head+loss unsliced")

# The dtype that flows out of a LoRA layer, and out of the model, in the compute dtype.
from benchmarks.training import _lora_model  # noqa: E402

model = _lora_model("qwen_lora", str(model_dir))
x = mx.zeros((1, 4, W.model["hidden_size"]), dtype=model.layers[0].input_layernorm.weight.dtype)
print("input", x.dtype, "q_proj out", model.layers[0].self_attn.q_proj(x).dtype,
      "model out", model.model(mx.array([[1, 2, 3, 4]])).dtype, flush=True)
