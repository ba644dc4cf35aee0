"""Peak FLOP/s to measure model FLOPs utilization (MFU) against: a GPU's dense bf16 spec, or this machine's
measured fp32 GEMM throughput on the CPU (measured once per machine, then read from a cache file)."""

import json
import os
import platform
import time
from pathlib import Path

import torch

# dense bf16 peak FLOP/s of one device, by a name fragment of torch.cuda.get_device_name()
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}

GEMM_SIZE = 2048
GEMM_REPEATS = 5


def device_peak_flops() -> float | None:
    """The current GPU's dense bf16 peak, or None (no GPU, or one not in the table: MFU is then not reported)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def measure_gemm_flops(size: int = GEMM_SIZE, repeats: int = GEMM_REPEATS) -> float:
    """The best fp32 FLOP/s of a size x size matmul with torch's current threads: the fastest of `repeats`
    (a busy machine slows some; none runs faster than the hardware)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    torch.mm(a, b, out=out)  # warm-up: threads, caches
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def cache_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llm-pipeline" / "gemm_peak.json"


def cpu_peak_flops() -> float:
    """This machine's fp32 GEMM peak, keyed by CPU model, thread count and torch version: measured on first use
    (about a second), then read from the cache file."""
    key = f"{cpu_model()} | {torch.get_num_threads()} threads | torch {torch.__version__}"
    path = cache_file()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if key not in cached:
        cached[key] = measure_gemm_flops()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=2))
        tmp.replace(path)
    return cached[key]


def peak_flops(accelerator: str = "auto") -> float | None:
    """What MFU is measured against where training runs: the GPU's spec peak, else the CPU's measured one."""
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return device_peak_flops() if on_gpu else cpu_peak_flops()


def mfu(tokens_per_s: float, flops_per_token: float, peak: float, devices: int) -> float:
    """Model FLOPs utilization: achieved training FLOP/s over the devices' peak."""
    return tokens_per_s * flops_per_token / (peak * devices)
