"""`qwen-lora train`, `fuse` and `generate --adapter-path` as a user runs them."""

from __future__ import annotations

import json
import re

import mlx.core as mx
import pytest

from qwen_lora import load
from qwen_lora.cli import main
from qwen_lora.train import latest_checkpoint, read_trainer_state

HAND_WRITTEN = """\
{"text": "The quick brown fox jumps over the lazy dog."}
{"prompt": "Question: what is the capital of France? Answer:", "completion": " Paris."}
{"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello!"}]}
"""


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text(HAND_WRITTEN)
    return tmp_path


def test_readme_fine_tuning_commands(workdir, capsys):
    # The README's commands, verbatim apart from a shorter run.
    assert main(["init", "--preset", "tiny", "--out", "models/tiny"]) == 0
    assert main(["train", "--model", "models/tiny", "--data", "train.jsonl", "--iters", "20",
                 "--batch-size", "2", "--seq-len", "64", "--rank", "8", "--alpha", "16",
                 "--targets", "q_proj,v_proj", "--lr", "1e-2", "--adapter-path",
                 "adapters/tiny", "--save-every", "10", "--report-every", "10"]) == 0
    err = capsys.readouterr().err
    assert "3,584 trainable parameters" in err and "3 training examples" in err
    progress = [line for line in err.splitlines() if line.startswith("step ")]
    assert len(progress) == 2 and progress[-1].startswith("step 20/20 [####################]")
    for figure in ("loss ", " s/step", " tok/s", "peak "):
        assert figure in progress[-1]
    adapters = workdir / "adapters" / "tiny"
    assert (adapters / "adapters.safetensors").exists()
    assert sorted(p.name for p in (adapters / "checkpoints").iterdir()) == [
        "step-000010", "step-000020"]

    prompt = ["--prompt", "Question: what is the capital of France? Answer:", "--max-tokens", "8"]
    assert main(["generate", "--model", "models/tiny", "--adapter-path", "adapters/tiny",
                 *prompt]) == 0
    adapted_text = capsys.readouterr().out
    assert main(["fuse", "--model", "models/tiny", "--adapter-path", "adapters/tiny",
                 "--out", "models/tiny-fused"]) == 0
    assert "bfloat16" in capsys.readouterr().out
    fused = workdir / "models" / "tiny-fused"
    assert (fused / "tokenizer.json").exists() and (fused / "config.json").exists()
    assert main(["generate", "--model", "models/tiny-fused", *prompt]) == 0
    assert capsys.readouterr().out == adapted_text


def test_fused_directory_equals_base_plus_adapter(workdir, tiny_dir, capsys):
    assert main(["train", "--model", str(tiny_dir), "--data", "train.jsonl", "--iters", "3",
                 "--lr", "1e-2", "--targets", "q_proj,k_proj,o_proj,up_proj",
                 "--adapter-path", "a"]) == 0
    assert main(["fuse", "--model", str(tiny_dir), "--adapter-path", "a", "--out", "f"]) == 0
    x = mx.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    # float32 on every device: in a GPU's float16 the two round differently
    adapted = load(tiny_dir, dtype="float32", adapter_path="a")(x)
    assert mx.allclose(load("f", dtype="float32")(x), adapted, atol=1e-5)
    assert main(["fuse", "--model", str(tiny_dir), "--adapter-path", "a",
                 "--out", str(tiny_dir)]) == 2
    assert "is the base model directory" in capsys.readouterr().err


def test_resume_from_the_command_line(workdir, tiny_dir, capsys):
    base = ["train", "--model", str(tiny_dir), "--data", "train.jsonl", "--adapter-path", "out"]
    assert main([*base, "--iters", "4", "--batch-size", "3", "--rank", "4", "--lr", "1e-3",
                 "--save-every", "2", "--seed", "7"]) == 0
    # Left out, the options come from the checkpoint; --iters is the new total.
    assert main([*base, "--iters", "6", "--resume"]) == 0
    assert "resuming from" in capsys.readouterr().err
    state = read_trainer_state(latest_checkpoint("out"))
    assert state["step"] == 6 and state["config"]["batch_size"] == 3
    assert state["config"]["seed"] == 7 and state["lora"]["rank"] == 4
    assert main([*base, "--iters", "6", "--resume"]) == 0
    assert "nothing to train" in capsys.readouterr().err
    assert main([*base, "--iters", "8", "--resume", "--rank", "8"]) == 2
    assert "--rank 8 differs from the checkpoint" in capsys.readouterr().err
    assert main([*base, "--iters", "8"]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--iters", "0", "argument --iters: must be a positive integer, got '0'"),
    ("--batch-size", "-2", "argument --batch-size: must be a positive integer"),
    ("--seq-len", "0", "argument --seq-len: must be a positive integer"),
    ("--rank", "0", "argument --rank: must be a positive integer"),
    ("--rank", "two", "argument --rank: must be a positive integer, got 'two'"),
    ("--alpha", "nan", "argument --alpha: must be a positive number"),
    ("--lr", "0", "argument --lr: must be a positive number, got .0."),
    ("--targets", "q_proj,x_proj", "argument --targets: unknown target 'x_proj'"),
    ("--dropout", "1.5", "argument --dropout: must be in \\[0, 1\\)"),
])
def test_bad_parameters_are_named(workdir, tiny_dir, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--model", str(tiny_dir), "--data", "train.jsonl", flag, value])
    assert exit_.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_bad_inputs_exit_with_a_clear_message(workdir, tiny_dir, capsys):
    (workdir / "bad.jsonl").write_text('{"text": "ok"}\n{"prompt": "no completion"}\n')
    base = ["train", "--model", str(tiny_dir), "--iters", "2"]
    assert main([*base, "--data", "bad.jsonl"]) == 2
    assert "bad.jsonl:2: has 'prompt' but no 'completion'" in capsys.readouterr().err
    assert main([*base, "--data", "missing.jsonl"]) == 2
    assert "no such data file" in capsys.readouterr().err
    assert main([*base, "--data", "train.jsonl", "--num-layers", "3"]) == 2
    assert "the model has 2 layers" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_dir), "--adapter-path", "nowhere",
                 "--prompt-ids", "1"]) == 2
    assert "no such adapter directory" in capsys.readouterr().err


def test_diverging_loss_exits_with_the_step(workdir, tiny_dir, capsys):
    assert main(["train", "--model", str(tiny_dir), "--data", "train.jsonl", "--iters", "5",
                 "--lr", "1e30", "--save-every", "1", "--adapter-path", "out"]) == 1
    err = capsys.readouterr().err
    assert "step 2: the loss is nan" in err and "step-000001 is kept" in err
    assert json.loads((workdir / "out" / "checkpoints" / "step-000001" /
                       "trainer_state.json").read_text())["step"] == 1
