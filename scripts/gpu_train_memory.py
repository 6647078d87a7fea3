"""Peak memory of one LoRA training step, qwen_lora beside mlx-lm, with qwen_lora's memory
savers switched off one at a time: to see which part of the step holds the bytes. Each
variant runs in its own process (a compiled step keeps its model alive)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qwen_lora.model as qm  # noqa: E402, I001
import qwen_lora.train_step as ts  # noqa: E402
from benchmarks.common import W, mx, write_model_dir  # noqa: E402  (loads qwen_lora first)
from benchmarks.training import trainer  # noqa: E402

model_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/qwen-model-default")
VARIANTS = ["mlx_lm", "qwen_lora", "qwen_lora:unsliced", "qwen_lora:no-swiglu-checkpoint",
            "qwen_lora:uncompiled", "qwen_lora:lora-in-compute-dtype", "qwen_lora:loss-in-fp16",
            "qwen_lora:lora-in-compute-dtype+loss-in-fp16+no-swiglu-checkpoint"]

if len(sys.argv) < 3:
    if not (model_dir / "config.json").exists():
        write_model_dir(model_dir, W.model)
    for variant in VARIANTS:
        subprocess.run([sys.executable, __file__, str(model_dir), variant], check=False)
    sys.exit(0)

impl, _, changes = sys.argv[2].partition(":")
changes = set(changes.split("+"))
if "unsliced" in changes:
    ts.LOSS_CHUNK = 1 << 20
if "no-swiglu-checkpoint" in changes:
    qm._swiglu_checkpointed = qm._swiglu
if "lora-in-compute-dtype" in changes:
    import qwen_lora.lora as ql_lora

    real_lora = ql_lora.LoRALinear.__init__

    def lora_in_dtype(self, linear, *args, **kwargs):
        real_lora(self, linear, *args, **kwargs)
        self.lora_a = self.lora_a.astype(linear.weight.dtype)
        self.lora_b = self.lora_b.astype(linear.weight.dtype)

    ql_lora.LoRALinear.__init__ = lora_in_dtype
if "loss-in-fp16" in changes:
    nn_losses = __import__("mlx.nn", fromlist=["losses"]).losses
    real_ce = nn_losses.cross_entropy
    ts.nn.losses.cross_entropy = lambda logits, t: real_ce(logits.astype(mx.float16), t)
if "uncompiled" in changes:
    real = ts.TrainStep.__init__

    def uncompiled(self, model, optimizer, compile=True, grad_checkpoint=False):
        real(self, model, optimizer, compile=False, grad_checkpoint=grad_checkpoint)

    ts.TrainStep.__init__ = uncompiled
step = trainer(impl, str(model_dir), warm=False)
for run in ("first", "second"):
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    step()
    print(f"{sys.argv[2]:32s} {run}: peak {mx.get_peak_memory() / 1e9:.3f} GB, "
          f"{(mx.get_peak_memory() - before) / 1e9:.3f} over the {before / 1e9:.3f} before",
          flush=True)
