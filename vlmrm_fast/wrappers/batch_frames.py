"""Where a vector wrapper's frames come from: :class:`~vlmrm_fast.render.BatchRenderer` over its MuJoCo envs
where it can (the frames stay on its device), else the envs' own images, checked; the terminal states swapped
in while rendering. Shared by ``VLMRewardVecEnv`` and ``VLMRewardVectorWrapper``."""
from __future__ import annotations

import inspect
import warnings
from contextlib import ExitStack, contextmanager
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import gymnasium as gym
import numpy as np
import torch

from vlmrm_fast.callers import stacklevel_outside_package
from vlmrm_fast.wrappers.frame_checks import (
    _ONE_SIZE,
    _check_frame,
    _declared_sizes,
    _frame_changing_wrappers,
    _frame_size,
    _mujoco_parts,
    _warn_size,
)
from vlmrm_fast.wrappers.terminal import _MujocoTerminalState

RENDER_SOURCES = ("auto", "batch", "images")


def _import_batch_renderer() -> Any:
    """The GPU batch renderer class (imported lazily: it is optional)."""
    from vlmrm_fast.render import BatchRenderer

    return BatchRenderer


def _new_batch_renderer(envs: Sequence[gym.Env], reward_model: Any) -> Any:
    """A BatchRenderer over ``envs`` (MuJoCo envs), at their render size, writing where the reward model runs."""
    renderer_cls = _import_batch_renderer()
    device = getattr(reward_model, "device", None)
    try:
        accepts_device = "device" in inspect.signature(renderer_cls.from_envs).parameters
    except (TypeError, ValueError):
        accepts_device = False
    if device is not None and accepts_device:
        return renderer_cls.from_envs(list(envs), device=device)
    return renderer_cls.from_envs(list(envs))


def _check_renderer_frames(frames: Any, num_envs: int) -> Tuple[int, int]:
    """``BatchRenderer.render()``'s output must be uint8 [num_envs, H, W, 3]; returns (H, W)."""
    if (
        not isinstance(frames, torch.Tensor)
        or frames.ndim != 4
        or frames.shape[0] != num_envs
        or frames.shape[3] != 3
        or frames.dtype != torch.uint8
    ):
        raise ValueError(
            f"BatchRenderer.render() must return uint8 [{num_envs}, H, W, 3]; got "
            f"{type(frames).__name__} {tuple(getattr(frames, 'shape', ()))} {getattr(frames, 'dtype', '')}."
        )
    return int(frames.shape[1]), int(frames.shape[2])


class _BatchFrames:
    """Frames for a vector wrapper: the :class:`~vlmrm_fast.render.BatchRenderer` while it works, else the
    vector env's own images (named by ``_images_source``), checked, with one warning about their size;
    the MuJoCo terminal states (``_terminal_states``) swapped in while rendering."""

    _images_source = "venv.get_images()"
    renderer: Any = None
    reward_model: Any
    num_envs: int
    _size_checked = False
    _terminal_states: List[Optional[_MujocoTerminalState]]  # one per env, set by the wrapper (None: no state kept)

    def _set_up_frames(
        self, render: str, envs: Optional[Sequence[gym.Env]], vector_kind: str
    ) -> List[Optional[Tuple[Any, Any]]]:
        """Picks the frame source for ``render``; ``envs`` are the envs the vector env steps in this process
        (None for others). Returns each of those envs' (MjModel, MjData), None for non-MuJoCo envs."""
        mujoco_parts = [_mujoco_parts(env) for env in envs] if envs is not None else []
        all_mujoco = bool(mujoco_parts) and all(p is not None for p in mujoco_parts)
        mujoco_envs = list(envs) if envs is not None and all_mujoco else None
        self.renderer = self._pick_renderer(render, mujoco_envs, vector_kind)
        if self.renderer is None:
            self._require_rgb_array()
        return mujoco_parts

    def _pick_renderer(self, render: str, envs: Optional[Sequence[gym.Env]], vector_kind: str) -> Any:
        """The BatchRenderer for ``render`` ("batch", "auto" or "images"), or None to render the images.

        ``envs`` are the vector env's MuJoCo envs when it steps them in this process, else None.
        """
        if render not in RENDER_SOURCES:
            raise ValueError(f"render must be one of {RENDER_SOURCES}; got {render!r}.")
        # The batch renderer draws each env at its own size (a wrapper's render() that resizes is not
        # seen): one batch needs one. The images then decide, at the first step.
        sizes = _declared_sizes(envs) if envs is not None else []
        changing = _frame_changing_wrappers(envs) if envs is not None else []
        if render == "batch":
            if envs is None:
                raise ValueError(
                    f'render="batch" needs a {vector_kind} of MuJoCo envs (it renders their MjData directly); '
                    'use render="images" (or "auto") for other vector envs.'
                )
            if len(sizes) > 1:
                raise ValueError(f"The envs render at different sizes {sizes} (width x height), and one batch "
                                 f"holds one size: {_ONE_SIZE}")
            if changing:
                raise ValueError(
                    f'render="batch" draws each env\'s MuJoCo state directly, as gymnasium\'s MujocoEnv.render() '
                    f"does, past the render() of {changing} (wrappers, or envs with a render() of their own), so the "
                    "rewards would not be of the frames env.render() gives. Use render=\"images\" (\"auto\" does so "
                    "for these envs), or apply what those wrappers do to the frames in your reward function instead."
                )
            return _new_batch_renderer(envs, self.reward_model)
        if render == "auto" and changing and len(sizes) <= 1:  # (envs of other sizes render the images anyway)
            warnings.warn(
                f"{changing} (the envs' wrappers, or the envs) have a render() of their own, which the batch renderer "
                f"would not see: rendering through {self._images_source}.", stacklevel=stacklevel_outside_package(),
            )
            return None
        if render == "auto" and envs is not None and len(sizes) <= 1:
            try:
                return _new_batch_renderer(envs, self.reward_model)
            except ImportError:
                return None  # the optional renderer is not there: images, silently
            except Exception as exc:  # noqa: BLE001 - any failure of the optional fast path
                warnings.warn(f"BatchRenderer could not be built ({exc!r}); rendering through {self._images_source}.",
                              stacklevel=stacklevel_outside_package())
        return None

    @contextmanager
    def _terminal_states_in(self) -> Iterator[np.ndarray]:
        """Inside the block the envs whose episode just ended hold their terminal MuJoCo state (the live
        state comes back after); yields which envs those are ([N] bool)."""
        pending = [s is not None and s.pending for s in self._terminal_states]
        with ExitStack() as stack:
            for state, swap in zip(self._terminal_states, pending):
                if swap and state is not None:
                    stack.enter_context(state.terminal_state())
            yield np.array(pending, dtype=bool)

    @property
    def render_source(self) -> str:
        """Where frames come from now: ``"batch"`` (BatchRenderer) or ``"images"`` (the vector env's images)."""
        return "batch" if self.renderer is not None else "images"

    def _require_rgb_array(self) -> None:
        raise NotImplementedError

    def _batch_frames(self) -> Optional[Tuple[Any, bool]]:
        """The renderer's frames and row order (``bottom_up``); None without a renderer, or when it has just
        failed (then it is closed, with a warning, and frames come from the images from now on)."""
        if self.renderer is None:
            return None
        try:
            frames = self.renderer.render()
            bottom_up = bool(getattr(self.renderer, "bottom_up", False))
        except Exception as exc:  # noqa: BLE001 - fall back to the host path
            warnings.warn(
                f"BatchRenderer.render() failed ({exc!r}); rendering through {self._images_source} from now on."
            )
            self._close_renderer()
            self._require_rgb_array()
            return None
        self._check_size(_check_renderer_frames(frames, self.num_envs), "The BatchRenderer")
        return frames, bottom_up

    def _check_images(self, images: Sequence[Any], what: str) -> None:
        for i, frame in enumerate(images):
            _check_frame(frame, f"{self._images_source}[{i}]")
        sizes = {_frame_size(f) for f in images}
        if len(sizes) > 1:
            raise ValueError(f"The envs render frames of different sizes {sorted(sizes)} (height x width), and one "
                             f"batch holds one size: {_ONE_SIZE}")
        if images:
            self._check_size(_frame_size(images[0]), what)

    def _check_size(self, size: Tuple[int, int], what: str) -> None:
        if not self._size_checked:
            self._size_checked = True
            _warn_size(size, self.reward_model, what)

    def _close_renderer(self) -> None:
        renderer, self.renderer = self.renderer, None
        if renderer is not None:
            try:
                renderer.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
