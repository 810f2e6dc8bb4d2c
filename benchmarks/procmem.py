"""This process's memory as the Linux kernel counts it (``/proc/self``), for the benchmarks."""

from __future__ import annotations


def status_bytes(field: str) -> int:
    """A byte count of ``/proc/self/status``: ``VmRSS`` (resident now), ``VmHWM`` (its peak), ``VmSize``."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's RSS (clear_refs 5); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def start_peak(device: str) -> int:
    """Reset the peak-memory counter of ``device`` (``cuda``: the allocator's, else this
    process's RSS high-water mark) and return the memory in use now, the base of the peak."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    reset_peak_rss()
    return status_bytes("VmRSS")


def read_peak(device: str) -> int:
    """The peak since :func:`start_peak`, once the device's queued work is done."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return status_bytes("VmHWM")
