"""The "onnxruntime" backend: the tower exported to ONNX and run by ONNX Runtime.

On CPU this is the fastest backend measured here (ONNX Runtime's GEMM kernels and graph fusions;
see benchmarks/results/). On CUDA it needs the onnxruntime-gpu build and runs float32 or float16,
with the inputs and outputs bound to torch's device memory (no host copies).

``quantize="int8"`` (CPU only, opt-in, never picked by "auto") runs the tower with int8 weight matmuls
(:mod:`vlmrm_fast.backends.onnx_quantize`): 1.7-2.8x the float32 tower on a 2-core AVX-512 VNNI CPU with ONNX Runtime 1.32 (committed runs), at a reward
error that the profiler reports per run; check it on your checkpoint before training on it.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import ContextManager, List, Optional, Tuple, cast

import numpy as np
import torch

from vlmrm_fast.backends.base import ONE_TORCH_THREAD, BackendError, VisionBackend, missing_extra
from vlmrm_fast.backends.onnx_export import check_exporter, export_onnx
from vlmrm_fast.backends.onnx_quantize import QUANTIZE_CHOICES, quantize_int8
from vlmrm_fast.ops.preprocess import PreprocessSpec
from vlmrm_fast.scratch import remove_abandoned, scratch_prefix

_NUMPY = {torch.float32: np.float32, torch.float16: np.float16}
_SCRATCH_BASE = "vlmrm_fast_onnx-"
"""Name of the folders, in the system's temporary folder, that hold the exported graphs (:mod:`vlmrm_fast.scratch`)."""
ONE_THREAD_BYTES = 2 << 20
"""CPU frame chunks up to this size are preprocessed on one torch thread (see ``preprocessing``)."""
_log = logging.getLogger(__name__)


_LIVE: "weakref.WeakSet[OnnxRuntimeBackend]" = weakref.WeakSet()
"""The backends of this process that hold a session (:func:`_keep_inherited_sessions`)."""
_INHERITED_SESSIONS: list = []
"""The sessions a forked child inherited, held until it ends."""


def _keep_inherited_sessions() -> None:
    """In a forked child (gymnasium's AsyncVectorEnv, SubprocVecEnv with start_method="fork"), every inherited
    backend keeps its session to the end and leaves the parent's graph folder alone. ONNX Runtime hangs for ever
    freeing a session there (it waits on thread-pool threads the fork did not copy), which ``rm.rebuild_backend()``
    or letting the reward model go would do; and the folder's finaliser, inherited too, removed the parent's
    graph, which the parent's next copy (a spawn worker, ``copy.deepcopy``) reads. Runs fine in the child, and
    costs it no memory: the session's pages are the parent's until written."""
    for backend in list(_LIVE):
        _INHERITED_SESSIONS.append(backend.session)
        finalizer = getattr(backend, "_remove_workdir", None)  # a copy has none
        if finalizer is not None:
            finalizer.detach()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_keep_inherited_sessions)


@functools.lru_cache(maxsize=None)
def _torch_uses_openmp() -> bool:
    """Whether torch's CPU ops run on OpenMP, whose idle workers spin; builds on torch's own thread
    pool are left as they are."""
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


class OnnxRuntimeBackend(VisionBackend):
    """ONNX Runtime session over the "pixels" export of the tower (normalised NCHW input).

    Args:
        quantize: None (the tower as exported), or "int8" for dynamic int8 quantisation of its weight
            matmuls (CPU and float32 only; float32 pixels in, float32 embeddings out).
        exporter: which of torch's ONNX exporters writes the graph (:func:`~vlmrm_fast.backends.onnx_export.export_onnx`).
    """

    name = "onnxruntime"
    copies_weights = True

    def __init__(
        self, visual: torch.nn.Module, spec: PreprocessSpec, device, dtype, image_size, quantize: Optional[str] = None,
        exporter: str = "auto",
    ) -> None:
        super().__init__(device, dtype, image_size)
        self.exporter = check_exporter(exporter, self.name)
        if quantize is not None and quantize not in QUANTIZE_CHOICES:
            also = "; fp8 needs backend='tensorrt' on a Hopper GPU" if quantize == "fp8" else ""
            raise BackendError(f"backend_options quantize={quantize!r} is not one of {QUANTIZE_CHOICES} (or None) for "
                               f"backend='onnxruntime'{also}.")
        if quantize is not None and (device.type != "cpu" or dtype != torch.float32):
            raise BackendError(
                f"quantize={quantize!r} runs on CPU with dtype=torch.float32 (float activations around int8 "
                f"matmuls), not {device.type} {dtype}. Drop quantize; on CUDA use backend='torch' or 'tensorrt' "
                "with dtype=torch.bfloat16, or backend='onnxruntime' with dtype=torch.float16."
            )
        self.quantize = quantize
        if device.type not in ("cpu", "cuda"):
            raise BackendError(f"backend='onnxruntime' runs on CPU or CUDA, not {device.type}; use backend='torch' there.")
        try:
            import onnxruntime as ort
        except ImportError:
            raise missing_extra("onnxruntime", "export", self.name) from None
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendError(
                    "backend='onnxruntime' on CUDA needs the GPU build of ONNX Runtime: "
                    "`pip install onnxruntime-gpu` (in place of onnxruntime), or use backend='torch'."
                )
            if dtype not in _NUMPY:
                raise BackendError(f"backend='onnxruntime' runs float32 or float16 on CUDA, not {dtype}; pass dtype=torch.float16.")
            providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0}), "CPUExecutionProvider"]
        else:
            if dtype != torch.float32:
                raise BackendError(f"backend='onnxruntime' on CPU runs float32, not {dtype}; pass dtype=torch.float32.")
            providers = ["CPUExecutionProvider"]
        self._providers = providers
        start = time.perf_counter()
        _log.info("exporting the vision tower to ONNX for ONNX Runtime (once per reward model; the torch "
                  "backend skips it)")
        # The graph lives as long as this backend (copies and profile_nodes read it): removed when it is
        # collected or at exit, without TemporaryDirectory's "implicitly cleaning up" ResourceWarning.
        # Named for this host and process: the next backend made on this host removes what a killed run (SIGKILL,
        # the OOM killer) left, gigabytes for the large towers.
        remove_abandoned(Path(tempfile.gettempdir()), _SCRATCH_BASE, max_age_s=None)
        self._workdir: Optional[Path] = Path(tempfile.mkdtemp(prefix=scratch_prefix(_SCRATCH_BASE)))
        self._remove_workdir = weakref.finalize(self, shutil.rmtree, self._workdir, True)
        path = export_onnx(visual, self._workdir / "tower.onnx", spec, input_format="pixels", exporter=self.exporter)
        if quantize == "int8":
            path = quantize_int8(path, path.with_name("tower-int8.onnx"))
        self._model_path: Optional[Path] = path
        self._start_session()
        self.embed_dim = self.session.get_outputs()[0].shape[1]
        self.build_seconds = time.perf_counter() - start
        _log.info("ONNX Runtime session ready in %.1f s", self.build_seconds)

    def _start_session(self) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(self._model_path), self._session_options(), providers=self._providers)
        _LIVE.add(self)
        if self.device.type == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            # ONNX Runtime falls back to its CPU provider (a cuDNN or CUDA it cannot load) with a log line;
            # the calls would then hand it CUDA memory.
            raise BackendError(
                "ONNX Runtime could not start its CUDA provider (see its log above: usually a CUDA or cuDNN "
                "version that does not match onnxruntime-gpu's); install the onnxruntime-gpu build for this "
                "CUDA, or use backend='torch'."
            )

    def __getstate__(self) -> dict:
        """Pickling (a reward model sent to subprocess envs, ``copy.deepcopy``) carries the exported graph's
        files, not the session, which ONNX Runtime cannot pickle; unpickling starts a new session and
        keeps no files, so a copy cannot be copied again (nor profiled by :meth:`profile_nodes`)."""
        state = self.__dict__.copy()
        del state["session"], state["_workdir"]
        state.pop("_remove_workdir", None)  # a copy has none
        path = state.pop("_model_path")
        if path is None:
            raise TypeError(
                "this reward model is itself a copy of one on backend='onnxruntime', and a copy keeps no graph "
                "to copy again: copy (or pickle) the original, or use backend='torch'."
            )
        data = path.with_name(path.name + ".data")  # the weights of an export with external data
        state["_graph_files"] = {f.name: f.read_bytes() for f in (path, data) if f is path or f.exists()}
        state["_graph_name"] = path.name
        return state

    def __setstate__(self, state: dict) -> None:
        # The copy's session reads the graph from files that are removed at once: a subprocess env's
        # worker ends with os._exit, which no cleanup outlives, and a leftover graph is gigabytes.
        files, name = state.pop("_graph_files"), state.pop("_graph_name")
        self.__dict__.update(state)
        with tempfile.TemporaryDirectory(prefix=scratch_prefix(_SCRATCH_BASE)) as folder:
            for file_name, data in files.items():
                (Path(folder) / file_name).write_bytes(data)
            self._model_path = Path(folder) / name
            self._start_session()
        self._model_path = self._workdir = None

    def _session_options(self):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # torch's count already follows OMP_NUM_THREADS (which may also read "2,1": nested levels).
        options.intra_op_num_threads = torch.get_num_threads()
        if self.device.type == "cpu":
            # Idle ORT workers otherwise busy-wait ~50 ms after each run, halving the speed of the
            # torch work that follows on the same cores (preprocessing, scoring, SAC updates).
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return options

    def profile_nodes(self, pixels: torch.Tensor, calls: int, warmup: int = 1) -> Optional[List[Tuple[str, float, int]]]:
        """ONNX Runtime's own profile on CPU, whose kernels torch.profiler cannot see: (op type, total ms,
        count) over ``calls`` runs on ``pixels`` after ``warmup`` others. It runs a second session with
        profiling on (same graph and options; a second copy of the weights while it lives), which writes
        its trace into this backend's temporary folder. None on CUDA, where torch.profiler sees ONNX
        Runtime's kernels."""
        if self.device.type != "cpu" or self._model_path is None:  # on CUDA, or a copy (no graph kept)
            return None
        import onnxruntime as ort

        options = self._session_options()
        options.enable_profiling = True
        options.profile_file_prefix = str(cast(Path, self._workdir) / "profile")  # None only in a copy (returned above)
        session = ort.InferenceSession(str(self._model_path), options, providers=["CPUExecutionProvider"])
        feed = {"pixels": pixels.contiguous().numpy()}
        for _ in range(warmup + calls):
            session.run(None, feed)
        trace = Path(session.end_profiling())
        events = json.loads(trace.read_text())
        trace.unlink()
        runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                      key=lambda e: e["ts"])[-calls:]
        totals: dict = {}
        for event in events:
            if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
                continue
            if not any(run["ts"] <= event["ts"] <= run["ts"] + run["dur"] for run in runs):
                continue  # a warm-up run's
            op = event.get("args", {}).get("op_name", event["name"])
            ms, count = totals.get(op, (0.0, 0))
            totals[op] = (ms + event["dur"] / 1e3, count + 1)
        return [(op, ms, count) for op, (ms, count) in totals.items()]

    def preprocessing(self, frames: torch.Tensor) -> ContextManager[None]:
        """One torch thread for a small chunk of CPU frames. After a parallel op, torch's OpenMP workers
        busy-wait for several milliseconds (libgomp's default), on the cores this session's threads
        need next. (Such blocks run one at a time across threads: :data:`~vlmrm_fast.backends.base.ONE_TORCH_THREAD`.)
        Measured with ViT-B-32 on 2 cores: that costs 3-4 ms of a 64 ms call at batch 1, and
        one thread wins up to 2 frames at 480 x 480 and at least 8 at 224 x 224 (about 2 MB of frames),
        while from 4 frames at 480 x 480 the second thread's share of the resize is worth more."""
        small = frames.numel() * frames.element_size() <= ONE_THREAD_BYTES
        if self.device.type != "cpu" or frames.device.type != "cpu" or not small or not _torch_uses_openmp():
            return contextlib.nullcontext()
        return ONE_TORCH_THREAD

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.contiguous()
        if self.device.type == "cpu":
            out = self.session.run(None, {"pixels": pixels.numpy()})[0]
            return torch.from_numpy(out)
        out = torch.empty((pixels.shape[0], self.embed_dim), dtype=self.dtype, device=self.device)
        binding = self.session.io_binding()
        np_dtype = _NUMPY[self.dtype]
        index = self.device.index or 0
        binding.bind_input("pixels", "cuda", index, np_dtype, tuple(pixels.shape), pixels.data_ptr())
        binding.bind_output("embeddings", "cuda", index, np_dtype, tuple(out.shape), out.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # ORT runs on its own stream
        self.session.run_with_iobinding(binding)
        return out
