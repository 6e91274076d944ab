"""The "compile" backend: torch.compile over a few batch-size buckets, with CUDA graphs on CUDA.

Each batch is padded up to the smallest bucket that holds it, so only ``len(buckets)`` graphs are
ever compiled and (on CUDA, ``mode="reduce-overhead"``) captured; larger batches run in slices of
the largest bucket. The tower is first changed as the "torch" backend changes it
(:func:`~vlmrm_fast.backends.eager.adapt_tower`: the patch embedding as a matmul on CUDA, ``quantize="fp8"``),
so that inductor compiles those forms. Compilation happens on first use of a bucket, or up front with
:meth:`CompileBackend.warmup`; its time is kept in ``build_seconds`` (per bucket in
``compile_seconds``), apart from steady-state time.
"""
from __future__ import annotations

import numbers
import time
from typing import Dict, Optional, Sequence, cast

import torch
from torch.utils.hooks import RemovableHandle

from vlmrm_fast.backends.base import (BackendError, VisionBackend, check_compile_mode, forward_hook_keys,
                                     pooled_embeddings)
from vlmrm_fast.backends.eager import adapt_tower

DEFAULT_BUCKETS = (1, 8, 32, 64, 128, 256, 512, 1024)
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
"""torch.compile's modes that capture CUDA graphs (the others, "default" and "max-autotune-no-cudagraphs", do not)."""


_graphs_requested = 0


def _allow_more_graphs(count: int) -> None:
    """Make room in dynamo's per-function graph limits for ``count`` more graphs.

    Every instance of a model class shares one ``forward``, so the default limits (8 graphs, 256 over
    all) are shared by all compiled towers, buckets and dtypes in a process; past them, dynamo runs
    the call eagerly with no more than a log line, and "compile" rows would silently measure eager.
    Both limits are process-wide settings: they are raised to 8 plus the buckets of every compile
    backend built so far (never lowered), which loosens dynamo's recompilation guard for other code too.
    """
    global _graphs_requested
    _graphs_requested += count
    config = torch._dynamo.config
    new_names = hasattr(config, "recompile_limit")  # torch >= 2.6; cache_size_limit before
    for name in ("recompile_limit", "accumulated_recompile_limit") if new_names else (
            "cache_size_limit", "accumulated_cache_size_limit"):
        setattr(config, name, max(getattr(config, name), 8 + _graphs_requested))


def default_buckets(max_batch_size: int) -> tuple:
    """The standard buckets up to ``max_batch_size``, which is always one of them."""
    return tuple(sorted({b for b in DEFAULT_BUCKETS if b < max_batch_size} | {max_batch_size}))


class CompileBackend(VisionBackend):
    name = "compile"

    def __init__(
        self,
        visual: torch.nn.Module,
        device,
        dtype,
        image_size,
        max_batch_size: int,
        buckets: Optional[Sequence[int]] = None,
        mode: Optional[str] = None,
        quantize: Optional[str] = None,
    ) -> None:
        super().__init__(device, dtype, image_size)
        if buckets is not None and (not isinstance(buckets, (list, tuple, range)) or not buckets or not all(
                isinstance(b, numbers.Integral) and not isinstance(b, bool) and int(b) >= 1 for b in buckets)):
            raise BackendError(f"backend_options buckets must be a list of positive integers (batch sizes); got {buckets!r}.")
        self.buckets = tuple(sorted(int(b) for b in buckets)) if buckets else default_buckets(max_batch_size)
        check_compile_mode(mode)
        self.mode = mode or ("reduce-overhead" if device.type == "cuda" else "default")
        _allow_more_graphs(len(self.buckets))
        self.quantize = quantize
        adapt_tower(visual, self.name, self.device, dtype, quantize)
        self.visual = visual
        self.compiled = torch.compile(visual, mode=self.mode, dynamic=False)
        self._hooks_walked: Optional[int] = None  # hooks registered in this process at the last hook-free walk
        self.compile_seconds: Dict[int, float] = {}

    def bucket_for(self, n: int) -> int:
        return next((b for b in self.buckets if b >= n), self.buckets[-1])

    def warmup(self, buckets: Optional[Sequence[int]] = None) -> Dict[int, float]:
        """Compile (and on CUDA capture) the buckets holding the given batch sizes now, rather than on
        their first call; returns the seconds spent per bucket so far (``compile_seconds``)."""
        with torch.inference_mode():  # the kind of tensor real calls bring, or dynamo compiles again
            for bucket in sorted({self.bucket_for(n) for n in (buckets or self.buckets)}):
                if bucket not in self.compile_seconds:
                    self(torch.zeros((bucket, 3) + tuple(self.image_size), dtype=self.dtype, device=self.device))
        return dict(self.compile_seconds)

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        n = pixels.shape[0]
        largest = self.buckets[-1]
        if n > largest:
            return torch.cat([self(pixels[i : i + largest]) for i in range(0, n, largest)])
        if self._inner_hooks():
            # Dynamo does not guard against hooks being added (torch._dynamo.config.skip_nnmodule_hook_guards): a
            # graph traced without them would go on running without a hook registered since, on one of the
            # tower's layers or globally. While there are any, the tower runs eagerly (its own hooks, on
            # ``visual`` itself, run outside the graph either way).
            return pooled_embeddings(self.visual(pixels))
        bucket = self.bucket_for(n)
        if n < bucket:
            pixels = torch.cat([pixels, pixels.new_zeros((bucket - n,) + tuple(pixels.shape[1:]))])
        elif not pixels.is_inference():
            # Dynamo guards on the dispatch keys, which differ between inference tensors (what
            # CLIPReward's preprocessing makes) and others: one graph per bucket needs one kind.
            pixels = pixels.clone()
        if bucket in self.compile_seconds:
            out = pooled_embeddings(self.compiled(pixels))
        else:
            # The first call compiles; with CUDA graphs the second records and the third replays, so
            # all three belong to the one-off cost, not to steady state (without them, two more calls
            # would be steady-state runs counted as compile time).
            start, hits = time.perf_counter(), _graph_cache_hits()
            for _ in range(3 if self.device.type == "cuda" and self.mode in CUDA_GRAPH_MODES else 1):
                out = pooled_embeddings(self.compiled(pixels))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.compile_seconds[bucket] = time.perf_counter() - start
            self.build_seconds = sum(self.compile_seconds.values())
            if hits is not None:  # a graph from the cache on disk (an earlier process's): not a first build's time
                self.build_cached = bool(self.build_cached) or cast(int, _graph_cache_hits()) > hits
        # CUDA graphs reuse their output buffer on the next replay: hand back a copy.
        return out[:n].clone()

    def _inner_hooks(self) -> bool:
        """:func:`_inner_hooks` of the tower, walked again only where a hook has been registered anywhere in
        the process since the last walk found none (torch numbers every hook handle it makes): about 1 us a
        call where the walk takes 30 us for ViT-B-32 (whose compiled batch-1 call took 1.9 ms end to end on
        the H200). A module that already had a hook when it was swapped into the tower since is traced
        again by dynamo, hook and all."""
        registered = getattr(RemovableHandle, "next_id", None)
        if registered is not None and registered == getattr(self, "_hooks_walked", None):
            return False
        found = _inner_hooks(self.visual)
        self._hooks_walked = None if found else registered
        return found


def _inner_hooks(visual: torch.nn.Module) -> bool:
    """Whether forward hooks would run inside ``visual``'s call: global ones, or on any module within it (a
    walk of about 30 us for ViT-B-32's 139 modules; ``visual``'s own run outside the graph)."""
    own = {*visual._forward_pre_hooks, *visual._forward_hooks}
    return any(key not in own for key in forward_hook_keys(visual))


def _graph_cache_hits() -> Optional[int]:
    """How many graphs Inductor has taken from its cache on disk in this process (torch's own counter), or
    None where this torch does not count them."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return None
    return int(counters["inductor"]["fxgraph_cache_hit"])
