"""Build script.

All metadata lives in pyproject.toml. This file exists so that the CUDA extension (csrc/, the
GL-CUDA batch renderer) can be added with torch.utils.cpp_extension behind environment knobs
without changing how the package is installed; today it only defers to pyproject.
"""
from setuptools import setup

setup()
