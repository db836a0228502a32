"""The native kernels, built at install time: one shared library per instruction-set level.

``qadapt/quant/native/ggml_kernels.c`` is compiled once per variant into
``qadapt/quant/native/_qadapt_kernels_<variant>.<ext>``: on x86-64 ``portable`` (plain C, any x86-64),
``avx2`` (AVX2 + FMA + F16C), ``avxvnni`` (that plus AVX-VNNI) and ``avx512vnni`` (AVX-512 F/BW/VL/DQ + VNNI);
elsewhere (aarch64, ...) ``portable`` only. At run time the best variant this CPU supports is loaded
(``qadapt.quant.native``), so a wheel built here runs on any x86-64. They are plain C libraries called
through ctypes (no Python API), built as setuptools extensions so that ``pip install`` / ``pip wheel``
compile them with the platform's compiler. A variant that does not compile (no OpenMP: retried without it;
an old compiler without an instruction set) is skipped with a message: qadapt then uses the next one,
or, with none, compiles the source on first use or runs on torch alone, and says so.
"""

from __future__ import annotations

import hashlib
import os
import platform

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCE = "qadapt/quant/native/ggml_kernels.c"
BASE = ["-O3", "-ffp-contract=off", "-fopenmp"]
X86 = {
    "portable": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2"],
    "avxvnni": ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-mavxvnni"],
    "avx512vnni": ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-mavx512f", "-mavx512bw", "-mavx512vl",
                   "-mavx512dq", "-mavx512vnni"],
}


def variants() -> dict[str, list[str]]:
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i686", "x86"):
        return X86
    return {"portable": []}


class BuildKernels(build_ext):
    """Each variant in its own temp folder (the one source compiles once per flag set), with OpenMP if the
    compiler has it, and never failing the install over an optional accelerator."""

    def build_extension(self, ext):
        base_temp = self.build_temp
        self.build_temp = os.path.join(base_temp, ext.name.rsplit(".", 1)[-1])
        flags = list(ext.extra_compile_args)
        try:
            for attempt in (flags, [f for f in flags if f != "-fopenmp"]):
                ext.extra_compile_args = attempt
                ext.extra_link_args = ["-fopenmp"] if "-fopenmp" in attempt else []
                try:
                    super().build_extension(ext)
                    return
                except Exception as e:  # the compiler's own message is above
                    last = e
            print(f"qadapt: skipping the native kernels' `{ext.name}` variant ({last}); another variant, "
                  "compile-on-first-use or torch will run instead")
        finally:
            self.build_temp = base_temp

    def get_export_symbols(self, ext):
        return []  # a ctypes library: no PyInit_ entry point to export


#: the source's hash, compiled in: a build older than the source it sits beside is recognised and not used
with open(SOURCE, "rb") as f, open(SOURCE.replace("ggml_kernels.c", "ggml_types.h"), "rb") as h:
    SOURCE_SHA = hashlib.sha256(f.read() + h.read()).hexdigest()[:16]

setup(
    ext_modules=[Extension(f"qadapt.quant.native._qadapt_kernels_{name}", [SOURCE], extra_compile_args=BASE + flags,
                           define_macros=[("QA_SOURCE_SHA", f'"{SOURCE_SHA}"')], libraries=["m"],
                           depends=["qadapt/quant/native/ggml_types.h"])
                 for name, flags in variants().items()],
    cmdclass={"build_ext": BuildKernels},
)
