"""Build llama.cpp's backprop fine-tuner (`llama-finetune`) and `llama-quantize`, CPU only.

    nice -n 19 python scripts/build_llama_finetune.py [--patched] [--jobs 2]

The sources are the llama.cpp vendored in the sdist of the *installed*
llama-cpp-python version (fetched from PyPI with ``pip download``), so the peer
runs the same llama.cpp as qes-edge.  Binaries land in
``build/llama.cpp-<version>/bin/``; the sdist and its unpacked tree are cached
under ``build/sdist/``.  A second run with the binaries present only prints
their paths.

``--patched`` also builds ``llama-finetune-patched``: finetune.cpp with two
changes, neither touching the optimisation.  (1) The training text is tokenized
with special tokens parsed (``<|im_start|>`` becomes one token, as at
inference); stock llama-finetune spells them out as plain text.  (2) After every
epoch, and every ``QES_PEER_SAVE_EVERY`` optimizer steps when that variable is
set, it prints ``qes-peer: epoch N cpu_s S`` (or ``step N``: the process's CPU
seconds so far, ``std::clock``, less those spent saving) and saves the model to
``OUT.epochN.gguf`` (``OUT.stepN.gguf``; the last epoch goes to ``OUT`` as
stock), so one run gives an accuracy-against-CPU curve
(scripts/vs_llama_finetune.py).  It is added to the unpacked tree as its own
target, next to the stock one.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("llama-finetune", "llama-quantize")
PATCHED = "llama-finetune-patched"
# What the patched build adds before main(): a save of the model, with the process's CPU seconds
# so far less those of earlier saves, after every QES_PEER_SAVE_EVERY optimizer steps and each epoch.
CHECKPOINTS = r"""
#include <cstdlib>

static llama_model * qes_peer_model = nullptr;
static std::string qes_peer_out;
static long long qes_peer_every = 0, qes_peer_steps = 0;
static double qes_peer_save_cpu = 0.0;

static void qes_peer_save(const char * kind, long long n, bool write) {
    const double start = (double) std::clock() / CLOCKS_PER_SEC;
    fprintf(stderr, "\nqes-peer: %s %lld cpu_s %.3f\n", kind, n, start - qes_peer_save_cpu);
    if (write) {
        llama_model_save_to_file(qes_peer_model, (qes_peer_out + "." + kind + std::to_string(n) + ".gguf").c_str());
        qes_peer_save_cpu += (double) std::clock() / CLOCKS_PER_SEC - start;
    }
}

static void qes_peer_callback(bool train, ggml_opt_context_t opt_ctx, ggml_opt_dataset_t dataset,
                              ggml_opt_result_t result, int64_t ibatch, int64_t ibatch_max, int64_t t_start_us) {
    ggml_opt_epoch_callback_progress_bar(train, opt_ctx, dataset, result, ibatch, ibatch_max, t_start_us);
    if (train && qes_peer_every > 0 && ++qes_peer_steps % qes_peer_every == 0) {
        qes_peer_save("step", qes_peer_steps, true);
    }
}

int main(int argc, char ** argv) {"""
PATCHES = {  # stock text -> patched text, each found exactly once in finetune.cpp
    "int main(int argc, char ** argv) {": CHECKPOINTS,
    "common_tokenize(ctx, params.prompt, true)":
        "common_tokenize(ctx, params.prompt, true, /*parse_special =*/ true)",
    "    llama_opt_init(ctx, model, lopt_params);\n":
        "    llama_opt_init(ctx, model, lopt_params);\n"
        "    qes_peer_model = model;\n"
        "    qes_peer_out = params.out_file;\n"
        "    qes_peer_every = getenv(\"QES_PEER_SAVE_EVERY\") ? atoll(getenv(\"QES_PEER_SAVE_EVERY\")) : 0;\n",
    "ggml_opt_epoch_callback_progress_bar, ggml_opt_epoch_callback_progress_bar);":
        "qes_peer_callback, ggml_opt_epoch_callback_progress_bar);",
    "        ggml_opt_result_reset(result_eval);\n":
        "        ggml_opt_result_reset(result_eval);\n"
        "        qes_peer_save(\"epoch\", lr.epoch + 1, lr.epoch + 1 < lr.epochs);  // the last: saved to -o below\n",
}
PATCHED_CMAKE = f"""
# added by qes-edge scripts/build_llama_finetune.py --patched
add_executable({PATCHED} finetune-patched.cpp)
target_link_libraries({PATCHED} PRIVATE llama-common llama ${{CMAKE_THREAD_LIBS_INIT}})
target_compile_features({PATCHED} PRIVATE cxx_std_11)
"""


def fail(message: str) -> None:
    sys.exit(f"build_llama_finetune: {message}")


def cmake_options(native: bool) -> list[str]:
    """CPU only, static, nothing fetched at configure time (read off the vendored CMakeLists)."""
    on_off = {
        "BUILD_SHARED_LIBS": False,  # self-contained binaries: no clash with the venv's libllama.so
        "GGML_NATIVE": native,  # as the installed wheel was built here (its default)
        "GGML_BACKEND_DL": False, "GGML_CPU": True, "GGML_CCACHE": False, "GGML_OPENMP_FETCH": False,
        "GGML_CUDA": False, "GGML_HIP": False, "GGML_METAL": False, "GGML_VULKAN": False,
        "GGML_OPENCL": False, "GGML_SYCL": False, "GGML_RPC": False, "GGML_BLAS": False,
        "GGML_CPU_KLEIDIAI": False,
        "LLAMA_OPENSSL": False,  # (LLAMA_CURL is gone: deprecated and ignored in this llama.cpp)
        "LLAMA_LLGUIDANCE": False, "LLAMA_BUILD_BORINGSSL": False, "LLAMA_BUILD_LIBRESSL": False,
        "LLAMA_BUILD_COMMON": True, "LLAMA_BUILD_EXAMPLES": True, "LLAMA_BUILD_TOOLS": True,
        "LLAMA_BUILD_TESTS": False, "LLAMA_BUILD_SERVER": False, "LLAMA_BUILD_APP": False,
        "LLAMA_BUILD_UI": False, "LLAMA_USE_PREBUILT_UI": False,
    }
    return ["-DCMAKE_BUILD_TYPE=Release"] + [f"-D{k}={'ON' if v else 'OFF'}" for k, v in on_off.items()]


def sdist(cache: Path, ver: str) -> Path:
    """The cached sdist of llama-cpp-python==ver, downloaded from PyPI when missing."""
    found = sorted(cache.glob(f"llama_cpp_python-{ver}.tar.gz"))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    run = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                          f"llama-cpp-python=={ver}", "-d", str(cache)])
    found = sorted(cache.glob(f"llama_cpp_python-{ver}.tar.gz"))
    if run.returncode or not found:
        fail(f"pip could not download the sdist of llama-cpp-python=={ver} (exit {run.returncode})")
    return found[0]


def unpack(archive: Path, dest: Path) -> Path:
    """vendor/llama.cpp of the sdist, unpacked once into dest."""
    source = dest / "vendor" / "llama.cpp"
    if (source / "CMakeLists.txt").is_file():
        return source
    with tarfile.open(archive) as tar:
        members = []
        for m in tar.getmembers():
            parts = m.name.split("/", 1)
            if len(parts) == 2 and parts[1].startswith("vendor/llama.cpp/"):
                m.name = parts[1]
                members.append(m)
        if not members:
            fail(f"{archive.name} has no vendor/llama.cpp")
        tar.extractall(dest, members=members, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return source


def patched_source(finetune: Path) -> str:
    """finetune.cpp with PATCHES applied."""
    text = finetune.read_text()
    for stock, changed in PATCHES.items():
        if text.count(stock) != 1:
            fail(f"cannot patch {finetune}: {stock.strip()!r} not found exactly once")
        text = text.replace(stock, changed)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patched", action="store_true",
                        help="also build llama-finetune-patched (special tokens parsed; CPU seconds and a save "
                             "each epoch and every QES_PEER_SAVE_EVERY steps)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs (default 2)")
    parser.add_argument("--native", action=argparse.BooleanOptionalAction, default=True,
                        help="-march=native (GGML_NATIVE; default on, as the installed wheel)")
    parser.add_argument("--build-dir", type=Path, default=ROOT / "build", help="default: <repo>/build")
    parser.add_argument("--force", action="store_true", help="rebuild even when the binaries exist")
    args = parser.parse_args()

    try:
        ver = version("llama_cpp_python")
    except PackageNotFoundError:
        fail("llama-cpp-python is not installed in this Python")
    out = args.build_dir / f"llama.cpp-{ver}"
    targets = (*TARGETS, PATCHED) if args.patched else TARGETS
    binaries = [out / "bin" / t for t in targets]
    cache = args.build_dir / "sdist"
    stock = cache / f"llama_cpp_python-{ver}" / "vendor" / "llama.cpp" / "examples" / "training" / "finetune.cpp"
    outdated = args.patched and stock.is_file() and (  # the patch changed since the last build
        not stock.with_name("finetune-patched.cpp").is_file()
        or stock.with_name("finetune-patched.cpp").read_text() != patched_source(stock))
    if args.force or outdated or not all(b.is_file() for b in binaries):
        if not shutil.which("cmake"):
            fail("cmake not found on PATH (apt-get install cmake, or pip install cmake)")
        if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
            fail("no C++ compiler found on PATH (apt-get install g++)")
        source = unpack(sdist(cache, ver), cache / f"llama_cpp_python-{ver}")
        finetune = source / "examples" / "training" / "finetune.cpp"
        if not finetune.is_file() or not (source / "tools" / "quantize").is_dir():
            fail(f"the llama.cpp in llama-cpp-python {ver}'s sdist has no examples/training/finetune.cpp or tools/quantize")
        if args.patched:
            text = patched_source(finetune)
            patched = finetune.with_name("finetune-patched.cpp")
            if not patched.is_file() or patched.read_text() != text:
                patched.write_text(text)
            lists = finetune.with_name("CMakeLists.txt")
            if PATCHED not in lists.read_text():
                lists.write_text(lists.read_text() + PATCHED_CMAKE)
        for step in (["cmake", "-S", str(source), "-B", str(out), *cmake_options(args.native)],
                     ["cmake", "--build", str(out), "--config", "Release", "--target", *targets,
                      "-j", str(args.jobs)]):
            if subprocess.run(step).returncode:
                fail(f"'{' '.join(step[:2])}' failed (output above)")
        if not all(b.is_file() for b in binaries):
            fail(f"the build finished but {out / 'bin'} lacks {', '.join(targets)}")
    for b in binaries:
        print(b)


if __name__ == "__main__":
    main()
