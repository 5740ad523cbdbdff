"""Build the optional Cython kernels in ``_fast``.

The package works without them (pure-Python twins); a missing compiler or Cython
just means a slower agent, so a failed extension build is reported, not fatal,
unless ``RMA_AGENT_REQUIRE_EXT=1`` (the .deb build sets it: we ship compiled kernels).
"""

from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

REQUIRE = os.environ.get("RMA_AGENT_REQUIRE_EXT") == "1"


class OptionalBuildExt(build_ext):
    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # pragma: no cover - depends on the toolchain
            if REQUIRE:
                raise
            print(f"warning: _fast extensions not built ({exc}); pure-Python twins will be used",
                  file=sys.stderr)

    def build_extension(self, ext) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # pragma: no cover
            if REQUIRE:
                raise
            print(f"warning: could not build {ext.name}: {exc}", file=sys.stderr)


def extensions() -> list:
    try:
        from Cython.Build import cythonize
    except ImportError:
        if REQUIRE:
            raise
        print("warning: Cython missing; _fast kernels not compiled", file=sys.stderr)
        return []
    from setuptools import Extension

    # -ffp-contract=off: the kernels must give bit-identical floats to their Python twins.
    args = ["-O3", "-ffp-contract=off", "-fno-fast-math"]
    exts = [
        Extension(f"_fast.{name}", [f"_fast/{name}.pyx"], extra_compile_args=args)
        for name in ("_xor", "_score")
        if os.path.exists(f"_fast/{name}.pyx")
    ]
    return cythonize(exts, language_level=3, compiler_directives={
        "boundscheck": False, "wraparound": False, "cdivision": True, "initializedcheck": False,
    })


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
