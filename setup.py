"""Build the optional transpose kernel; everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "lazysd._transpose",
            ["lazysd/_transpose.c"],
            # Baseline flags only, never -march=native: a built wheel must run on any x86-64 and
            # the file build on other machines. The AVX2 / AVX-512 kernels are compiled per
            # function and chosen at import (lazysd/_transpose.c).
            extra_compile_args=["-O3"],
            # Without a C compiler lazysd still installs and loads, through torch's copies.
            optional=True,
        )
    ]
)
