"""The `qwen-lora` command line: info, init, generate, train, fuse, report."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import qwen_lora  # noqa: F401 - loads the fast BLAS before mlx.core
from qwen_lora.errors import AdapterError, DataError, ModelLoadError


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def cmd_info(args: argparse.Namespace) -> int:
    from qwen_lora.backend import info, set_device

    if args.device:
        set_device(args.device)
    rows = info()
    width = max(map(len, rows))
    for key, value in rows.items():
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from qwen_lora.weights import init_model_dir

    out = init_model_dir(args.out, args.preset, seed=args.seed, dtype=args.dtype)
    print(f"wrote {args.preset} with random weights (seed {args.seed}, {args.dtype}) to {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from qwen_lora.generate import stream_generate
    from qwen_lora.sampling import Sampler
    from qwen_lora.weights import load

    sampler = Sampler(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    model = load(args.model, dtype=args.dtype, adapter_path=args.adapter_path)
    tokenizer = None
    if args.prompt_ids is not None:
        prompt = args.prompt_ids
    else:
        from qwen_lora.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(model.path)
        prompt = tokenizer.encode(args.prompt).ids
    steps = []
    for step in stream_generate(model, prompt, args.max_tokens, sampler=sampler,
                                use_cache=not args.no_cache):
        steps.append(step)
        if tokenizer is None:
            print(step.token, end=" ", flush=True)
    if tokenizer is not None:
        print(tokenizer.decode([s.token for s in steps]))
    else:
        print()
    if steps:
        last = steps[-1]
        print(f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s; "
              f"first token {last.time_to_first_token * 1e3:.0f} ms; "
              f"generation: {len(steps)} tokens, {last.generation_tps:.2f} tok/s; "
              f"peak memory {last.peak_memory / 2**30:.2f} GiB", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen-lora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="device, dtype, BLAS and versions")
    p.add_argument("--device", choices=["cpu", "gpu"])
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("init", help="write a model directory with random weights")
    p.add_argument("--preset", default="qwen2.5-0.5b")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("generate", help="generate tokens from a prompt")
    p.add_argument("--model", required=True, help="model directory or Hub repo id")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text, encoded with the model's tokenizer.json")
    prompt.add_argument("--prompt-ids", type=_ids, help="comma-separated token ids")
    p.add_argument("--max-tokens", type=int, default=100)
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--adapter-path", default=None, help="LoRA adapter directory")
    p.add_argument("--no-cache", action="store_true", help="recompute instead of a KV cache")
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ModelLoadError, AdapterError, DataError, ValueError, FileNotFoundError) as err:
        print(f"qwen-lora {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
