"""Checking frames at the API boundary and handing them to the device in chunks.

Accepted: uint8 RGB frames [N, H, W, 3] as a torch tensor (any device, any strides), a numpy array
(any strides, negative ones included, as ``env.render()`` can give), or a list (any sequence: a
tuple, a deque of recent frames) of [H, W, 3] arrays or tensors of one shape. Float frames are
accepted in [0, 1] (torchvision's convention for float images); 0-255 values must come as uint8.
Anything else is rejected with a message naming the fix.
"""
from __future__ import annotations

import collections
import collections.abc
import math
import os
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import numpy as np
import torch

FrameInput = Union[torch.Tensor, np.ndarray, Sequence[Union[torch.Tensor, np.ndarray]]]

_TEXT = (str, bytes, bytearray, memoryview, collections.UserString)  # sequences, but never of frames
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class FrameBatch:
    """Validated frames: N frames of H x W x 3, uint8 or float in [0, 1], sliceable onto a device."""

    source: Union[torch.Tensor, np.ndarray, List]
    num_frames: int
    height: int
    width: int
    dtype: torch.dtype

    def chunk(self, start: int, stop: int, device: torch.device) -> torch.Tensor:
        """Frames ``start:stop`` as a [n, H, W, 3] tensor on ``device`` (strides kept where possible).

        Host frames bound for a CUDA device take one host copy, into pinned memory (whatever their
        strides or byte order), and an upload that does not block the host.
        """
        part = self.source[start:stop]
        if device.type == "cuda" and _on_host(part):
            return staged_on_host(part, self.dtype, pin=True).to(device, non_blocking=True)
        if isinstance(part, list):
            part = torch.stack([_as_tensor(f) for f in part])
        elif isinstance(part, np.ndarray):
            part = _as_tensor(part)
        return part if part.device == device else part.to(device)


def _on_host(part: Union[torch.Tensor, np.ndarray, List]) -> bool:
    first = part[0] if isinstance(part, list) else part
    return isinstance(first, np.ndarray) or first.device.type == "cpu"


def staged_on_host(part: Union[torch.Tensor, np.ndarray, List], dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """Host frames (a numpy array of any strides and byte order, a CPU tensor of any strides, or a list
    of single frames of either) copied once into a new contiguous ``dtype`` tensor [n, H, W, 3], in
    pinned memory with ``pin`` (what an upload that does not block the host reads from)."""
    shape = (len(part),) + tuple(part[0].shape) if isinstance(part, list) else tuple(part.shape)
    out = torch.empty(shape, dtype=dtype, device="cpu", pin_memory=pin)  # whatever torch's default device
    for item, target in zip(part, out.unbind(0)) if isinstance(part, list) else [(part, out)]:
        if isinstance(item, np.ndarray):
            target.numpy()[...] = item  # numpy reads negative strides and other byte orders itself
        else:
            target.copy_(item)
    return out


def _as_tensor(frames: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
    if isinstance(frames, torch.Tensor):
        return frames
    native = frames.dtype.newbyteorder("=")
    # torch.from_numpy rejects negative strides (numpy keeps them on size-1 axes even in "contiguous"
    # arrays) and non-native byte orders; one host copy makes the array plain.
    if any(st < 0 for st in frames.strides) or frames.dtype != native:
        frames = np.array(frames, dtype=native, order="C", copy=True)
    else:
        frames = np.ascontiguousarray(frames)
    global _read_only_warning_spent
    if frames.flags.writeable or _read_only_warning_spent:
        # Not under catch_warnings: leaving it resets Python's record of the warnings already shown, so
        # every call would show a caller's show-once warnings again. torch warns of a read-only array
        # once a process, so one silenced conversion is enough.
        return torch.from_numpy(frames)
    with warnings.catch_warnings():  # read-only arrays are fine: the tensor is only read
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(frames)
    _read_only_warning_spent = True
    return tensor


_read_only_warning_spent = False  # torch has (silently) given its once-a-process read-only array warning


def _torch_dtype(array: Union[np.ndarray, torch.Tensor]) -> Optional[torch.dtype]:
    """The torch dtype frames will have, or None for an unsupported numpy dtype."""
    if isinstance(array, torch.Tensor):
        return array.dtype
    kind, size = array.dtype.kind, array.dtype.itemsize
    if kind == "u" and size == 1:
        return torch.uint8
    if kind == "f" and size in (2, 4, 8):
        return {2: torch.float16, 4: torch.float32, 8: torch.float64}[size]
    return None


def _dtype_name(array: Union[np.ndarray, torch.Tensor]) -> str:
    return str(array.dtype) if isinstance(array, torch.Tensor) else f"numpy {array.dtype}"


def _check_shape(shape: Sequence[int], what: str, item: bool = False) -> None:
    """Rank and channel checks for a batch [N, H, W, 3], or with ``item`` a list item [H, W, 3]."""
    if item:
        if len(shape) != 3:
            raise ValueError(f"{what} has shape {tuple(shape)}; list items must be single frames [H, W, 3].")
        shape = (1,) + tuple(shape)
    elif len(shape) == 3 and shape[-1] in (1, 2, 3, 4):
        raise ValueError(
            f"{what} has shape {tuple(shape)}: one frame [H, W, C], but a batch [N, H, W, 3] is expected. "
            "Pass frames[None] (numpy or torch) to score a single frame."
        )
    if len(shape) != 4:
        hint = ""
        if len(shape) == 3:  # [N, H, W]
            hint = (" Grayscale frames [N, H, W]? Give them 3 channels: np.repeat(frames[..., None], 3, axis=-1) "
                    "(numpy) or frames[..., None].expand(-1, -1, -1, 3) (torch).")
            if shape[0] == 3:
                hint += (" One frame channels first [3, H, W]? Pass frame.transpose(1, 2, 0)[None] (numpy) or "
                         "frame.permute(1, 2, 0)[None] (torch).")
        raise ValueError(f"{what} must have rank 4, [N, H, W, 3] (RGB, channels last); got shape {tuple(shape)}.{hint}")
    channels = shape[-1]
    if channels == 3:
        return
    if shape[1] == 3:
        if item:
            raise ValueError(
                f"{what} has shape {tuple(shape[1:])}: channels first [3, H, W]. Frames are channels last; "
                "pass frame.permute(1, 2, 0) (torch) or frame.transpose(1, 2, 0) (numpy)."
            )
        raise ValueError(
            f"{what} has shape {tuple(shape)}: channels first [N, 3, H, W]. Frames are channels last; "
            "pass frames.permute(0, 2, 3, 1) (torch) or frames.transpose(0, 2, 3, 1) (numpy)."
        )
    if channels == 4:
        raise ValueError(f"{what} has 4 channels (RGBA?); pass the RGB channels, frames[..., :3].")
    if channels == 1:
        raise ValueError(f"{what} has 1 channel (grayscale?); repeat it to RGB: np.repeat(frames, 3, axis=-1) (numpy) "
                         "or frames.expand(-1, -1, -1, 3) (torch).")
    raise ValueError(f"{what} must have 3 channels (RGB) in the last axis, [N, H, W, 3]; got shape {tuple(shape)}.")


def _is_uint16(dtype: Union[np.dtype, torch.dtype]) -> bool:
    # Either byte order: a big-endian TIFF's ">u2" is not equal to np.uint16.
    return dtype == torch.uint16 or isinstance(dtype, np.dtype) and dtype.kind == "u" and dtype.itemsize == 2


def _check_dtype(frames: Union[np.ndarray, torch.Tensor], what: str) -> torch.dtype:
    dtype = _torch_dtype(frames)
    if dtype == torch.uint8 or dtype in _FLOAT_DTYPES:
        return dtype
    hint = "Convert 0-255 integers with .astype(np.uint8) / .to(torch.uint8)."
    if frames.dtype in (torch.bool, np.bool_):  # as uint8 they would be 0 and 1: black frames
        hint = ("Boolean frames (masks?): scale them to 0-255 first, frames.astype(np.uint8) * 255 (numpy) or "
                "frames.to(torch.uint8) * 255 (torch).")
    elif _is_uint16(frames.dtype):
        # torch has no >> for uint16 on CPU: through int32 first.
        hint = ("16-bit images: scale to 8 bits first, e.g. (frames >> 8).astype(np.uint8) (numpy) or "
                "(frames.to(torch.int32) >> 8).to(torch.uint8) (torch).")
    raise TypeError(f"{what} has dtype {_dtype_name(frames)}; frames must be uint8 (0-255) or float in [0, 1]. {hint}")


def _check_size(height: int, width: int, what: str) -> None:
    if height == 0 or width == 0:
        raise ValueError(f"{what} have zero height or width ({height} x {width}); there is nothing to score.")


OVERSHOOT = 0.1
"""How far outside [0, 1] float frames may lie for the error to suggest clamping (a resize's overshoot) rather
than another scale: bicubic overshoots a step edge by about 7% of its height."""


def _check_float_range(frames: Union[np.ndarray, torch.Tensor], what: str) -> None:
    if isinstance(frames, np.ndarray):
        lo, hi = float(np.min(frames)), float(np.max(frames))
    else:
        lo, hi = frames.amin().item(), frames.amax().item()
    if not (0.0 <= lo and hi <= 1.0):  # also false for NaN
        hint = ""
        if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN (min/max then give NaN) or infinity
            found = "found NaN or infinite values (a frame that failed upstream: check what produced it)"
        else:
            found = f"found values in [{lo}, {hi}]"
            if -OVERSHOOT <= lo and hi <= 1.0 + OVERSHOOT:
                hint = (" Values this close to the range are a filter's overshoot (a bicubic resize, a blur): "
                        "clamp them first, frames.clamp(0, 1) (np.clip(frames, 0, 1) for arrays).")
            elif hi > 1.0:
                hint = " If they are 0-255 values, pass them as uint8."
        raise ValueError(f"Float {what} must lie in [0, 1] (finite); {found}.{hint}")


def check_tensor_holds_data(array: Union[np.ndarray, torch.Tensor], what: str) -> None:
    """Refuse arrays whose values are not all there to read as they are: a masked numpy array (its mask
    would be ignored), a sparse tensor, a tensor on the meta device (shapes only)."""
    if isinstance(array, np.ma.MaskedArray) and np.ma.is_masked(array):
        raise TypeError(f"{what} is a masked array, whose mask would be ignored: pass {what}.filled(0) (masked "
                        f"values as 0) or np.asarray({what}.data).")
    if isinstance(array, torch.Tensor):
        if array.layout != torch.strided:
            raise TypeError(f"{what} is a {array.layout} tensor: pass {what}.to_dense().")
        if array.device.type == "meta":
            raise ValueError(f"{what} is on the meta device, which holds shapes but no values: pass real data.")


def as_frame_batch(frames: FrameInput) -> FrameBatch:
    """Validate ``frames`` and describe them; raises TypeError/ValueError naming the fix."""
    if isinstance(frames, (torch.Tensor, np.ndarray)):
        check_tensor_holds_data(frames, "frames")
        _check_shape(frames.shape, "frames")
        dtype = _check_dtype(frames, "frames")
        n, height, width, _ = frames.shape
        if n > 0:
            _check_size(height, width, "frames")
        if n > 0 and dtype != torch.uint8:
            _check_float_range(frames, "frames")
        return FrameBatch(frames, n, height, width, dtype)
    if isinstance(frames, collections.abc.Sequence) and not isinstance(frames, _TEXT):
        return _list_batch(list(frames))  # a list, a tuple, a deque of recent frames, ...
    raise TypeError(
        f"frames must be a torch.Tensor or numpy array [N, H, W, 3], or a list of [H, W, 3] arrays; "
        f"got {type(frames).__name__}.{_conversion_hint(frames)}"
    )


def _conversion_hint(item) -> str:
    """How to get an array from what was passed instead, where that is clear."""
    if isinstance(item, (str, os.PathLike)):
        return " To score a video or image files, use `vlmrm-fast score PATH`, or read them into arrays first."
    if hasattr(item, "__array_interface__") or hasattr(item, "__array__"):  # PIL images and the like
        return " Convert it with np.asarray(...) first."
    return ""


def _list_batch(frames: List) -> FrameBatch:
    if not frames:
        return FrameBatch(frames, 0, 0, 0, torch.uint8)
    first = frames[0]
    for i, frame in enumerate(frames):
        if not isinstance(frame, (torch.Tensor, np.ndarray)):
            raise TypeError(f"frames[{i}] is a {type(frame).__name__}; list items must be numpy arrays or "
                            f"tensors.{_conversion_hint(frame)}")
        check_tensor_holds_data(frame, f"frames[{i}]")
        _check_shape(frame.shape, f"frames[{i}]", item=True)
        if tuple(frame.shape) != tuple(first.shape):
            raise ValueError(
                f"frames[{i}] has shape {tuple(frame.shape)} but frames[0] has {tuple(first.shape)}: frames in one "
                "call must share shape. Score frames of different sizes in separate calls."
            )
        if isinstance(frame, torch.Tensor) != isinstance(first, torch.Tensor):
            raise TypeError(
                f"frames[{i}] is a {type(frame).__name__} but frames[0] a {type(first).__name__}: one kind per call. "
                "Convert them alike first (torch.from_numpy(array), or tensor.cpu().numpy())."
            )
        dtype = _check_dtype(frame, f"frames[{i}]")
        if dtype != _torch_dtype(first):
            raise ValueError(f"frames[{i}] has dtype {dtype} but frames[0] has {_torch_dtype(first)}: one dtype per call.")
        if isinstance(frame, torch.Tensor) and frame.device != first.device:
            raise ValueError(f"frames[{i}] is on {frame.device} but frames[0] on {first.device}: one device per call.")
        if dtype != torch.uint8:
            _check_float_range(frame, f"frames[{i}]")
    height, width, _ = first.shape
    _check_size(height, width, "frames")
    return FrameBatch(frames, len(frames), height, width, dtype)  # every frame's: checked equal above
