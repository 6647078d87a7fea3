"""The hosted benchmark dashboard: CI glue around asv, the landing summary page, and a
headless-Chromium driver for testing the published pages.

Kept apart from `qwen_lora` on purpose: importing it loads neither MLX nor the BLAS shim, so
the thin CI jobs (planning a backfill, joining results, pushing the results branch) run with a
bare Python and `PYTHONPATH=src`.
"""
