"""CLIPReward: a sentence in, a reward per frame out (the VLM-RM method, SPEC §1)."""
from __future__ import annotations

import functools
import numbers
import os
import threading
import weakref
from typing import Callable, List, Optional, Sequence, Tuple, Union, cast

import numpy as np
import torch

from vlmrm_fast.backends import VisionBackend, build_backend, check_backend_options, resolve_backend
from vlmrm_fast.backends.base import HooksWatch, WeightsWatch, checked_device, submodules
from vlmrm_fast.frames import FrameInput, as_frame_batch, check_tensor_holds_data
from vlmrm_fast.models import create_clip, image_size_of, preprocess_spec_of
from vlmrm_fast.ops._triton import resolve_kernels
from vlmrm_fast.ops.preprocess import PreprocessSpec, check_preprocess_mode, preprocess
from vlmrm_fast.ops.score import score as score_op
from vlmrm_fast.ops.score import unit_rows
from vlmrm_fast.precision import without_autocast
from vlmrm_fast.tasks import EncodedTasks, Prompts, Task, check_alpha, check_tasks, encode_tasks, own_copy, task_list

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


_REWARDS_ON_MODEL: "weakref.WeakKeyDictionary[torch.nn.Module, weakref.WeakSet]" = weakref.WeakKeyDictionary()
"""The live reward models built on each model (whose tower :func:`_place` cast in place)."""
_REWARDS_ON_MODEL_LOCK = threading.Lock()  # a WeakSet read while another thread adds to it raises


def _register_on_model(reward: "CLIPReward", model: torch.nn.Module) -> None:
    with _REWARDS_ON_MODEL_LOCK:
        _REWARDS_ON_MODEL.setdefault(model, weakref.WeakSet()).add(reward)


def _placement(device: torch.device, dtype: torch.dtype, backend: str, options: Optional[dict]) -> tuple:
    """What a CLIPReward does to its model in place: the device (resolved: ``cuda:N``, ``cpu``), the tower's
    dtype, and whether its projections become fp8 ones (the "torch" and "compile" backends' fp8)."""
    fp8 = isinstance(options, dict) and options.get("quantize") == "fp8" and backend != "tensorrt"
    return device, dtype, fp8


def _describe(placement: tuple) -> str:
    device, dtype, fp8 = placement
    return f"on {device} in {dtype}" + (" with fp8 projections" if fp8 else "")


def _check_no_other_placement(model: torch.nn.Module, placement: tuple) -> None:
    """Refuse to change a model that another live CLIPReward runs on another device, in another dtype or
    with other projections: the change is in place, so that one's tower would change under it (a raw dtype
    error at its next call, weights rounded through bf16 for good, or fp8 matmuls it was not built with)."""
    with _REWARDS_ON_MODEL_LOCK:
        others = list(_REWARDS_ON_MODEL.get(model, ()))
    for other in others:
        theirs = getattr(other, "_placement", None)
        if theirs is not None and theirs != placement:
            raise ValueError(
                f"this model is in use by another CLIPReward, {_describe(theirs)}, and building one {_describe(placement)} "
                "would change it in place, under that one (a CLIPReward does not copy its model): build this one on "
                "a copy, CLIPReward(copy.deepcopy(model), ...), or as that one is, or let that one go first (del it)."
            )


def _place(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """``model`` on ``device``, its vision tower in ``dtype`` and everything else (the text side) in
    float32, whatever it came in. The tower is cast first and left out of the float32 cast: a bf16
    ViT-bigG-14 never holds a float32 copy of its tower."""
    visual = cast(torch.nn.Module, model.visual).to(device, dtype)
    model._modules["visual"] = torch.nn.Identity()  # in its place (the order of modules is kept)
    try:
        model.to(device, torch.float32)
    finally:
        model._modules["visual"] = visual
    return model


@functools.lru_cache(maxsize=None)  # registered once per process
def _one_torch_thread_in_forked_children() -> None:
    """A process forked after torch's CPU ops ran here (gymnasium's AsyncVectorEnv and SubprocVecEnv with
    start_method="fork" on Linux, the text tower at the least) hangs at its first parallel torch op: GNU
    OpenMP's thread pool does not survive a fork. Forked children use one torch thread, which needs no pool:
    a worker scoring a few frames of its own env loses little by it."""
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=lambda: torch.set_num_threads(1))


def _resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """The device, with a CUDA index always set (:func:`~vlmrm_fast.backends.base.checked_device`)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return checked_device(device, "pass device='cpu' (command line: --device cpu; train: --reward-device cpu).")


def _resolve_dtype(dtype: Union[str, torch.dtype, None], device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} is not one of {sorted(_DTYPES)}.")
        return _DTYPES[dtype]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype={dtype} is not supported; use torch.float32, torch.bfloat16 or torch.float16.")
    return dtype


def _check_max_batch_size(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"max_batch_size must be a positive integer; got {value!r}.")
    return int(value)


#: Top-level parts of an open_clip model that its encode_text does not read: a change there leaves the goals as
#: they are (the image tower, the contrastive logit scale and bias, CoCa's caption decoder).
_NOT_READ_BY_ENCODE_TEXT = ("visual", "logit_scale", "logit_bias", "text_decoder")


def _check_bottom_up(value: object) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"bottom_up must be True or False (one flag for the whole batch); got {value!r}.")
    return bool(value)


def _check_model_and_tokenizer(model: object, tokenizer: object) -> None:
    if not isinstance(model, torch.nn.Module) or not isinstance(getattr(model, "visual", None), torch.nn.Module):
        also = (f" For a model by name, use CLIPReward.from_pretrained({model!r}, pretrained, goal=...)."
                if isinstance(model, str) else "")
        raise TypeError(f"model must be an open_clip CLIP model (a torch.nn.Module with a .visual tower); got "
                        f"{type(model).__name__}.{also}")
    if not callable(tokenizer):
        raise TypeError(f"tokenizer must be the model's tokenizer, open_clip.get_tokenizer(model_name); got "
                        f"{type(tokenizer).__name__}.")


class CLIPReward:
    """A CLIP model as a zero-shot reward: ``rm(frames)`` gives one reward per frame (and per task).

    The reward of a frame with unit image embedding ``x`` is ``1 - 0.5 * |M (x - g)|^2`` with goal ``g``
    (mean of the goal prompts' unit text embeddings), ``M = alpha u u^T + (1 - alpha) I`` and ``u`` the
    unit direction from baseline to goal (SPEC §1.1). Frames go through the fused preprocessing kernel,
    the vision tower and the fused scoring kernel, in chunks of at most ``max_batch_size`` frames.

    Single task (``goal=``/``baseline=``): rewards are [N]. Several tasks at once (``tasks=[Task(...),
    ...]``): rewards are [N, T], one column per task, from one pass through the tower.

    Build one with :meth:`from_pretrained`, or from an open_clip model you already have:
    ``CLIPReward(model, tokenizer, goal=...)`` (the model is moved to ``device`` and its vision tower
    cast to ``dtype`` in place; the text tower stays float32, so goals are computed in full precision).
    A caller's ``torch.autocast`` (a training loop's mixed precision) does not reach its computations.

    Args:
        model: an open_clip CLIP model.
        tokenizer: its tokenizer (``open_clip.get_tokenizer(name)``).
        goal: a prompt or list of prompts (averaged into one goal). Exclusive with ``tasks``.
        baseline: a prompt or list of prompts, or None (then alpha must be 0).
        tasks: several :class:`Task` scored together; rewards become [N, T].
        alpha: goal-baseline projection strength in [0, 1]; 0 scores against the goal alone.
        device: where everything runs; default CUDA when available, else CPU.
        dtype: the vision tower's precision; default bfloat16 on CUDA, float32 on CPU.
        preprocess: "vlmrm" (squash resize, no antialiasing: parity with the original code) or
            "openclip" (open_clip's eval transform as the model's config sets it: antialiased, shorter
            side and centre crop unless the config squashes; bicubic unless it says bilinear). See SPEC §1.2.
        kernels: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
        backend: how the vision tower runs: "auto" (the fastest verified here), "torch", "compile",
            "onnxruntime" or "tensorrt" (see :mod:`vlmrm_fast.backends`). The fused preprocessing and
            score ops run around every backend.
        backend_options: extra arguments for the backend (e.g. ``{"buckets": (1, 32, 256)}`` for
            "compile", ``{"cache_dir": ...}`` for "tensorrt", ``{"quantize": "int8"}`` for
            "onnxruntime" on CPU, ``{"quantize": "fp8", "calibration_frames": frames}`` for "tensorrt"
            on Hopper GPUs, ``{"quantize": "fp8"}`` for "torch" and "compile" on Hopper GPUs: all opt-in,
            see :mod:`vlmrm_fast.backends.onnx_quantize`, :mod:`vlmrm_fast.backends.onnx_fp8` and
            :mod:`vlmrm_fast.backends.torch_fp8`).
        max_batch_size: most frames per tower call; default 256 on CUDA, 32 on CPU.
        model_name: a label for logs and engine caches (set by :meth:`from_pretrained`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Callable,
        *,
        goal: Optional[Prompts] = None,
        baseline: Optional[Prompts] = None,
        tasks: Optional[Sequence[Task]] = None,
        alpha: float = 0.0,
        device: Union[str, torch.device, None] = None,
        dtype: Union[str, torch.dtype, None] = None,
        preprocess: str = "vlmrm",
        kernels: str = "auto",
        backend: str = "auto",
        backend_options: Optional[dict] = None,
        max_batch_size: Optional[int] = None,
        model_name: Optional[str] = None,
    ) -> None:
        _check_model_and_tokenizer(model, tokenizer)
        self._device = _resolve_device(device)
        if self._device.type == "cpu":
            _one_torch_thread_in_forked_children()
        self._dtype = _resolve_dtype(dtype, self._device)
        self._kernels = resolve_kernels(kernels, self._device)
        self._spec: PreprocessSpec = preprocess_spec_of(model, preprocess)
        self.max_batch_size = (256 if self._device.type == "cuda" else 32) if max_batch_size is None else max_batch_size
        self.model_name = model_name or type(model).__name__
        self._placement = _placement(self._device, self._dtype, backend, backend_options)
        _check_no_other_placement(model, self._placement)
        self.model = _place(model.eval(), self._device, self._dtype)
        self.tokenizer = tokenizer
        self._alpha = check_alpha(alpha)
        self.set_tasks(goal=goal, baseline=baseline, tasks=tasks)
        self._build_backend(backend, backend_options)
        _register_on_model(self, model)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if "model" in state:  # a copy (deepcopy, pickle) runs its own model: registered as the original was
            _register_on_model(self, self.model)

    def _build_backend(self, backend: str, options: Optional[dict]) -> None:
        visual = cast(torch.nn.Module, self.model.visual)
        with without_autocast(self._device):  # a caller's autocast would reach the export, compile or engine build
            self._backend: VisionBackend = build_backend(
                resolve_backend(backend, self._device, self._dtype), visual, self._spec, self._device,
                self._dtype, max_batch_size=self.max_batch_size, model_name=self.model_name, options=options,
                requested=backend, kernels=self._kernels,
            )
        # Kept for rebuild_backend, bar calibration frames (the fp8 build frees them once calibrated).
        self._backend_request = (backend, {k: v for k, v in (options or {}).items() if k != "calibration_frames"})
        self._weights_watch = WeightsWatch(visual) if self._backend.copies_weights else None
        self._hooks_watch = HooksWatch(visual) if self._backend.copies_weights else None

    def rebuild_backend(self, backend_options: Optional[dict] = None) -> None:
        """Build the vision-tower backend again from ``rm.model.visual`` as it is now, with the options it was
        built with (updated by ``backend_options``; an fp8 TensorRT build takes its ``calibration_frames``
        again), and encode the tasks again with the text tower as it is now: after the model's weights
        changed (``load_state_dict``, fine-tuning). A backend running a copy of the tower's weights
        ("onnxruntime"'s graph, "tensorrt"'s engine) does not see such a change, nor do the goal and
        baseline embeddings, which are computed once. Takes the export or engine build again; "torch" and
        "compile" read the tower's weights live (after a change of the text side alone, ``set_tasks`` with
        the prompts again is enough)."""
        backend, options = self._backend_request
        self._encode_tasks(self._encoded.tasks, self._single)  # first: it can fail (goal = baseline now), quickly
        self._build_backend(backend, {**options, **(backend_options or {})})

    def _check_tasks_current(self) -> None:
        watch = getattr(self, "_text_watch", None)  # None in a copy pickled before the watch existed
        if watch is not None and watch.changed():
            raise ValueError(self._placement_problem() or (  # (a rebuild would not mend that one)
                "rm.model's text-side weights changed after the tasks were encoded, so the goal and baseline "
                "embeddings are those of the old weights: call rm.rebuild_backend() after changing the model's "
                "weights (it encodes the tasks again), or rm.set_tasks(...) with the prompts again."
            ))

    def _check_backend_copy_current(self) -> None:
        watch = getattr(self, "_weights_watch", None)  # None in a copy pickled before the watch existed
        if watch is not None and watch.changed():
            raise ValueError(self._placement_problem() or (  # (a rebuild would not mend that one)
                f"rm.model.visual's weights changed after backend={self.backend!r} copied them into its "
                f"{'ONNX graph' if self.backend == 'onnxruntime' else 'engine'}, which would score frames with "
                "the old ones: call rm.rebuild_backend() after changing them (it exports again), or use "
                "backend='torch' or 'compile', which read the weights live."
            ))
        hooks = getattr(self, "_hooks_watch", None)  # None in a copy pickled before the watch existed
        if hooks is not None and hooks.changed():
            raise ValueError(
                f"forward hooks on rm.model.visual, a layer of it or every module (global hooks) were registered "
                f"or removed after backend={self.backend!r} traced the tower into its "
                f"{'ONNX graph' if self.backend == 'onnxruntime' else 'engine'}, which runs the hooks it was "
                "traced with: call rm.rebuild_backend() after changing hooks (it exports again, hooks and all), "
                "or use backend='torch', which runs them as they are."
            )

    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        pretrained: Union[str, os.PathLike, None],
        *,
        goal: Optional[Prompts] = None,
        baseline: Optional[Prompts] = None,
        tasks: Optional[Sequence[Task]] = None,
        alpha: float = 0.0,
        device: Union[str, torch.device, None] = None,
        dtype: Union[str, torch.dtype, None] = None,
        preprocess: str = "vlmrm",
        kernels: str = "auto",
        backend: str = "auto",
        backend_options: Optional[dict] = None,
        max_batch_size: Optional[int] = None,
        cache_dir: Union[str, os.PathLike, None] = None,
    ) -> "CLIPReward":
        """Load an open_clip model and build the reward.

        Args:
            model_name: any open_clip model name ("ViT-B-32", "ViT-bigG-14", ...), or "vlmrm-tiny".
            pretrained: an open_clip tag ("laion2b_s34b_b79k"), a local checkpoint path, or None for
                random weights (with a warning). Offline, a tag loads from the local cache or fails
                at once with :class:`vlmrm_fast.PretrainedWeightsError`.
            cache_dir: open_clip's download cache; default ``~/.cache/huggingface``.
            The other arguments are those of :class:`CLIPReward`.
        """
        # Every argument that can be checked without the model is checked before a load of minutes.
        if tasks is not None and not isinstance(tasks, Task):
            tasks = list(tasks)  # once: a generator is read by the check below and again by the model
        resolved = _resolve_device(device)
        resolved_dtype = _resolve_dtype(dtype, resolved)
        picked = resolve_backend(backend, resolved, resolved_dtype)
        check_backend_options(picked, backend_options, resolved, requested=backend, dtype=resolved_dtype)
        resolve_kernels(kernels, resolved)
        check_preprocess_mode(preprocess)
        if max_batch_size is not None:
            _check_max_batch_size(max_batch_size)
        check_tasks(task_list(goal, baseline, tasks)[0], check_alpha(alpha))
        model, tokenizer = create_clip(model_name, pretrained, cache_dir=cache_dir)
        return cls(
            model, tokenizer, goal=goal, baseline=baseline, tasks=tasks, alpha=alpha, device=device,
            dtype=dtype, preprocess=preprocess, kernels=kernels, backend=backend,
            backend_options=backend_options, max_batch_size=max_batch_size, model_name=model_name,
        )

    # ---- the text side -------------------------------------------------------------------

    def set_tasks(
        self,
        goal: Optional[Prompts] = None,
        baseline: Optional[Prompts] = None,
        tasks: Optional[Sequence[Task]] = None,
        alpha: Optional[float] = None,
    ) -> None:
        """Replace the prompts (one goal/baseline, or several tasks) without reloading the model; ``alpha``
        (default: ``rm.alpha`` as it is) becomes ``rm.alpha`` with them, for the tasks without their own.
        A change that is refused (goal equal to baseline with alpha > 0, say) leaves tasks and alpha as they were."""
        self._encode_tasks(*task_list(goal, baseline, tasks), alpha=None if alpha is None else check_alpha(alpha))

    def _placement_problem(self, tower_only: bool = False) -> Optional[str]:
        """Why ``rm.model`` is no longer where this reward model put it (:func:`_place`: the tower on its device
        in its dtype, the text side in float32 there), or None: after ``rm.model.half()``, ``.to("cuda")``.
        ``tower_only``: of the tower alone (the cause of an error the tower raised: a text side moved since the goals
        were encoded, to the CPU to free GPU memory say, is none)."""
        # A parameter the tower shares with the text side is float32 after :func:`_place` (the text side is cast last),
        # and the tower's dtype after a cast of the tower alone: either is where this reward model put it.
        text_side = {id(p) for name, p in self.model.named_parameters(remove_duplicate=False)
                     if not name.startswith("visual.")}
        for name, p in self.model.named_parameters():
            in_tower = name.startswith("visual.")
            if tower_only and not in_tower:
                continue
            want = self._dtype if in_tower else torch.float32
            wants = (want, torch.float32) if in_tower and id(p) in text_side else (want,)
            if p.is_floating_point() and p.element_size() > 1 and (p.dtype not in wants or p.device != self._device):  # not fp8
                what = "rm.model.visual" if in_tower else "rm.model's text side"
                return (
                    f"{what} is now {p.dtype} on {p.device} (rm.model.{name}), where this reward model runs it in "
                    f"{want} on {self._device} (its preprocessing, backend and kernels were set up for that): move it "
                    f"back, rm.model.visual.to({str(self._device)!r}, {self._dtype}) and the rest of rm.model to "
                    "torch.float32, or build a new CLIPReward on the model as it is now (device=..., dtype=...)."
                )
        return None

    def _encode_tasks(self, tasks: Sequence[Task], single: bool, alpha: Optional[float] = None) -> None:
        problem = self._placement_problem()  # a text side in bf16 would encode the goals less precisely
        if problem is not None:
            raise ValueError(problem)
        alpha = self._alpha if alpha is None else alpha
        encoded = encode_tasks(self.model, self.tokenizer, tasks, self._device)
        self._targets = encoded.targets(alpha)  # raises before any state changes
        self._alpha = alpha
        self._encoded: EncodedTasks = encoded
        self._single = single
        # The goals hold the text tower's output: a later change of its weights makes them stale. Not
        # watched: the parts encode_text does not read (a vision fine-tune clamps logit_scale each step).
        self._text_watch = WeightsWatch(self.model, leave_out=_NOT_READ_BY_ENCODE_TEXT)

    @property
    def alpha(self) -> float:
        """Goal-baseline projection strength in [0, 1] for tasks without their own; settable."""
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        value = check_alpha(value)
        self._targets = self._encoded.targets(value)
        self._alpha = value

    @property
    def tasks(self) -> List[Task]:
        """The tasks scored, as copies: changing their prompt lists changes nothing here (``set_tasks`` does)."""
        return [own_copy(task) for task in self._encoded.tasks]

    @property
    def task_names(self) -> List[str]:
        return [t.label for t in self._encoded.tasks]

    @property
    def goals(self) -> torch.Tensor:
        """[T, D] float32 goal embeddings (means of unit prompt embeddings, not re-normalised); a copy."""
        self._check_tasks_current()
        return self._encoded.goals.clone()

    @property
    def directions(self) -> torch.Tensor:
        """[T, D] float32 unit goal-baseline directions (zero rows for tasks without one); a copy."""
        self._check_tasks_current()
        return self._encoded.directions.clone()

    @property
    def max_batch_size(self) -> int:
        """Most frames per tower call; larger inputs are split into chunks of this size. Settable."""
        return self._max_batch_size

    @max_batch_size.setter
    def max_batch_size(self, value: int) -> None:
        self._max_batch_size = _check_max_batch_size(value)

    # ---- facts -----------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """The vision tower's precision."""
        return self._dtype

    @property
    def backend(self) -> str:
        """The vision-tower backend in use: "torch", "compile", "onnxruntime" or "tensorrt"."""
        return self._backend.name

    @property
    def vision_backend(self) -> VisionBackend:
        """The backend object (its ``build_seconds`` is the one-off export/compile/build cost)."""
        return self._backend

    @property
    def kernels(self) -> str:
        """The implementation the ops use here: "triton" or "torch"."""
        return self._kernels

    @property
    def image_size(self) -> Tuple[int, int]:
        """(height, width) the vision tower takes; render at this size to skip resizing."""
        return image_size_of(self.model)

    @property
    def preprocess_spec(self) -> PreprocessSpec:
        return self._spec

    @property
    def embed_dim(self) -> int:
        return self._encoded.goals.shape[1]

    # ---- the image side --------------------------------------------------------------------

    def preprocess(self, frames: FrameInput, *, bottom_up: bool = False) -> torch.Tensor:
        """Frames -> the tower's input [N, 3, S_h, S_w] in the tower's dtype (for inspection)."""
        bottom_up = _check_bottom_up(bottom_up)
        batch = as_frame_batch(frames)
        with without_autocast(self._device):
            chunks = [
                self._pixels(batch.chunk(i, i + self.max_batch_size, self._device), bottom_up)
                for i in range(0, batch.num_frames, self.max_batch_size)
            ]
        if not chunks:
            return torch.empty((0, 3) + self.image_size, dtype=self._dtype, device=self._device)
        return torch.cat(chunks)

    def _pixels(self, frames: torch.Tensor, bottom_up: bool) -> torch.Tensor:
        """The preprocessing op on one chunk of frames on ``device``, in the backend's context."""
        with self._backend.preprocessing(frames):
            return preprocess(frames, self._spec, self._dtype, bottom_up=bottom_up, impl=self._kernels)

    @torch.inference_mode()
    def _tower(self, frames: torch.Tensor, bottom_up: bool) -> torch.Tensor:
        self._check_backend_copy_current()
        self._check_eval_mode()
        try:
            return self._backend(self._pixels(frames, bottom_up))
        except RuntimeError as error:  # torch's own dtype or device mismatch, once it is the cause: ours says why
            problem = self._placement_problem(tower_only=True)
            if problem is not None:
                raise ValueError(problem) from error
            raise

    def _check_eval_mode(self) -> None:
        # A backend that runs the tower itself runs it in whatever mode it is in: in training mode a BatchNorm
        # (RN50's) normalises by each batch's statistics and updates its running ones, dropout drops at random.
        # Any layer of it: model.eval() then model.visual.layer4.train() (a partial fine-tune) leaves the tower's
        # own flag False.
        visual = cast(torch.nn.Module, self.model.visual)
        if self._backend.copies_weights or not any(module.training for module in submodules(visual)):
            return
        name = next(name for name, module in visual.named_modules() if module.training)
        where = "rm.model.visual" + (f".{name}" if name else "")
        raise ValueError(
            f"{where} is in training mode (model.train() was called), where BatchNorm and dropout layers "
            "compute otherwise: rewards would depend on the other frames in the batch, and BatchNorm's running "
            "statistics would change. Call rm.model.eval() before scoring (and .train() again to train it)."
        )

    def embed(self, frames: FrameInput, *, bottom_up: bool = False) -> torch.Tensor:
        """Unit image embeddings [N, D], float32, on ``device``.

        ``bottom_up=True`` takes frames whose rows are stored last-first (OpenGL's ``glReadPixels``).
        A frame whose tower output cannot be normalised (NaN/inf, all zeros, or a norm under
        :data:`~vlmrm_fast.ops.score.MIN_NORM`) is a ``ValueError`` naming its row, as in ``__call__``.
        """
        bottom_up = _check_bottom_up(bottom_up)
        batch = as_frame_batch(frames)
        out = torch.empty((batch.num_frames, self.embed_dim), dtype=torch.float32, device=self._device)
        with without_autocast(self._device):
            for i in range(0, batch.num_frames, self.max_batch_size):
                raw = self._tower(batch.chunk(i, i + self.max_batch_size, self._device), bottom_up)
                out[i : i + raw.shape[0]] = unit_rows(raw)  # NaN rows where the score op would give NaN
        self._check_finite(out, "frames", quantity="Embeddings")
        return out

    def __call__(self, frames: FrameInput, *, bottom_up: bool = False) -> torch.Tensor:
        """Rewards for frames: float32 [N] (one task) or [N, T] (``tasks=``), on ``device``.

        Args:
            frames: uint8 RGB [N, H, W, 3] (torch on any device, numpy with any strides, or a list of
                [H, W, 3] arrays); float frames in [0, 1] are accepted too. Any H, W: frames are resized
                to the tower's input (render at ``image_size`` to skip that).
            bottom_up: rows stored last-first (OpenGL), flipped inside the preprocessing kernel.
        """
        bottom_up = _check_bottom_up(bottom_up)
        self._check_tasks_current()
        batch = as_frame_batch(frames)
        rewards = torch.empty((batch.num_frames, self._targets.num_tasks), dtype=torch.float32, device=self._device)
        with without_autocast(self._device):
            for i in range(0, batch.num_frames, self.max_batch_size):
                raw = self._tower(batch.chunk(i, i + self.max_batch_size, self._device), bottom_up)
                rewards[i : i + raw.shape[0]] = score_op(raw, self._targets, impl=self._kernels)
        self._check_finite(rewards, "frames")
        return rewards[:, 0] if self._single else rewards

    def score(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Rewards from image embeddings [N, D] (normalised here; unit ones are fine): [N] or [N, T].

        No autograd graph, whichever kernels run (the Triton kernel has no backward)."""
        if not isinstance(embeddings, torch.Tensor):
            also = " (torch.from_numpy(embeddings) makes one of an array)" if isinstance(embeddings, np.ndarray) else ""
            raise TypeError(f"embeddings must be a torch.Tensor [N, D]{also}; got {type(embeddings).__name__}.")
        check_tensor_holds_data(embeddings, "embeddings")
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embed_dim:
            raise ValueError(
                f"embeddings must be [N, {self.embed_dim}] (this model's embedding width); got {tuple(embeddings.shape)}."
            )
        if not embeddings.is_floating_point():
            raise TypeError(f"embeddings must be floating point; got {embeddings.dtype}.")
        self._check_tasks_current()
        with torch.no_grad(), without_autocast(self._device):
            rewards = score_op(embeddings.to(self._device), self._targets, impl=self._kernels)
        self._check_finite(rewards, "embeddings")
        return rewards[:, 0] if self._single else rewards

    def _check_finite(self, rewards: torch.Tensor, what: str, quantity: str = "Rewards") -> None:
        # The reward is NaN exactly when an embedding has a NaN/inf or a norm float32 cannot square
        # (0, under MIN_NORM, or overflowing); checking the small [N, T] output costs one sync instead
        # of a pass over [N, D]. ``embed`` passes its [N, D] embeddings, NaN in the same rows.
        if rewards.numel() == 0 or bool(torch.isfinite(rewards).all()):
            return
        bad = (~torch.isfinite(rewards)).any(dim=1).nonzero().flatten().tolist()
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        cause = (
            "the vision tower produced NaN/inf or all-zero embeddings for them (or norms float32 cannot square)"
            + (" (float16 can overflow: try dtype=torch.bfloat16 or torch.float32)" if self._dtype == torch.float16 else "")
            if what == "frames"
            else "those embedding rows contain NaN/inf, are all zeros, or have norms float32 cannot square "
            "(outside about 1e-12 to 1e19: rescale them)"
        )
        raise ValueError(f"{quantity} are not finite for {len(bad)} of {rewards.shape[0]} {what} (rows {shown}): {cause}.")

    def __repr__(self) -> str:
        quantize = self._backend_request[1].get("quantize")  # int8/fp8: the tower does not compute in `dtype`
        return (
            f"CLIPReward(tasks={self.task_names}, alpha={self._alpha}, device={self._device}, "
            f"dtype={self._dtype}, preprocess={self._spec.mode!r}, kernels={self._kernels!r}, backend={self.backend!r}, "
            + (f"quantize={quantize!r}, " if quantize else "")
            + f"image_size={self.image_size}, max_batch_size={self.max_batch_size})"
        )
