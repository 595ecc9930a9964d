"""costs.py: the train step's FLOPs and memory read from the compiled step, the peak table,
`m2det benchmark --train` and benchmarks/device_check.py (tiny config, compile only except
the device check's smoke run)."""

import json
import subprocess
import sys

import pytest

from m2det_jax import load_config
from m2det_jax.cli import main
from m2det_jax.perf.costs import format_cost_table, train_step_cost
from m2det_jax.train.meter import math_of, model_peak_tflops, peak_tflops
from tests.helpers import OVERRIDES, ROOT, config_path


@pytest.fixture(scope="module")
def cfg():
    return load_config(config_path("tiny"), OVERRIDES)


@pytest.fixture(scope="module")
def cost2(cfg):
    return train_step_cost(cfg, 2)


def test_step_flops_are_about_three_forwards(cost2):
    # Measured on tiny (XLA:CPU, jax 0.10): step 1.86 GFLOP/img, forward 0.61, 2 x MACs
    # 0.75; XLA's conv count skips the zero padding, large on tiny's 1x1..4x4 maps, so the
    # forward is 0.81 of the analytic count and the step 2.5x (not 3x) of it, 3.06x of
    # XLA's own forward. The margins hold across batches but fail if the backward or the
    # optimizer went missing (<2x) or something ran twice (>4.5x).
    step, fwd = cost2["step_flops_per_image"], cost2["forward_flops_per_image"]
    analytic = cost2["analytic_forward_flops_per_image"]
    assert 0.7 < fwd / analytic < 1.3
    assert 2.0 < step / analytic < 4.5
    assert 2.5 < step / fwd < 4.0
    assert cost2["step_over_3x_forward"] == pytest.approx(step / (3 * analytic))


def test_memory_fields_and_temp_grows_with_batch(cfg, cost2):
    m2 = cost2["memory"]
    for k in ("argument", "output", "temp", "peak"):
        assert m2[k] > 0, k
    assert m2["alias"] > 0  # the state is donated
    assert m2["peak"] == m2["argument"] + m2["output"] + m2["temp"] - m2["alias"]
    m8 = train_step_cost(cfg, 8, forward=False)["memory"]
    assert m8["temp"] > m2["temp"]
    assert m8["argument"] > m2["argument"]  # the batch
    assert cost2["compile_s"] > 0
    table = format_cost_table([cost2])
    assert "step GFLOP/img" in table and "resnet18 64" in table


PEAKS = [  # (device_kind, dtype, dense TFLOP/s or None)
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989),
    ("NVIDIA H100 80GB HBM3", "float32", 67),
    ("NVIDIA H100 80GB HBM3", "tf32", 495),
    ("NVIDIA H200", "bf16", 989),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312),
    ("NVIDIA A100-SXM4-40GB", "float32", 19.5),
    ("Tesla V100-SXM2-16GB", "float16", 125),
    ("Tesla V100-SXM2-16GB", "float32", 15.7),
    ("TPU v4", "bfloat16", 275),
    ("TPU v5 lite", "bfloat16", 197),
    ("TPU v5e", "bfloat16", 197),
    ("TPU v5p", "bfloat16", 459),
    ("TPU v5", "bfloat16", 459),
    ("cpu", "float32", None),
    ("TPU v4", "float32", None),
    ("NVIDIA H100 80GB HBM3", "int4", None),
]


@pytest.mark.parametrize("kind, dtype, peak", PEAKS)
def test_peak_tflops_lookup(kind, dtype, peak):
    assert peak_tflops(kind, dtype) == peak


def test_cli_benchmark_train_no_run(capsys, cost2):
    args = ["benchmark", "--config", config_path("tiny"), "--train", "--batch", "2",
            "--no_run", *(f"--config.{o}" for o in OVERRIDES)]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "step GFLOP/img" in out and "ms/step" not in out  # compiled, not run
    assert "host CPU:" in out  # figures name the machine
    row = next(line for line in out.splitlines() if line.startswith("resnet18 64")).split()
    # model (2 cells), dtype, remat, accum, batch, then the step's GFLOP per image and the
    # peak MiB: the compiled step's own figures.
    assert row[2:6] == ["float32", "none", "1", "2"]
    assert float(row[6]) == pytest.approx(cost2["step_flops_per_image"] * 1e-9, abs=0.006)
    assert float(row[10]) == pytest.approx(cost2["memory"]["peak"] / 2**20, abs=0.6)


def _device_check(*args, timeout=400):
    cmd = [sys.executable, "benchmarks/device_check.py", "--quick", "--configs",
           "configs/tiny.py", "--cache", "", *args, *OVERRIDES]  # fmt: skip
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def test_device_check_quick_on_cpu(cost2, tmp_path):
    # A budget no busy CI machine reaches: every table runs (the budget has its own test).
    out = _device_check("--variants", "float32", "--json", str(tmp_path / "d.json"),
                        "--data_dir", str(tmp_path), "--budget", "900", timeout=900)  # fmt: skip
    figures = json.loads((tmp_path / "d.json").read_text())
    for head in ("net+NMS ms", "NMS share", "cands/img", "dense ms", "MFU", "plan GiB",
                 "device GiB", "keeps up"):  # fmt: skip
        assert head in out
    (inf,), (train,) = figures["inference"], figures["train"]
    assert inf["math"] == train["math"] == "fp32"  # a CPU: no TF32
    # The NMS share is what the two latencies say; the NMS saw the detection-shaped
    # input's candidates (and many more in the dense case).
    assert inf["nms_share"] == pytest.approx(max(0.0, 1 - inf["net_ms"] / inf["net_nms_ms"]))
    assert 0 < inf["candidates"] < inf["dense_candidates"]
    assert min(inf["net_ms"], inf["net_nms_ms"], inf["dense_ms"], inf["img_per_s"]) > 0
    # The train step it timed is the one `train_step_cost` compiles (batch 2 per device).
    assert train["step_flops_per_image"] == pytest.approx(cost2["step_flops_per_image"])
    assert train["plan_peak_bytes"] == cost2["memory"]["peak"]
    assert train["mfu"] is None and train["device_peak_bytes"] is None  # CPU: unknown
    e2e = {r["what"]: r for r in figures["end_to_end"]}
    assert e2e["train"]["workers"] == 0 and e2e["train"]["img_per_s"] > 0
    assert e2e["train"]["synthetic_img_per_s"] == train["img_per_s"]
    assert e2e["evaluation"]["img_per_s"] > 0
    assert figures["skipped"] == []


def test_device_check_skips_past_its_budget():
    out = _device_check("--budget", "0", "--no_end_to_end", timeout=120)
    assert "skipped, over the 0 s budget" in out
    for what in ("inference tiny fp32", "train tiny bf16"):
        assert what in out.split("skipped")[-1]
    rows = [line for line in out.splitlines() if line.startswith("tiny")]
    assert rows == []  # nothing measured


@pytest.mark.parametrize("kind,dtype,precision,math,peak", [
    ("NVIDIA H100 80GB HBM3", "float32", None, "tf32", 495.0),
    ("NVIDIA H100 80GB HBM3", "float32", "highest", "fp32", 67.0),
    ("NVIDIA H100 80GB HBM3", "bfloat16", None, "bf16", 989.0),
    ("NVIDIA A100-SXM4-40GB", "float32", "tensorfloat32", "tf32", 156.0),
    ("Tesla V100-SXM2-16GB", "float32", None, "fp32", 15.7),  # no TF32 before Ampere
    ("TPU v5 lite", "float32", None, "bf16", 197.0),  # one bf16 pass
    ("TPU v5 lite", "float32", "highest", "bf16x6", 197.0 / 6),
    ("cpu", "float32", None, "fp32", None),
])  # fmt: skip
def test_mfu_is_measured_against_the_math_that_runs(kind, dtype, precision, math, peak):
    assert math_of(kind, dtype, precision) == math
    got = model_peak_tflops(kind, dtype, precision)
    assert got == (pytest.approx(peak) if peak is not None else None)
