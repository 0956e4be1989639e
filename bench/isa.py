"""Run a benchmark as an AVX2-only machine would, on any x86 machine (``--isa avx2``).

Three settings decide which instructions a genrec run executes: PyTorch's kernel dispatch level
(``ATEN_CPU_CAPABILITY``), MKL's instruction set (``MKL_ENABLE_INSTRUCTIONS``) and what genrec's native kernels are
compiled for (``GENREC_NATIVE_ISA``, see ``genrec.ops.native``). PyTorch reads the first when it first dispatches and
MKL the second when it loads, so a script sets them in the environment of a fresh process: ``reexec_for_isa`` starts
the script again with them before torch is imported. ``genrec.runtime.machine_info`` records them with every row.
Importing this module imports nothing heavy.
"""

from __future__ import annotations

import os
import sys

ISA_ENV = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "GENREC_NATIVE_ISA": "avx2"}}
ISA_CHOICES = ("native", *ISA_ENV)
ISA_HELP = ("avx2: run PyTorch, MKL and genrec's native kernels as on an AVX2-only CPU (AVX2 + FMA, no AVX-512); "
            "the rows record it")


def requested_isa(argv: list[str]) -> str:
    """The value of ``--isa`` in ``argv`` ("native" when absent)."""
    for i, a in enumerate(argv):
        if a.startswith("--isa="):
            return a.split("=", 1)[1]
        if a == "--isa" and i + 1 < len(argv):
            return argv[i + 1]
    return "native"


def isa_env_missing(isa: str) -> bool:
    """Whether this process lacks the environment that ``isa`` needs."""
    return any(os.environ.get(k) != v for k, v in ISA_ENV.get(isa, {}).items())


def reexec_for_isa(argv: list[str]) -> None:
    """Start this script again with the environment of ``--isa`` when it is not set yet (call before importing
    torch); returns when nothing needs to change."""
    isa = requested_isa(argv)
    if isa in ISA_ENV and isa_env_missing(isa):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ISA_ENV[isa]})
