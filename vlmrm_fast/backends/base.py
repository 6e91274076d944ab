"""The interface every vision-tower backend implements."""
from __future__ import annotations

import abc
import contextlib
import os
import threading
from typing import Callable, ContextManager, Iterator, List, Optional, Sequence, Tuple, TypeGuard, TypeVar, Union

import torch
from torch.nn.modules import module as nn_module
from torch.utils.hooks import RemovableHandle

from vlmrm_fast.argtypes import BACKEND_NAMES  # noqa: F401  (re-exported; defined where parsers need no torch)
from vlmrm_fast.argtypes import COMPILE_MODES


class BackendError(ValueError):
    """A backend cannot run here (missing extra, device or precision it does not support)."""


def with_cuda_index(device: torch.device) -> torch.device:
    """``device`` with a CUDA index always set (the current device's when none is given): tensors
    report ``cuda:0``, which is not equal to ``torch.device("cuda")``. Without CUDA it is returned
    as is, for the caller's own error. A CPU device loses its index: tensors report ``cpu``, and
    ``module.to("cpu:0")`` copies a module's buffers on the CPU (new tensors in their places)."""
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if device.type == "cpu" and device.index is not None:
        return torch.device("cpu")
    return device


def missing_cuda_device(device: torch.device) -> Optional[str]:
    """Why ``device`` (a CUDA device with an index) does not exist on this machine, or None.

    Caught at the API boundary, before torch's "invalid device ordinal" from deep inside a copy.
    """
    if device.type != "cuda" or device.index is None or not torch.cuda.is_available():
        return None
    count = torch.cuda.device_count()
    if device.index < count:
        return None
    return f"{device} does not exist: this machine has {count} CUDA device{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1})"


def parse_device(name: Union[str, torch.device]) -> Optional[torch.device]:
    """``torch.device(name)``, or None for a name that is no device (torch raises RuntimeError): each
    caller's error then names its own option."""
    try:
        return torch.device(name)
    except (RuntimeError, TypeError):
        return None


def checked_device(device: Union[str, torch.device], no_cuda_fix: str) -> torch.device:
    """``device`` with its CUDA index (:func:`with_cuda_index`), or a ValueError where this machine has no
    such device: without CUDA, naming ``no_cuda_fix`` (the caller's way to the CPU); past the last GPU,
    naming the devices there are; for a name that is no device at all, the forms torch takes."""
    parsed = parse_device(device)
    if parsed is None:
        raise ValueError(f"device={device!r} is not a torch device: pass 'cuda', 'cuda:N' or 'cpu'.")
    device = parsed
    if device.type not in ("cpu", "cuda"):
        # torch names many device types (mps, xpu, meta, ...); these kernels, backends and the renderer's
        # GPU path are written for CUDA (ROCm's GPUs are "cuda" devices too) and the CPU.
        raise ValueError(f"device={str(device)!r}: vlmrm_fast runs on CUDA GPUs and the CPU, not on {device.type!r} "
                         f"devices; pass 'cuda', 'cuda:N' or 'cpu'.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but CUDA is not available here; {no_cuda_fix}")
    why = missing_cuda_device(device)
    if why:
        raise ValueError(f"device={str(device)!r}: {why}; pass one of those, or device='cuda' for the current one.")
    return with_cuda_index(device)


class SwappedModule:
    """A layer this package put in a tower in place of the tower's own (the patch embedding as a matmul, the
    MLPs with the GELU in a matmul epilogue or in the fp8 quantisation kernel, the fp8 blocks with their
    LayerNorms in it, the LayerNorms and QuickGELUs through Triton), computing what it replaced.
    :meth:`original` gives the replaced layer back, for what must see the tower as it was built
    (:func:`original_modules`)."""

    def original(self) -> torch.nn.Module:
        """A module of the replaced class sharing this one's parameters, hooks and mode."""
        raise NotImplementedError


@contextlib.contextmanager
def original_modules(model: torch.nn.Module) -> Iterator[None]:
    """For the duration of the block, every :class:`SwappedModule` in ``model`` is the layer it replaced again
    (same parameters): an ONNX export then writes the graph ONNX Runtime and TensorRT are tuned to (one Conv
    node, not a reshape, transpose and matmul), and the TensorRT engine cache's key is the same whichever
    reward touched the tower first."""
    swapped = [(parent, name, child) for parent in list(model.modules())
               for name, child in list(parent.named_children()) if isinstance(child, SwappedModule)]
    # innermost first: a swapped layer inside another (a LayerNorm in a fused MLP) is put back before the
    # outer one's original() takes its children
    for parent, name, child in reversed(swapped):
        setattr(parent, name, child.original())
    try:
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


def swap_modules(model: torch.nn.Module, swapped: type, accepts: Callable[[object], TypeGuard[ModuleT]],
                 make: Callable[[ModuleT], torch.nn.Module]) -> int:
    """Replace, in place, every child module of ``model`` (at any depth) that ``accepts`` with ``make(child)``;
    the number of modules of type ``swapped`` there now are (those swapped before included)."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, swapped):
                count += 1
            elif accepts(child):
                setattr(parent, name, make(child))
                count += 1
    return count


def submodules(root: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``root`` and every module inside it, depth first: the checks the backends make on every call walk
    the tower so (about 25 us for ViT-B-32's 139 modules), with neither the names nor the set of modules
    already seen that ``root.modules()`` builds (a module held twice is visited twice)."""
    stack: List[Optional[torch.nn.Module]] = [root]
    while stack:
        module = stack.pop()
        if module is not None:
            yield module
            stack.extend(module._modules.values())


def runs_forward_hooks(module: Optional[torch.nn.Module]) -> bool:
    """Whether calling ``module`` would run forward hooks (its own, or every module's): a fused path that
    computes it without calling it would skip them (a user's probe of its output), so it steps aside."""
    return bool(module is not None and (module._forward_hooks or module._forward_pre_hooks
                                        or nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks))


def in_place_of(new: ModuleT, old: torch.nn.Module) -> ModuleT:
    """``new``, made to replace ``old`` in a model, with ``old``'s hooks (the same dicts: hooks registered on
    either fire, and their handles still remove them) and training mode: what a user attached to a layer
    (a feature probe, say) survives the layer's swap."""
    new.__dict__.update({key: value for key, value in old.__dict__.items() if "hook" in key})
    return new.train(old.training)


def pooled_embeddings(output: Union[torch.Tensor, tuple, list]) -> torch.Tensor:
    """A tower's image embeddings [N, D] from its output: open_clip towers built with ``output_tokens``
    (CoCa's) return (pooled, tokens), and the model's ``encode_image`` keeps the pooled one."""
    return output[0] if isinstance(output, (tuple, list)) else output


class WeightsWatch:
    """Whether a module's weights changed since this was made, in microseconds per look (about 15 for the 151
    tensors of ViT-B-32's or ViT-L-14's tower, 80 for ViT-bigG-14's 391).

    It watches the version counter of each of the module's parameters and buffers, which every in-place
    write bumps (``load_state_dict``, an optimizer step, ``p.mul_()`` under ``no_grad``), the dtype and
    device of the first, which ``module.to()`` changes (not its address: moving the storage into shared
    memory, as torch's multiprocessing pickler does, changes no value), and whether the module still holds
    the first and last of them (``load_state_dict(..., assign=True)`` puts new tensors in their place).
    Escaping it: writes through ``p.data`` (a version counter of its own), tensors made under
    ``torch.inference_mode()`` (none), and tensors between the first and last replaced by new objects.

    A copy (pickle, deepcopy: copied with the module, whose tensors it then holds) watches its own tensors,
    and stays changed if the original had seen a change: what the weights were copied into is copied too."""

    def __init__(self, module: torch.nn.Module, *, leave_out: Sequence[str] = ()) -> None:
        """Watch ``module``'s parameters and buffers, bar those under its top-level names ``leave_out``
        (a tensor shared with one of those is watched under its other name)."""
        named, seen = [], set()
        for name, t in _named_tensors(module):  # each tensor once, under its first name outside leave_out
            if name.split(".", 1)[0] not in leave_out and id(t) not in seen:
                seen.add(id(t))
                named.append((name, t))
        self._module = module
        self._tensors = [t for _, t in named]
        self._ends = [named[0][0], named[-1][0]] if named else []
        self._seen = self._now()
        self._changed_before = False

    def __getstate__(self) -> dict:
        return {"_module": self._module, "_tensors": self._tensors, "_ends": self._ends,
                "_changed_before": self.changed()}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._seen = self._now()  # new tensors: new version counters

    def _now(self) -> tuple:
        first = (self._tensors[0].dtype, self._tensors[0].device) if self._tensors else None
        return first, self._still_held(), tuple(_version_of(t) for t in self._tensors)

    def _still_held(self) -> bool:
        module, ends = getattr(self, "_module", None), getattr(self, "_ends", [])
        if module is None or not ends:
            return True
        try:
            held = [_tensor_at(module, name) for name in ends]
        except AttributeError:  # a submodule removed
            return False
        return held[0] is self._tensors[0] and held[1] is self._tensors[-1]

    def changed(self) -> bool:
        return self._changed_before or self._now() != self._seen


def _named_tensors(module: torch.nn.Module) -> list:
    return (list(module.named_parameters(remove_duplicate=False))
            + list(module.named_buffers(remove_duplicate=False)))


def _tensor_at(module: torch.nn.Module, name: str) -> Optional[torch.Tensor]:
    owner, _, attribute = name.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, attribute)


def _version_of(tensor: torch.Tensor) -> int:
    try:
        return tensor._version
    except RuntimeError:  # a buffer made under torch.inference_mode() has no version counter (nor can change)
        return -1


class HooksWatch:
    """Whether the forward hooks a call of a module would run (on it, on any module inside it, or global)
    were registered or removed since this was made: a backend that traced them into a copy of the tower
    (an ONNX graph, an engine) runs the ones it saw then.

    Under 1 us a look while the module had no hooks when this was made and no hook handle has been made
    anywhere in the process since the last look (torch numbers every one it makes); a walk of the module
    otherwise (about 30 us for ViT-B-32's 139 modules). A copy (pickle, deepcopy) compares its own
    module's hooks with those its original had when this was made."""

    def __init__(self, module: torch.nn.Module) -> None:
        self._module = module
        self._seen = forward_hook_keys(module)
        self._handles = getattr(RemovableHandle, "next_id", None)

    def __getstate__(self) -> dict:
        return {"_module": self._module, "_seen": self._seen, "_handles": None}  # another process numbers anew

    def changed(self) -> bool:
        handles = getattr(RemovableHandle, "next_id", None)
        if handles is not None and handles == self._handles and not self._seen:  # (removing one makes no handle)
            return False
        now = forward_hook_keys(self._module)
        self._handles = handles if now == self._seen else None
        return now != self._seen


def forward_hook_keys(module: torch.nn.Module) -> Tuple[int, ...]:
    """The ids of the handles of the forward hooks and pre-hooks a call of ``module`` runs, sorted: unique in
    a process, and kept by a layer the backends swap in (:func:`in_place_of` hands it the same dicts)."""
    keys = [*nn_module._global_forward_pre_hooks, *nn_module._global_forward_hooks]
    for m in submodules(module):
        if m._forward_hooks or m._forward_pre_hooks:
            keys += [*m._forward_pre_hooks, *m._forward_hooks]
    return tuple(sorted(keys))


def missing_extra(package: str, extra: str, needed_by: str) -> BackendError:
    """The error for a missing optional package; ``needed_by`` is a backend's name or a feature ("ONNX export")."""
    if needed_by in BACKEND_NAMES:
        return BackendError(
            f"backend={needed_by!r} needs the `{package}` package, which is not installed. "
            f"Install it with `pip install 'vlmrm-fast[{extra}]'`, or pick another backend (backend='torch')."
        )
    return BackendError(f"{needed_by} needs the `{package}` package, which is not installed. "
                        f"Install it with `pip install 'vlmrm-fast[{extra}]'`.")


class _OneTorchThread:
    """``with ONE_TORCH_THREAD:`` runs the calling thread's torch CPU ops on one thread inside the block.

    ``torch.set_num_threads`` sets the calling thread's count and the count that threads starting torch
    work later begin with, so blocks entered from several threads at once would restore each other's
    values out of order (and could leave new threads on one thread for good). Blocks therefore take a
    lock: they run one at a time (they are short), and each restores exactly what it found. A process forked
    while another thread was in a block (subprocess envs started beside an evaluation thread) starts with the
    lock free: held there for ever by a thread the fork did not copy, it hung the child's first score.
    """

    def __init__(self) -> None:
        self._unlocked()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._unlocked)

    def _unlocked(self) -> None:
        self._lock = threading.RLock()
        self._before: list = []

    def __enter__(self) -> None:
        self._lock.acquire()
        self._before.append(torch.get_num_threads())
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        try:
            torch.set_num_threads(self._before.pop())
        finally:
            self._lock.release()


ONE_TORCH_THREAD = _OneTorchThread()


def check_compile_mode(mode: Optional[str]) -> None:
    """A :class:`BackendError` for a "compile" backend ``mode`` torch.compile lacks (it would raise only at
    the first call, after the model loaded)."""
    if mode is not None and mode not in COMPILE_MODES:
        raise BackendError(f"backend_options mode={mode!r} is not one of torch.compile's modes: {', '.join(COMPILE_MODES)}.")


class VisionBackend(abc.ABC):
    """Runs a CLIP vision tower: normalised pixels [N, 3, S_h, S_w] -> raw embeddings [N, D].

    Every backend takes the output of the fused preprocessing op, in ``dtype`` on ``device``, and
    returns unnormalised embeddings (any float dtype) on ``device``; the fused score op follows.
    ``build_seconds`` is the one-off cost (export, compilation, engine build), reported apart from
    steady-state time; ``build_cached`` says whether that build found its work in a cache on disk
    (True: torch.compile's graph cache or a TensorRT engine, so not what a first build takes; False: built
    from nothing; None: no such cache).
    """

    name: str = ""
    copies_weights: bool = False
    """True where the backend runs a copy of the tower's weights made when it was built (an ONNX graph,
    a TensorRT engine): later changes to the tower's weights do not reach it."""

    def __init__(self, device: torch.device, dtype: torch.dtype, image_size: Tuple[int, int]) -> None:
        self.device = with_cuda_index(device)
        self.dtype = dtype
        self.image_size = image_size
        self.build_seconds = 0.0
        self.build_cached: Optional[bool] = None

    def preprocessing(self, frames: torch.Tensor) -> ContextManager[None]:
        """The context in which CLIPReward runs the preprocessing op on ``frames`` (one chunk, as
        passed to the op) before calling this backend; by default none."""
        return contextlib.nullcontext()

    def profile_nodes(self, pixels: torch.Tensor, calls: int, warmup: int = 1) -> Optional[List[Tuple[str, float, int]]]:
        """The backend's own profile of ``calls`` calls on ``pixels``, as (kernel or op, total ms, count),
        where torch.profiler cannot see its work; None (the default) to leave it to torch.profiler."""
        return None

    @abc.abstractmethod
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, S_h, S_w] ``dtype`` -> [N, D] raw embeddings."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device}, dtype={self.dtype}, build_seconds={self.build_seconds:.1f})"
