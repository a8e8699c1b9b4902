"""The cores this process may run on."""

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
