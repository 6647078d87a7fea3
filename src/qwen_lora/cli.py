"""The `qwen-lora` command line: info, init, generate, train, fuse, report."""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import qwen_lora  # noqa: F401 - loads the fast BLAS before mlx.core
from qwen_lora.errors import AdapterError, DataError, ModelLoadError, TrainingError
from qwen_lora.model import QUANTIZE_BITS

# Files of a model directory besides its weights and config that a fused copy needs.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json")


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def _dropout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text!r}")
    return value


def _targets(text: str) -> list[str]:
    from qwen_lora.lora import TARGETS

    names = [t.strip() for t in text.split(",") if t.strip()]
    for name in names or ["(none)"]:
        if name not in TARGETS:
            raise argparse.ArgumentTypeError(
                f"unknown target {name!r}; choose from {','.join(TARGETS)}")
    return names


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
    model = load(args.model, dtype=args.dtype, adapter_path=args.adapter_path,
                 fuse_projections=True, quantize=args.quantize)
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


# Training options that a resumed run takes from its checkpoint unless given again:
# (TrainConfig field, argparse dest).
_RESUMABLE = [("iters", "iters"), ("batch_size", "batch_size"), ("seq_len", "seq_len"),
              ("learning_rate", "lr"), ("weight_decay", "weight_decay"),
              ("grad_accum", "grad_accum"), ("mask_prompt", "mask_prompt"), ("seed", "seed"),
              ("save_every", "save_every"), ("report_every", "report_every"),
              ("val_every", "val_every"), ("val_batches", "val_batches")]


def _lora_settings(args: argparse.Namespace, saved: dict[str, Any], num_layers: int
                   ) -> dict[str, Any]:
    """rank/alpha/dropout/targets/layers from the command line, the checkpoint being resumed
    (which must then agree) or the defaults."""
    layers = None
    if args.num_layers is not None:
        if args.num_layers > num_layers:
            raise ValueError(f"--num-layers {args.num_layers}: the model has {num_layers} layers")
        layers = list(range(num_layers - args.num_layers, num_layers))
    given = {"rank": args.rank, "alpha": args.alpha, "dropout": args.dropout,
             "targets": args.targets, "layers": layers}
    defaults = {"rank": 8, "alpha": 16.0, "dropout": 0.0, "targets": ["q_proj", "v_proj"],
                "layers": list(range(num_layers))}
    out = {}
    for key, value in given.items():
        if saved and value is not None and value != saved[key]:
            flag = "--num-layers" if key == "layers" else f"--{key}"
            raise ValueError(f"{flag} {value} differs from the checkpoint being resumed "
                             f"({key} {saved[key]}); leave it out to keep the checkpoint's")
        out[key] = value if value is not None else saved.get(key, defaults[key])
    return out


def cmd_train(args: argparse.Namespace) -> int:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from qwen_lora.data import count_truncated, data_files, load_dataset
    from qwen_lora.lora import apply_lora, read_adapter_config, trainable_parameters
    from qwen_lora.tokenizer import load_tokenizer
    from qwen_lora.train import (
        ProgressPrinter,
        TrainConfig,
        latest_checkpoint,
        read_trainer_state,
        train,
    )
    from qwen_lora.weights import load

    out = Path(args.adapter_path)
    checkpoint = latest_checkpoint(out) if args.resume else None
    saved_config = read_trainer_state(checkpoint).get("config", {}) if checkpoint else {}
    defaults = TrainConfig()
    values = {}
    for name, dest in _RESUMABLE:
        given = getattr(args, dest)
        values[name] = given if given is not None else saved_config.get(name,
                                                                        getattr(defaults, name))
    config = TrainConfig(**values, grad_checkpoint=args.grad_checkpoint,
                         compile=not args.no_compile)
    config.validate()
    if checkpoint is not None and values["iters"] <= read_trainer_state(checkpoint)["step"]:
        print(f"{checkpoint} already reaches step {values['iters']}: nothing to train "
              f"(raise --iters to continue)", file=sys.stderr)
        return 0

    model = load(args.model, dtype=args.dtype)
    saved_lora = read_adapter_config(checkpoint) if checkpoint else {}
    lora = _lora_settings(args, saved_lora, len(model.layers))
    tokenizer = load_tokenizer(model.path)
    eos = model.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    if eos is None:
        eos = tokenizer.token_to_id("<|endoftext|>")
    train_file, val_file = data_files(args.data)
    if args.val_data is not None:
        val_file = Path(args.val_data)
    vocab = model.config.vocab_size
    train_set = load_dataset(train_file, tokenizer, eos, vocab)
    val_set = load_dataset(val_file, tokenizer, eos, vocab) if val_file is not None else None
    for name, dataset in (("training", train_set), ("validation", val_set or [])):
        long = count_truncated(dataset, config.seq_len)
        if long:
            print(f"warning: {long} of {len(dataset)} {name} examples are longer than "
                  f"--seq-len {config.seq_len} and are truncated", file=sys.stderr)

    mx.random.seed(config.seed)  # the adapters' initial values
    apply_lora(model, lora["rank"], lora["alpha"], lora["targets"], lora["layers"],
               lora["dropout"])
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    trainable = trainable_parameters(model)
    print(f"LoRA rank {lora['rank']}, alpha {lora['alpha']:g} on {','.join(lora['targets'])} "
          f"of {len(lora['layers'])} layers: {trainable:,} trainable parameters "
          f"({100 * trainable / total:.3f}% of {total:,})", file=sys.stderr)
    print(f"data: {len(train_set)} training examples from {train_file}"
          + (f", {len(val_set)} validation from {val_file}" if val_set else "")
          + (f"; resuming from {checkpoint}" if checkpoint else ""), file=sys.stderr)
    printer = ProgressPrinter(config.report_every)
    try:
        result = train(model, train_set, config, out, val_set, resume=args.resume,
                       on_step=printer, on_eval=printer.validation,
                       metadata={"model": str(args.model), "data": str(train_file),
                                 "val_data": str(val_file) if val_file else None})
    except KeyboardInterrupt:
        last = latest_checkpoint(out)
        kept = (f"the last checkpoint {last} is kept: continue with --resume" if last
                else "no checkpoint was written")
        print(f"interrupted; {kept}", file=sys.stderr)
        return 130
    print(f"saved adapter to {out} (checkpoint {result.checkpoint})")
    return 0


def cmd_fuse(args: argparse.Namespace) -> int:
    from qwen_lora.config import ModelConfig
    from qwen_lora.lora import fuse_lora
    from qwen_lora.weights import load, resolve_model_path, save

    model_dir = resolve_model_path(args.model)
    out = Path(args.out)
    if out.exists() and out.resolve() == model_dir.resolve():
        raise ValueError(f"--out {out} is the base model directory; choose another")
    # Fusing in the saved dtype gives the same weights as in float32 (LoRALinear.fused adds
    # the update in float32 and rounds once) with half the memory for bfloat16 models.
    dtype = args.dtype or ModelConfig.from_dir(model_dir).torch_dtype
    model = load(model_dir, dtype=dtype, adapter_path=args.adapter_path)
    fuse_lora(model)
    save(model, out)
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out / name)
    print(f"fused {args.adapter_path} into {model_dir}: wrote {out} ({dtype})")
    return 0


def _add(p: argparse.ArgumentParser, flag: str, kind: Callable[[str], Any], help: str) -> None:
    p.add_argument(flag, type=kind, default=None, help=help)


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
    p.add_argument("--quantize", type=int, default=None, choices=QUANTIZE_BITS,
                   metavar="BITS", help="quantize the weights to BITS (8, 4, ...) after loading")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("train", help="fine-tune LoRA adapters on a JSONL file",
                       description="Fine-tune LoRA adapters with AdamW. --data is a JSONL file "
                       "of {\"text\"}, {\"prompt\", \"completion\"} or {\"messages\"} "
                       "records, or a directory with train.jsonl (and valid.jsonl). With "
                       "--resume, options left out are taken from the checkpoint.")
    p.add_argument("--model", required=True, help="model directory or Hub repo id")
    p.add_argument("--data", required=True, help="JSONL file, or directory with train.jsonl")
    p.add_argument("--val-data", default=None, help="JSONL file for the validation loss")
    p.add_argument("--adapter-path", default="adapters",
                   help="output directory: adapter, checkpoints/ (default: adapters)")
    _add(p, "--iters", _positive_int, "total optimizer steps (default 100)")
    _add(p, "--batch-size", _positive_int, "examples per micro-batch (default 4)")
    _add(p, "--seq-len", _positive_int, "longest input in tokens; longer ones are truncated "
         "(default 512)")
    _add(p, "--rank", _positive_int, "LoRA rank (default 8)")
    _add(p, "--alpha", _positive_float, "LoRA alpha; scale = alpha / rank (default 16)")
    _add(p, "--dropout", _dropout, "LoRA dropout (default 0)")
    _add(p, "--targets", _targets, "comma-separated projections to adapt, from q_proj, k_proj, "
         "v_proj, o_proj, gate_proj, up_proj, down_proj (default q_proj,v_proj)")
    _add(p, "--num-layers", _positive_int, "adapt the last N layers (default all)")
    _add(p, "--lr", _positive_float, "AdamW learning rate (default 1e-4)")
    _add(p, "--weight-decay", _nonnegative_float, "AdamW weight decay (default 0.01)")
    _add(p, "--grad-accum", _positive_int, "micro-batches per optimizer step (default 1)")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute activations in the backward pass (less memory)")
    p.add_argument("--mask-prompt", action="store_true", default=None,
                   help="train only on completions / the last chat message")
    _add(p, "--seed", _nonnegative_int, "seed of the adapters and the data order (default 0)")
    _add(p, "--save-every", _positive_int, "checkpoint every N steps (default 100)")
    _add(p, "--report-every", _positive_int, "progress line every N steps (default 10)")
    _add(p, "--val-every", _positive_int, "validation loss every N steps (default 100)")
    _add(p, "--val-batches", int, "validation batches, <= 0 for all (default 25)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint under --adapter-path")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--no-compile", action="store_true", help="do not mx.compile the step")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("fuse", help="merge a LoRA adapter into the base weights")
    p.add_argument("--model", required=True, help="base model directory or Hub repo id")
    p.add_argument("--adapter-path", required=True, help="LoRA adapter directory")
    p.add_argument("--out", required=True, help="directory for the fused model")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="dtype of the fused weights (default: the base model's)")
    p.set_defaults(func=cmd_fuse)

    from qwen_lora.report import add_parser as add_report_parser

    add_report_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ModelLoadError, AdapterError, DataError, ValueError, FileNotFoundError) as err:
        print(f"qwen-lora {args.command}: error: {err}", file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f"qwen-lora {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
