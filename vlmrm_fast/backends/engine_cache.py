"""A disk cache for built TensorRT engines that never trusts a stale or damaged file.

An engine is valid only for the GPU model, TensorRT version and build (CUDA 12 or 13), weights,
precision and batch range it was built for, the recipe that built it (typing, exporter) and, for fp8,
its calibration frames, so all of these form its key. Each file holds a header (the key and a
SHA-256 of the engine bytes) and the engine; a file whose header does not match the key, or whose
bytes do not match the checksum, is rebuilt. Files are written to a temporary name and renamed into
place, so a crash mid-write never leaves half an engine under the real name. Processes that share the
cache (subprocess envs each making their reward model, array jobs) build each engine once: the first
holds a lock on the engine's name while it builds, the others wait for it, then load its engine.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterator, Optional, Tuple, Union

import torch

from vlmrm_fast.atomic import write_atomically
from vlmrm_fast.scratch import ABANDONED_AFTER_S, remove_abandoned, scratch_prefix

_MAGIC = b"VLMRMTRT1\n"
_log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$VLMRM_FAST_CACHE`` or ``~/.cache/vlmrm_fast``, then ``tensorrt/``."""
    root = os.environ.get("VLMRM_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vlmrm_fast")
    return Path(root) / "tensorrt"


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 over the module's structure (its repr: layers, activations, norms' settings) and state
    (names, shapes, dtypes, bytes): changes whenever the weights do, or the code they run through
    (the same weights under GELU and QuickGELU are two towers). Layers the torch backends swapped in (the
    patch embedding as a matmul, MLPs with a GELU epilogue, LayerNorms and QuickGELUs through Triton, the
    fp8 MLPs and blocks) are read as the layers they replaced, from which the engine is built
    (:func:`~vlmrm_fast.backends.base.original_modules`): one tower, one key."""
    from vlmrm_fast.backends.base import original_modules

    with original_modules(module):
        structure = repr(module)
    digest = hashlib.sha256(structure.encode())
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def tensorrt_build() -> str:
    """The installed TensorRT library wheels with their versions ("tensorrt-cu12-libs 10.13.3.9"),
    or "" where TensorRT comes from elsewhere (a system package, a container image)."""
    from importlib import metadata

    found = set()
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name.startswith("tensorrt-cu") and name.endswith("-libs"):
            found.add(f"{name} {dist.version}")
    return ", ".join(sorted(found))


@dataclasses.dataclass(frozen=True)
class EngineKey:
    """Everything a built engine depends on."""

    model: str
    weights: str
    precision: str
    image_size: Tuple[int, int]
    batch_range: Tuple[int, int, int]  # (min, opt, max)
    compute_capability: Tuple[int, int]
    tensorrt_version: str
    device_name: str = ""
    """TensorRT plans are tied to the GPU model: an H100 and an H200 share compute capability 9.0."""
    torch_version: str = ""
    """The ONNX exporter's version, which also settles which of torch's exporters "auto" takes
    (:func:`~vlmrm_fast.backends.onnx_export.export_onnx`): a different graph may build a different engine."""
    recipe: int = 3
    """Bumped whenever vlmrm_fast changes how it builds engines (3: strongly typed from a typed graph;
    2: weakly typed, precision flags and LayerNorm pinned per layer)."""
    exporter: str = "auto"
    """Which of torch's ONNX exporters was asked for (``backend_options={"exporter": ...}``)."""
    calibration: str = ""
    """For fp8 engines, a digest of the calibration frames: they set the activation scales."""
    tensorrt_build: str = ""
    """Which of NVIDIA's wheels holds TensorRT's libraries (:func:`tensorrt_build`): the CUDA 12 and
    CUDA 13 builds report the same ``tensorrt.__version__``."""

    def as_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def filename(self) -> str:
        safe_model = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.model)
        return f"{safe_model}-{self.precision}-{hashlib.sha256(self.as_json().encode()).hexdigest()[:16]}.engine"


class EngineCache:
    """Engines on disk under ``directory``, keyed by :class:`EngineKey`."""

    def __init__(self, directory: Union[str, Path, None] = None) -> None:
        self.directory = Path(directory) if directory is not None else default_cache_dir()

    def path(self, key: EngineKey) -> Path:
        return self.directory / key.filename()

    def load(self, key: EngineKey) -> Optional[bytes]:
        """The cached engine bytes for ``key``, or None when absent, stale or damaged."""
        path = self.path(key)
        try:
            blob = path.read_bytes()
        except OSError:
            return None
        if not blob.startswith(_MAGIC):
            return None
        header_end = blob.find(b"\n", len(_MAGIC))
        if header_end < 0:
            return None
        try:
            header = json.loads(blob[len(_MAGIC) : header_end])
        except ValueError:
            return None
        if not isinstance(header, dict):
            return None
        payload = blob[header_end + 1 :]
        if header.get("key") != json.loads(key.as_json()):
            return None
        if header.get("sha256") != hashlib.sha256(payload).hexdigest():
            return None
        return payload

    def store(self, key: EngineKey, payload: bytes) -> Path:
        """Write atomically (:func:`vlmrm_fast.atomic.write_atomically`)."""
        header = json.dumps({"key": json.loads(key.as_json()), "sha256": hashlib.sha256(payload).hexdigest()})
        return write_atomically(self.path(key), _MAGIC + header.encode() + b"\n" + payload)

    @contextlib.contextmanager
    def build_lock(self, key: EngineKey) -> Iterator[bool]:
        """Held while ``key``'s engine is built and stored, by one process (or thread) at a time:
        an exclusive ``flock`` on ``<engine>.lock`` beside the engine (an empty file, left in place:
        removing it would let a waiting process lock a file no longer under that name). Where no lock
        can be taken (a read-only cache folder, a file system without locks), nothing is held and
        builds go on side by side. Yields whether the lock is held."""
        try:
            import fcntl

            self.directory.mkdir(parents=True, exist_ok=True)
            fd: Optional[int] = os.open(self.path(key).with_name(self.path(key).name + ".lock"),
                                        os.O_RDWR | os.O_CREAT, 0o666)
        except (ImportError, OSError):
            fd = None
        if fd is None:  # yielded outside the handler: the block's own errors must not chain to this one
            yield False
            return
        try:
            held = True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                _log.warning("another process is building the TensorRT engine %s: waiting for it, then loading "
                             "its engine", self.path(key))
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:  # ENOLCK and the like: no locks here
                held = False
            yield held
        finally:
            os.close(fd)  # releases the lock

    def scratch_prefix(self, key: EngineKey) -> str:
        """Name prefix of the folders, in the cache folder, that builds of ``key`` write their ONNX
        graphs to (gigabytes for ViT-bigG-14); it names the building host and process (see
        :meth:`remove_abandoned`)."""
        return scratch_prefix(self._scratch_base(key))

    def _scratch_base(self, key: EngineKey) -> str:
        return f".{key.filename()}.build-"

    def remove_abandoned(self, key: EngineKey) -> None:
        """Remove what killed builds of ``key`` left (SIGKILL, the OOM killer: no clean-up ran): scratch
        folders of this host whose process is gone, and, older than :data:`ABANDONED_AFTER_S`, other
        hosts' folders and half-written engine files. Not by the lock alone: on file systems whose
        ``flock`` is node-local (Lustre ``-o localflock``, BeeGFS by default, NFS ``nolock``) every node
        holds it, and another node's build may be running. Only for the holder of :meth:`build_lock`."""
        import time

        name = key.filename()
        remove_abandoned(self.directory, self._scratch_base(key))
        try:
            entries = list(self.directory.iterdir())
        except OSError:
            return
        now = time.time()
        for entry in entries:
            if entry.name.startswith(f".{name}.") and entry.name.endswith(".tmp") and entry.is_file():
                try:
                    if now - entry.stat().st_mtime > ABANDONED_AFTER_S:
                        entry.unlink(missing_ok=True)  # write_atomically's temporary file
                except OSError:
                    continue
