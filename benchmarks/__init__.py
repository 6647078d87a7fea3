"""asv benchmarks of qwen_lora against mlx-lm (and PyTorch), one module per section of the
benchmark plan: training, inference, memory and micro. See docs/BENCHMARKS.md."""
