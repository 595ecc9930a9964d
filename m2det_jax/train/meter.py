"""Throughput of a training run: images/s, seconds per step and the model FLOPs
utilisation (MFU), from the compiled step's own FLOP count.

MFU = (FLOPs of one step on one device, XLA's `cost_analysis` of the compiled SPMD
program, which is per device) / (seconds per step) / (the device's dense peak). The peak
comes from `train.peak_tflops` when set (> 0), else from `PEAK_TFLOPS` for the device kind
and `model.dtype`, counting the arithmetic that really runs (`math_of`: float32 runs as
TF32 on Ampere/Hopper GPUs and as bf16 passes on TPUs under JAX's default precision);
unknown devices (CPUs) get no MFU. A scan (gradient accumulation) body is counted k
times: XLA counts a while-loop body once.
"""

from __future__ import annotations

import re
import time
from typing import Any

import jax

# Dense (no structured sparsity) peak TFLOP/s per chip, from the vendors' datasheets:
# NVIDIA H100 / H200 (SXM5), A100 (SXM4 and PCIe share the 312 / 19.5 figures) and V100
# (SXM2) datasheets; Google Cloud TPU system architecture pages (v4, v5e, v5p, v6e).
# "fp32" is plain IEEE float32 (CUDA cores, without TF32); "tf32" the TensorFloat-32 tensor
# core rate. V100 has no bfloat16 arithmetic (its tensor cores do float16: "fp16"), so a
# bf16 lookup there gives None. TPUs publish no float32 peak (float32 matmuls run as several
# bf16 passes), so their "fp32" is None too. Under JAX's default matmul precision float32
# convolutions on Ampere and newer GPUs run as TF32: `model_peak_tflops` measures against it.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "NVIDIA H200": {"bf16": 989.0, "fp16": 989.0, "tf32": 495.0, "fp32": 67.0},
    "NVIDIA H100 SXM": {"bf16": 989.0, "fp16": 989.0, "tf32": 495.0, "fp32": 67.0},
    "NVIDIA H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "NVIDIA A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "NVIDIA V100": {"fp16": 125.0, "fp32": 15.7},
    "TPU v4": {"bf16": 275.0},
    "TPU v5e": {"bf16": 197.0},
    "TPU v5p": {"bf16": 459.0},
    "TPU v6e": {"bf16": 918.0},
}

# (regular expression on the lowercased jax `device.device_kind`, PEAK_TFLOPS key), in order
_KIND_PATTERNS = (
    (r"h200", "NVIDIA H200"),
    (r"h100.*pcie", "NVIDIA H100 PCIe"),
    (r"h100", "NVIDIA H100 SXM"),
    (r"a100", "NVIDIA A100"),
    (r"v100", "NVIDIA V100"),
    (r"tpu\s*v5\s*(lite|e)|v5litepod", "TPU v5e"),
    (r"tpu\s*v5", "TPU v5p"),  # "TPU v5p" and plain "TPU v5"
    (r"tpu\s*v6\s*(lite|e)", "TPU v6e"),
    (r"tpu\s*v4", "TPU v4"),
)

_DTYPE_KEYS = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16",
               "float32": "fp32", "fp32": "fp32", "tf32": "tf32"}  # fmt: skip


def device_family(device_kind: str) -> str | None:
    """The PEAK_TFLOPS key of a jax `device_kind` string, None when unknown (e.g. CPUs)."""
    kind = device_kind.lower()
    for pattern, key in _KIND_PATTERNS:
        if re.search(pattern, kind):
            return key
    return None


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    """Dense peak TFLOP/s of `device_kind` (jax's `device.device_kind`, matched loosely) in
    `dtype` ("bfloat16"/"bf16", "float16", "float32"/"fp32", "tf32"); None when unknown."""
    family = device_family(device_kind)
    key = _DTYPE_KEYS.get(str(dtype).lower())
    if family is None or key is None:
        return None
    return PEAK_TFLOPS[family].get(key)


def math_of(device_kind: str, model_dtype: str, matmul_precision: str | None = None) -> str:
    """The arithmetic a model computing in `model_dtype` really runs on `device_kind` under
    JAX's matmul precision (`jax_default_matmul_precision`; None = default): "bf16" /
    "fp16" for those dtypes; for float32, "tf32" on GPUs with TF32 tensor cores (Ampere
    and newer) unless the precision is "highest"/"float32", "bf16" on TPUs at the default
    precision (one bf16 pass), "bf16x3" / "bf16x6" at "high"/"highest" (three / six
    passes), else "fp32"."""
    key = {"bfloat16": "bf16", "float16": "fp16"}.get(str(model_dtype))
    if key:
        return key
    family = device_family(device_kind) or ""
    p = str(matmul_precision or "default").lower()
    full = p in ("highest", "float32")
    if family.startswith("TPU"):
        return "bf16x6" if full else "bf16x3" if p in ("high", "tensorfloat32",
                                                        "bfloat16_3x") else "bf16"  # fmt: skip
    if "tf32" in PEAK_TFLOPS.get(family, {}) and not full:
        return "tf32"
    return "fp32"


def model_peak_tflops(device_kind: str, model_dtype: str,
                      matmul_precision: str | None = None) -> float | None:  # fmt: skip
    """The peak an MFU of a model computing in `model_dtype` is measured against: the rate
    of the arithmetic it runs (`math_of`), e.g. TF32's for float32 on an H100 at JAX's
    default precision (against the plain fp32 peak such an MFU reads over 100 %). None when
    unknown (CPUs)."""
    math = math_of(device_kind, model_dtype, matmul_precision)
    passes = {"bf16x3": 3, "bf16x6": 6}.get(math, 1)
    peak = peak_tflops(device_kind, math[:4] if passes > 1 else math)
    return None if peak is None else peak / passes


def compiled_flops(compiled, scan_steps: int = 1) -> float | None:
    """FLOPs of a compiled executable (`cost_analysis` is a dict or a list of dicts),
    times `scan_steps` (a step that scans k microbatches); None where the backend does not
    say."""
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    if not ca or "flops" not in ca:
        return None
    return float(ca["flops"]) * max(int(scan_steps), 1)


class StepMeter:
    """Images/s, s/step, TFLOP/s per device and MFU over the steps since the last `read`.

    `tick()` after each dispatched step; `read()` at a log step, after the step's metrics
    were fetched (that fetch waits for the device, so the interval holds finished steps).
    """

    def __init__(self, global_batch: int, device_flops_per_step: float | None,
                 peak: float | None):  # fmt: skip
        self.global_batch = int(global_batch)
        self.flops = device_flops_per_step
        self.peak = peak
        self.restart()

    def restart(self) -> None:
        """Starts a new interval now (e.g. after an evaluation or a checkpoint wait)."""
        self._t, self._n = time.perf_counter(), 0

    def tick(self, steps: int = 1) -> None:
        self._n += steps

    def read(self) -> dict[str, float]:
        dt = max(time.perf_counter() - self._t, 1e-9)
        n = max(self._n, 1)
        out = {"images_per_sec": n * self.global_batch / dt, "step_time": dt / n}
        if self.flops is not None:
            out["device_tflops"] = self.flops / out["step_time"] / 1e12
            if self.peak:
                out["mfu"] = out["device_tflops"] / self.peak
        self.restart()
        return out


def meter_for(cfg, compiled, device) -> StepMeter:
    """The `StepMeter` of the compiled train step of `cfg` on devices like `device`."""
    k = int(cfg.train.grad_accum_steps)
    given = float(cfg.train.peak_tflops or 0.0)
    peak = given if given > 0 else model_peak_tflops(
        device.device_kind, str(cfg.model.dtype), jax.config.jax_default_matmul_precision)
    return StepMeter(cfg.train.batch_size, compiled_flops(compiled, k), peak)


def describe(meter: StepMeter, device: Any) -> str:
    """One log line: the step's FLOPs per device and the peak the MFU is measured against."""
    f = "unknown" if meter.flops is None else f"{meter.flops / 1e9:.1f} GFLOP"
    p = (f"{meter.peak:g} TFLOP/s" if meter.peak else
         "unknown (set train.peak_tflops for an MFU)")  # fmt: skip
    return f"train step: {f} per device ({device.device_kind}); peak {p}"
