"""What a measurement depends on, for the rows of every benchmark and profile: commit, device,
driver and library versions. One place, so that all result files name them the same way."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def command_output(args: Sequence[str]) -> Optional[str]:
    """stdout of a command, stripped; None when it cannot run or fails."""
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def package_version(*distributions: str) -> str:
    """The installed version of the first of ``distributions`` found, else ""."""
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return ""


#: The distributions each library a figure depends on may be installed as (nightly torch brings triton as
#: pytorch-triton; ONNX Runtime's and TensorRT's GPU builds have names of their own).
LIBRARY_DISTRIBUTIONS = {
    "triton": ("triton", "pytorch-triton"),
    "open_clip": ("open_clip_torch",),
    "torchvision": ("torchvision",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "onnx": ("onnx",),
    "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu13"),
    "numpy": ("numpy",),
}


#: Follows Triton's version where :mod:`vlmrm_fast.llvm_clash` kept it out of the process: installed, not run.
TRITON_KEPT_OUT = " (installed, kept out of this process: vlmrm_fast.llvm_clash)"


def library_versions(*libraries: str) -> Dict[str, str]:
    """{library: installed version, or ""} for names of :data:`LIBRARY_DISTRIBUTIONS`, in that order;
    Triton's marked with :data:`TRITON_KEPT_OUT` where it was installed but kept out of this process."""
    from vlmrm_fast.llvm_clash import triton_kept_out

    versions = {name: package_version(*LIBRARY_DISTRIBUTIONS[name]) for name in libraries}
    if versions.get("triton") and triton_kept_out():
        versions["triton"] += TRITON_KEPT_OUT
    return versions


#: Names the commit where the tree runs without its git folder (a copy sent to a GPU machine).
COMMIT_VARIABLE = "VLMRM_FAST_COMMIT"


def git_commit() -> str:
    """What ``$VLMRM_FAST_COMMIT`` says where it is set (the commit of a tree sent to another machine,
    whose git folder, if one travelled with it, may be stale); else the short commit of the checkout
    this package runs from, "+dirty" with uncommitted changes to tracked files or untracked files among
    the code (:data:`CODE_PATHS`); else (an installed
    copy, a copy of the tree without its git folder) "unknown"."""
    named = os.environ.get(COMMIT_VARIABLE, "").strip()
    if named:
        return named
    git = ["git", "-C", str(REPO_ROOT)]
    top = command_output(git + ["rev-parse", "--show-toplevel"])
    if top is None or Path(top).resolve() != REPO_ROOT:
        return "unknown"
    commit = command_output(git + ["rev-parse", "--short", "HEAD"]) or "unknown"
    if (command_output(git + ["status", "--porcelain", "--untracked-files=no"])
            or command_output(git + ["status", "--porcelain", "--untracked-files=all", "--", *CODE_PATHS])):
        commit += "+dirty"
    return commit


#: Where an untracked file is code that may have run (a new module), so the tree is "+dirty"; untracked
#: files elsewhere (results just written, caches) are not.
CODE_PATHS = ("vlmrm_fast", "csrc", ":(glob)benchmarks/*.py", ":(glob)benchmarks/*.sh", "setup.py")


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo where it exists)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def gpu_driver() -> str:
    """The NVIDIA driver version from nvidia-smi, or "" where there is none."""
    out = command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) or ""
    return out.splitlines()[0].strip() if out else ""
