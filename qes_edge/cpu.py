"""What this machine gives a run: the cores this process may run on, and the memory available."""

from __future__ import annotations

import os


def physical_cores() -> int:
    """Physical cores this process may run on: llama.cpp is slower on SMT siblings."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    cores, processor, physical = set(), None, "0"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "processor":
                    processor = int(value)
                elif key == "physical id":
                    physical = value
                elif key == "core id" and (allowed is None or processor in allowed):
                    cores.add((physical, value))
    except (OSError, ValueError):
        cores = set()
    if cores:
        return len(cores)
    return len(allowed) if allowed else (os.cpu_count() or 1)


def mem_available() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes, or None where there is none (not Linux)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
