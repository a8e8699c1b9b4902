"""Builds the native kernels with CMake during install, and never fails the install over them.

Metadata lives in pyproject.toml; this file only adds one build step (see docs/native-kernels.md).
``pip install .`` puts the library into the wheel, ``pip install -e .`` into the source tree's
``qes_edge/kernels/_native/``.  Without cmake or a C compiler it prints one line and the
package uses its Numba kernels.  ``QES_EDGE_BUILD_NATIVE=0`` skips the step.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
LIBRARY_DIR = Path("qes_edge", "kernels", "_native")
# Kept in step with qes_edge/kernels/native.py's BUILD_HINT (setup.py cannot import the package).
BUILD_HINT = ("for the native kernels install a C compiler and CMake (Debian, Ubuntu, Raspberry Pi OS: "
              "sudo apt install build-essential cmake) and reinstall qes-edge")


def notice(message: str) -> None:
    print(f"qes-edge: {message}", file=sys.stderr)  # pip shows build output with -v


def build_native(output_dir: Path, build_dir: Path) -> bool:
    """cmake -S . -B build_dir && cmake --build build_dir, the library going to output_dir."""
    if os.environ.get("QES_EDGE_BUILD_NATIVE", "1") == "0":
        notice("QES_EDGE_BUILD_NATIVE=0: native kernels not built; the Numba kernels will be used")
        return False
    cmake = shutil.which("cmake")
    if cmake is None:
        notice(f"cmake not found: native kernels not built; the Numba kernels will be used ({BUILD_HINT})")
        return False
    commands = [
        [cmake, "-S", str(ROOT), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
         f"-DQES_KERNELS_OUTPUT_DIR={output_dir}"],
        [cmake, "--build", str(build_dir), "--config", "Release"],
    ]
    for command in commands:
        try:
            done = subprocess.run(command, capture_output=True, text=True)
        except OSError as e:
            done = subprocess.CompletedProcess(command, 1, "", str(e))
        if done.returncode != 0:
            text = " ".join(line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip())
            lower = text.lower()
            at = lower.find("cmake error") if "cmake error" in lower else lower.find("error")
            why = (text[at:at + 200] if at >= 0 else text[-200:]) or "cmake failed"
            notice(f"native kernels not built ({why}); the Numba kernels will be used ({BUILD_HINT})")
            return False
    notice(f"native kernels built into {output_dir}")
    return True


class BuildPyWithNative(build_py):
    """build_py, then the native library into the package (build_lib, or the source tree when editable)."""

    def run(self):
        super().run()
        package_root = ROOT if getattr(self, "editable_mode", False) else Path(self.build_lib).resolve()
        build_temp = Path(self.get_finalized_command("build").build_temp).resolve()
        build_native(package_root / LIBRARY_DIR, build_temp / "qes-kernels")


class PlatformDistribution(Distribution):
    """The wheel may hold a shared library, so tag it for this platform, not py3-none-any."""

    def has_ext_modules(self):
        return True


setup(cmdclass={"build_py": BuildPyWithNative}, distclass=PlatformDistribution)
