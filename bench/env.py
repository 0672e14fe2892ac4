"""The environment recorded with every result; missing pieces (no GPU, no NVML) are None, never errors."""

from __future__ import annotations

import datetime
import os
import platform
import sys

import torch

import bench
from bench.launcher import COMMAND_ENV  # the command the user typed, set by the launcher for its ranks


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None




def environment(argv: list[str] | None = None) -> dict:
    cuda = torch.cuda.is_available()
    return {
        "loopmark_version": bench.__version__,
        # a rank of `loopmark run --nproc-per-node N` records the command the user typed, which started it
        "command": os.environ.get(COMMAND_ENV) or " ".join(["loopmark", *(sys.argv[1:] if argv is None else argv)]),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32 if cuda else None,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32 if cuda else None,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "torch_threads": torch.get_num_threads(),
        "cpu_model": _cpu_model(),
        # the vector instructions torch's CPU kernels use (AVX2, AVX512, ...): they set the order a sum is taken in
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_cores": os.cpu_count(),
        "gpu": gpu_info() if cuda else None,
    }


def _nvml():
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # nvidia-ml-py missing, or no driver
        return None


def _nvml_handle(nvml):
    index = torch.cuda.current_device()
    return nvml.nvmlDeviceGetHandleByIndex(index)


def gpu_info() -> dict:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    info = {"name": props.name, "memory_total_bytes": props.total_memory,
            "capability": f"{props.major}.{props.minor}", "driver": None, "sm_clock_mhz": None,
            "sm_clock_max_mhz": None, "mem_clock_mhz": None, "power_limit_w": None, "temperature_c": None}
    nvml = _nvml()
    if nvml is None:
        return info
    try:
        h = _nvml_handle(nvml)
        driver = nvml.nvmlSystemGetDriverVersion()
        info.update(
            driver=driver.decode() if isinstance(driver, bytes) else driver,
            sm_clock_mhz=nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM),
            sm_clock_max_mhz=nvml.nvmlDeviceGetMaxClockInfo(h, nvml.NVML_CLOCK_SM),
            mem_clock_mhz=nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_MEM),
            power_limit_w=nvml.nvmlDeviceGetPowerManagementLimit(h) / 1000,
            temperature_c=nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU),
        )
    except Exception:  # a field this GPU or driver does not report
        pass
    return info


class EnergyMeter:
    """Millijoule counter of the current GPU (NVML); `read()` is None where it is unavailable."""

    def __init__(self, device: torch.device):
        self.nvml = _nvml() if device.type == "cuda" else None
        self.handle = None
        if self.nvml is not None:
            try:
                self.handle = _nvml_handle(self.nvml)
                self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            except Exception:
                self.handle = None

    def read(self) -> float | None:
        if self.handle is None:
            return None
        return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1000.0
