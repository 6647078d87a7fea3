"""The asv suite (benchmarks/, asv.conf.json): asv's own check, the benchmarks it discovers in
each workload, the plan's rows, and the KV-cache memory against its formula."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwen_lora import preset
from qwen_lora.report import SEED_MAP, environment_name, load_json_with_comments

REPO = Path(__file__).resolve().parents[1]
ASV = Path(sys.executable).with_name("asv")

DISCOVER = """
import json, sys
from asv_runner.discovery import disc_benchmarks
out = {}
for b in disc_benchmarks(sys.argv[1]):
    out[b.name] = {"params": b.params, "param_names": b.param_names, "type": b.type,
                   "unit": b.unit, "timeout": b.timeout, "rounds": getattr(b, "rounds", None),
                   "setup_cache_key": b.setup_cache_key}
print(json.dumps(out))
"""


def discover(workload: str) -> dict[str, dict]:
    """The benchmarks asv discovers, as the runner imports them under `workload`."""
    proc = subprocess.run([sys.executable, "-c", DISCOVER, str(REPO / "benchmarks")],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "QWEN_LORA_WORKLOAD": workload})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def suites() -> dict[str, dict[str, dict]]:
    return {w: discover(w) for w in ("default", "small")}


def test_asv_check_passes():
    proc = subprocess.run([str(ASV), "check", "--python=same"], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_teardown_survives_a_skipped_setup(monkeypatch):
    """asv runs `teardown` also where `setup` raised NotImplementedError (an old commit, a
    comparator missing): a teardown that needs setup's state turns the skip into a failure."""
    monkeypatch.syspath_prepend(str(REPO))
    checked = []
    for section in ("training", "inference", "memory", "micro"):
        module = importlib.import_module(f"benchmarks.{section}")
        for cls in vars(module).values():
            if isinstance(cls, type) and cls.__module__ == module.__name__ \
                    and hasattr(cls, "teardown"):
                params = [values[0] for values in getattr(cls, "params", [])]
                cls().teardown("/nonexistent-model-dir", *params)
                checked.append(cls.__name__)
    assert "ForwardPass" in checked


MACHINE_LIMITS = {"micro.MatmulRate.time_matmul", "micro.HeadMatvec.time_matvec"}


def test_one_module_per_section_with_camelcase_classes(suites):
    names = suites["default"]
    modules = {name.split(".")[0] for name in names}
    assert modules == {"training", "inference", "memory", "micro"}
    for name, info in names.items():
        module, cls, method = name.split(".")
        assert cls[0].isupper() and "_" not in cls, name
        assert method.startswith(("time_", "track_")), name
        if name in MACHINE_LIMITS:  # the machine's rates: no implementation to compare
            assert info["param_names"][0] == "dtype", name
            continue
        assert info["param_names"][0] == "implementation", name
        impls = {v.strip("'") for v in info["params"][0]}
        assert {"qwen_lora", "mlx_lm"} <= impls, name  # both lines in every graph
        if module == "memory":
            assert info["type"] == "track" and info["unit"] == "bytes", name
        else:
            assert info["type"] == "time" and info["unit"] == "seconds", name


def test_workloads_share_parameters_and_run_attributes(suites):
    """Results of both workloads must line up: asv records params, timeout and rounds from
    the discovery run, whichever workload that imported."""
    assert suites["default"] == suites["small"]


def test_every_row_of_the_plan_has_a_benchmark(suites):
    names = suites["default"]
    for row, spec in SEED_MAP:
        bench, _, params = spec.partition(" ")
        assert bench in names, (row, bench)
        for assignment in params.split():
            key, value = assignment.split("=", 1)
            info = names[bench]
            assert value in info["params"][info["param_names"].index(key)], (row, spec)


def test_torch_line_in_generation_and_training(suites):
    for bench in ("training.LoRATraining.time_step", "training.LoRATraining.time_token",
                  "inference.Generation.time_first_token", "inference.Generation.time_per_token",
                  "inference.Generation.time_total"):
        assert "'torch'" in suites["default"][bench]["params"][0], bench


def test_default_workload_is_the_plan(monkeypatch):
    monkeypatch.delenv("QWEN_LORA_WORKLOAD", raising=False)
    monkeypatch.syspath_prepend(str(REPO))
    common = importlib.import_module("benchmarks.common")
    w = common.current_workload()
    assert w.name == "default"
    coder = preset("qwen2.5-coder-0.5b")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "rope_theta",
                  "tie_word_embeddings"):
        assert w.model[field] == getattr(coder, field), field
    assert (w.train_seq, w.prompt, w.new_tokens, w.kv_tokens, w.op_size, w.component_seq) == \
        (512, 128, 100, 2048, 1024, 512)
    assert (w.temperature, w.top_p, w.top_k) == (0.7, 0.9, 50)
    assert w.lora == {"rank": 8, "alpha": 16.0, "targets": ("q_proj", "v_proj")}
    assert (w.learning_rate, w.weight_decay) == (1e-4, 0.01)
    assert sorted(w.sample_vocabularies) == [32000, 151936]
    # The corrected formula: 2 key/value heads, not 14.
    assert w.kv_cache_bytes(2048, 2) == 24 * 2 * 2 * 2048 * 64 * 2 == coder.kv_cache_bytes(2048, 2)
    monkeypatch.setenv("QWEN_LORA_WORKLOAD", "nonsense")
    with pytest.raises(ValueError, match="QWEN_LORA_WORKLOAD"):
        common.current_workload()


KV_PROBE = """
import json, sys
from pathlib import Path
from benchmarks import common
from benchmarks.memory import PeakMemory
W = common.W
model_dir = str(common.write_model_dir(Path(sys.argv[1]), W.model))
out = {"formula": W.kv_cache_bytes(W.kv_tokens, 4)}
for impl in common.MLX_IMPLEMENTATIONS:
    bench = PeakMemory()
    bench.setup(model_dir, impl)
    out[impl] = bench.track_kv_cache(model_dir, impl)
print(json.dumps(out))
"""


def test_kv_cache_track_equals_the_formula(tmp_path):
    """layers x 2 x KV heads x tokens x head_dim x 4 bytes, measured through each model."""
    proc = subprocess.run([sys.executable, "-c", KV_PROBE, str(tmp_path / "model")], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "QWEN_LORA_WORKLOAD": "small"})
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["formula"] == 4 * 2 * 1 * 256 * 64 * 4
    assert got["qwen_lora"] == got["formula"]
    assert got["mlx_lm"] == got["formula"]


FORWARD_PROBE = """
import json, sys
from pathlib import Path
import mlx.core as mx
from benchmarks import common
from benchmarks.inference import ForwardPass
model_dir = str(common.write_model_dir(Path(sys.argv[1]), common.W.model))
out = {}
for impl in common.MLX_IMPLEMENTATIONS:
    bench = ForwardPass()
    bench.setup(model_dir, impl)
    offset = bench.cache[0].offset
    bench.time_forward(model_dir, impl)
    grown = bench.cache[0].offset
    bench.teardown(model_dir, impl)
    step = bench.call(bench.token, cache=bench.cache).reshape(-1)
    bench.teardown(model_dir, impl)
    plain = bench.model(bench.token, cache=bench.cache)[0, -1]
    bench.teardown(model_dir, impl)
    out[impl] = {"call": type(bench.call).__name__, "offsets": [offset, grown,
                 bench.cache[0].offset], "gap": mx.abs(step - plain).max().item()}
print(json.dumps(out))
"""


def test_forward_pass_times_each_librarys_decoding_step(tmp_path):
    """The sampling target's denominator: qwen_lora's compiled decoding step (what its
    generation runs), which computes what the model call does; mlx-lm's model call; every
    sample at the prompt's length."""
    proc = subprocess.run([sys.executable, "-c", FORWARD_PROBE, str(tmp_path / "model")],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "QWEN_LORA_WORKLOAD": "small"})
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["qwen_lora"]["call"] == "DecodeStep"
    assert got["mlx_lm"]["call"] == "Model"
    for impl in ("qwen_lora", "mlx_lm"):
        assert got[impl]["offsets"] == [32, 33, 32], impl
    assert got["qwen_lora"]["gap"] < 1e-3


def test_config_builds_every_commit_and_pins_the_environment():
    conf = load_json_with_comments(REPO / "asv.conf.json")
    assert conf["environment_type"] == "virtualenv" and conf["branches"] == ["main"]
    assert conf["repo"] == "." and conf["html_dir"] == "html"
    assert conf["show_commit_url"].startswith("http")
    assert "--force-reinstall" in conf["install_command"][0]
    assert "--no-deps" in conf["install_command"][0]
    assert "{build_cache_dir}" in conf["build_command"][0]
    assert conf["matrix"]["env_nobuild"]["QWEN_LORA_WORKLOAD"] == ["default", "small"]
    reqs = conf["matrix"]["req"]
    assert list(reqs)[0] == "torch"  # before peft, which would pull its own build
    assert all(v for k, v in reqs.items() if k != "mlx-cpu")  # pinned: the same every commit
    assert conf["regressions_thresholds"]["memory\\..*"] < conf["regressions_thresholds"][
        "^(?!memory\\.).*"]


def test_environment_names_are_asvs():
    names = {w: environment_name(REPO / "asv.conf.json", w) for w in ("default", "small")}
    assert names["default"].endswith("QWEN_LORA_WORKLOADdefault")
    assert names["small"].endswith("QWEN_LORA_WORKLOADsmall")
    assert names["default"].removesuffix("default") == names["small"].removesuffix("small")


def test_small_workload_takes_enough_samples_for_asvs_statistics(monkeypatch):
    """asv flags a change only if a Mann-Whitney test gives p < 0.002, which 6 samples per
    side can never reach (complete separation: p = 2/924); the small workload gates
    regressions, so every time benchmark takes at least 7."""
    monkeypatch.syspath_prepend(str(REPO))
    common = importlib.import_module("benchmarks.common")
    small = common.WORKLOADS["small"]
    assert min(small.slow_repeat, small.step_repeat, small.fast_repeat[0]) >= 7


def test_machine_registration_records_what_asv_detects(tmp_path):
    """`make asv-machine` (scripts/asv_machine.py) saves the host's os, cpu, CPU count and RAM
    under the name, where `asv machine --yes` saves the name alone; a value already recorded
    for the name stays."""
    script = REPO / "scripts" / "asv_machine.py"
    env = {**os.environ, "HOME": str(tmp_path)}

    def run() -> dict:
        subprocess.run([sys.executable, str(script), "box-1"], env=env, check=True,
                       capture_output=True, timeout=60)
        return json.loads((tmp_path / ".asv-machine.json").read_text())["box-1"]

    first = run()
    assert first["num_cpu"] == str(os.cpu_count()) and first["arch"] and first["ram"]
    data = json.loads((tmp_path / ".asv-machine.json").read_text())
    data["box-1"]["cpu"] = "named by hand"
    (tmp_path / ".asv-machine.json").write_text(json.dumps(data))
    assert run() == {**first, "cpu": "named by hand"}


def test_sampling_overhead_shares_one_evaluation_among_its_draws(monkeypatch):
    """time_overhead reports the time per draw of `SHARED_DRAWS` draws evaluated together."""
    monkeypatch.syspath_prepend(str(REPO))
    inference = importlib.import_module("benchmarks.inference")
    bench = inference.Sampling()
    bench.setup("qwen_lora", "top_p", 32000)
    sampler, draws, evaluations = bench.sampler, [], []
    bench.sampler = lambda logprobs: draws.append(1) or sampler(logprobs)
    evaluate = inference.mx.eval
    monkeypatch.setattr(inference.mx, "eval", lambda *a: evaluations.append(1) or evaluate(*a))
    before = inference.SAMPLING_CLOCK()
    bench.time_overhead("qwen_lora", "top_p", 32000)
    assert (len(draws), len(evaluations)) == (inference.SHARED_DRAWS, 1)
    assert inference.SAMPLING_CLOCK() > before
