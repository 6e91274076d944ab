"""Checkpoints: policy, replay buffer, config, RNG and env state, written atomically.

Layout of a run folder::

    RUN_DIR/config.json                     the effective config of the run
    RUN_DIR/checkpoints/step_000000001000/  one complete checkpoint
        model.zip            SB3 ``model.save`` (policy, optimisers, entropy coefficient, counters, last obs)
        replay_buffer.pkl    SB3 ``model.save_replay_buffer``
        state.pt             RNG states (python, numpy, torch, action space), env states, training-loop state
                             (after a stop inside a deferred rollout: its frames so far, scored on resume)
        config.json          the config it was made with
        meta.json            written last: step, the size and SHA-256 of every file above, and a
                             SHA-256 of its own fields
    RUN_DIR/checkpoints/latest              the name of the newest complete checkpoint
    RUN_DIR/checkpoints/damaged-step_*/     checkpoints a resume found damaged, set aside (never deleted)

A checkpoint is written into ``checkpoints/.tmp-*`` and renamed into place only once every file,
``meta.json`` last, has been written and flushed to disk; ``latest`` is then replaced with
``os.replace``. A crash at any point leaves the previous checkpoint and ``latest`` untouched; the
loader also checks ``meta.json`` (present, file sizes) and falls back to the newest complete
checkpoint if ``latest`` is missing or bad. A resume also checks the files' SHA-256 against
``meta.json``, so a checkpoint damaged after it was written (a bad disk, a copy cut short and padded,
a file edited by hand) is reported and passed over for the newest intact one, never loaded.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import random
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Optional, Tuple

import numpy as np

from vlmrm_fast.atomic import fsync_dir as _fsync_dir
from vlmrm_fast.atomic import write_atomically

FORMAT = 2
"""Version of ``meta.json``: 2 records each file's SHA-256 and a SHA-256 of its own fields; 1 (read
still) neither."""
_FORMATS = (1, 2)
FILES = ("model.zip", "replay_buffer.pkl", "state.pt", "config.json")
PREFIX = "step_"


def step_name(step: int) -> str:
    """Folder name of the checkpoint at ``step``."""
    return f"{PREFIX}{int(step):012d}"


def checkpoint_root(run_dir: os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


# --------------------------------------------------------------------------- RNG and env state


def rng_state(model) -> dict:
    """Python, numpy, torch (CPU and CUDA) and the model's action-space RNG states."""
    import torch  # here and below, not at the top: `vlmrm-fast --help` builds the parser without torch

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    space_rng = getattr(model.action_space, "_np_random", None)
    state["action_space"] = None if space_rng is None else space_rng.bit_generator.state
    return state


def set_rng_state(model, state: dict) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("torch_cuda") is not None and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["torch_cuda"])
        except (RuntimeError, IndexError):  # another GPU count: keep the fresh state
            pass
    if state.get("action_space") is not None:
        model.action_space.np_random.bit_generator.state = state["action_space"]


_SCALARS = (bool, int, float, str, np.number, np.bool_)
#: Wall-clock start times (SB3's VecMonitor/Monitor; gymnasium's RecordEpisodeStatistics, whose single-env
#: form names it in the singular, its vector form in the plural): they belong to one process, and restored
#: they would count the time between the stop and the resume (another process's clock, even).
_WALL_CLOCK = ("t_start", "episode_start_time", "episode_start_times")


def _plain_attrs(obj: Any, skip: tuple = ()) -> dict:
    """The object's own scalar and small-array attributes (its counters and accumulators)."""
    out = {}
    skip = tuple(skip) + _WALL_CLOCK + tuple(getattr(obj, "checkpoint_skip", ()))
    for key, value in vars(obj).items():
        if key in skip:
            continue
        if isinstance(value, _SCALARS) or (isinstance(value, np.ndarray) and value.nbytes <= 1 << 20):
            out[key] = value.copy() if isinstance(value, np.ndarray) else value
    return out


def _restore_attrs(obj: Any, attrs: dict) -> None:
    for key, value in attrs.items():
        try:
            setattr(obj, key, value)
        except (AttributeError, TypeError):
            pass


def _mujoco_handles(env) -> Optional[Tuple[Any, Any, Any]]:
    """``(mujoco module, MjModel, MjData)`` of a MuJoCo env, or None."""
    base = env.unwrapped
    model, data = getattr(base, "model", None), getattr(base, "data", None)
    if model is None or data is None:
        return None
    try:
        import mujoco
    except ImportError:  # pragma: no cover
        return None
    if isinstance(model, mujoco.MjModel) and isinstance(data, mujoco.MjData):
        return mujoco, model, data
    return None


def env_state(venv) -> dict:
    """Best-effort state of a DummyVecEnv of gymnasium envs under SB3 VecEnv wrappers.

    Per env: the MuJoCo simulator state (all of ``MjData``, and the integration state of
    ``mj_getState`` as a fallback), the env's ``np_random`` state and the scalar attributes of every
    gymnasium wrapper layer (step counters such as TimeLimit's).
    Per VecEnv wrapper: its scalar and small-array attributes (episode accumulators).
    """
    wrappers = []
    layer = venv
    while hasattr(layer, "venv"):
        wrappers.append(_plain_attrs(layer, skip=("num_envs",)))
        layer = layer.venv
    envs = []
    for env in getattr(layer, "envs", []):
        entry: dict = {"layers": [], "np_random": None, "mujoco": None, "mujoco_data": None}
        e = env
        while True:
            entry["layers"].append(_plain_attrs(e))
            if not hasattr(e, "env"):
                break
            e = e.env
        rng = getattr(env.unwrapped, "_np_random", None)
        if rng is not None:
            entry["np_random"] = rng.bit_generator.state
        handles = _mujoco_handles(env)
        if handles is not None:
            mujoco, m, d = handles
            spec = mujoco.mjtState.mjSTATE_INTEGRATION
            buf = np.empty(mujoco.mj_stateSize(m, spec), dtype=np.float64)
            mujoco.mj_getState(m, d, buf, spec)
            entry["mujoco"] = buf
            # Everything, not only what integration needs: after mj_step the derived quantities (body
            # positions, forces) are still those of the last substep's forward pass, and envs read them
            # before their next step (the humanoid's x-velocity reward reads xipos). mj_forward on the
            # restored integration state would recompute them at the new positions: another reward.
            entry["mujoco_data"] = pickle.dumps(d)
        envs.append(entry)
    return {"wrappers": wrappers, "envs": envs}


def _restore_mjdata(mujoco, m, d, blob: Optional[bytes]) -> bool:
    """Copy a pickled ``MjData`` of the same model into ``d``; False where it cannot be (none saved,
    another MuJoCo version, another model)."""
    if blob is None:
        return False
    try:
        saved = pickle.loads(blob)
        if any(getattr(saved.model, k) != getattr(m, k) for k in ("nq", "nv", "na", "nu", "nbody", "ngeom", "nbuffer")):
            return False
        mujoco.mj_copyData(d, m, saved)  # refuses buffers of another size itself
    except Exception:
        return False
    return True


def set_env_state(venv, state: dict) -> bool:
    """Restore :func:`env_state`; True if every env's simulator state was restored."""
    layer, i = venv, 0
    while hasattr(layer, "venv"):
        if i < len(state["wrappers"]):
            _restore_attrs(layer, state["wrappers"][i])
        layer, i = layer.venv, i + 1
    envs = getattr(layer, "envs", [])
    if len(envs) != len(state["envs"]):
        return False
    complete = True
    for env, entry in zip(envs, state["envs"]):
        e, j = env, 0
        while True:
            if j < len(entry["layers"]):
                _restore_attrs(e, entry["layers"][j])
            if not hasattr(e, "env"):
                break
            e, j = e.env, j + 1
        if entry["np_random"] is not None:
            env.unwrapped.np_random.bit_generator.state = entry["np_random"]
        handles = _mujoco_handles(env)
        if handles is not None and _restore_mjdata(*handles, entry.get("mujoco_data")):
            continue
        if entry["mujoco"] is not None and handles is not None:
            # Integration state only (a checkpoint from another MuJoCo version, say): the physics
            # continues exactly; quantities read before the next step are recomputed at the restored state.
            mujoco, m, d = handles
            spec = mujoco.mjtState.mjSTATE_INTEGRATION
            if mujoco.mj_stateSize(m, spec) != entry["mujoco"].size:
                complete = False
                continue
            mujoco.mj_setState(m, d, entry["mujoco"], spec)
            mujoco.mj_forward(m, d)
        elif handles is not None or entry["mujoco"] is not None:
            complete = False
    return complete


# --------------------------------------------------------------------------- save


def save_checkpoint(run_dir: os.PathLike, model, config_json: str, extra: dict, keep: int = 2) -> Path:
    """Write a complete checkpoint of ``model`` at ``model.num_timesteps``; return its folder.

    ``extra`` (JSON-able or picklable) is stored in ``state.pt`` with the RNG and env states.
    """
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    step = int(model.num_timesteps)
    name = step_name(step)
    tmp = root / f".tmp-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_files(tmp, model, config_json, extra)
        meta = {"format": FORMAT, "step": step, "files": {f: (tmp / f).stat().st_size for f in FILES},
                "sha256": {f: _sha256(tmp / f) for f in FILES}}
        meta["meta_sha256"] = _fields_digest(meta)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        for f in (*FILES, "meta.json"):
            _fsync_file(tmp / f)
        _fsync_dir(tmp)
        final = root / name
        if final.exists():  # same step written twice (e.g. a signal right after a periodic save)
            old = root / f".old-{name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_latest(root, name)
    _prune(root, keep, protect=name)
    return final


def _write_files(folder: Path, model, config_json: str, extra: dict) -> None:
    """The checkpoint's files (a separate function so tests can inject a crash in the middle)."""
    import torch

    (folder / "config.json").write_text(config_json)
    model.save(folder / "model.zip")
    model.save_replay_buffer(folder / "replay_buffer.pkl")
    state = {"rng": rng_state(model), "env": env_state(model.get_env()), "extra": extra}
    torch.save(state, folder / "state.pt")


def _write_latest(root: Path, name: str) -> None:
    write_atomically(root / "latest", (name + "\n").encode())  # which fsyncs root after its rename


def _prune(root: Path, keep: int, protect: str) -> None:
    complete = [p for p in sorted(root.glob(PREFIX + "*")) if is_complete(p)]
    for path in complete[:-keep]:
        if path.name != protect:
            # Renamed first, so that a kill during the deletion leaves a ``.trash-*`` that
            # clean_stale removes, not a half-deleted checkpoint folder that nothing would.
            trash = root / f".trash-{path.name}-{os.getpid()}"
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)


def clean_stale(run_dir: os.PathLike) -> None:
    """Remove the leftovers of interrupted writes and deletions (``.tmp-*``, ``.old-*``, ``.latest*``,
    ``.trash-*``). Call it before looking for the newest checkpoint.

    An ``.old-<name>-*`` whose ``<name>`` is missing is a complete checkpoint caught between the two
    renames of a same-step overwrite: it is put back, not deleted.
    """
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return
    for path in sorted(root.iterdir()):
        if path.name.startswith(".old-"):
            original = root / path.name[len(".old-"):].rsplit("-", 1)[0]
            if not original.exists() and is_complete(path):
                os.rename(path, original)
                continue
        if path.name.startswith((".tmp-", ".old-", ".latest", ".trash-")):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- load


def _sha256(path: Path) -> str:
    """SHA-256 of the file; remembered for the file as it is (size, mtime, inode), so that choosing a
    checkpoint and loading it in one process (``--resume`` reads its config first) reads it once."""
    st = path.stat()
    return _sha256_of(str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


@functools.lru_cache(maxsize=64)
def _sha256_of(path: str, size: int, mtime_ns: int, inode: int) -> str:
    digest = hashlib.sha256()
    block = bytearray(1 << 22)
    view = memoryview(block)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(block):
            digest.update(view[:n])
    return digest.hexdigest()


def _fields_digest(meta: dict) -> str:
    """SHA-256 of meta.json's fields but its own: a byte changed in meta.json (the step, a checksum, a
    key) is found, not taken for the truth or for a checkpoint written before checksums."""
    fields = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def damaged_files(path: Path) -> list[str]:
    """The files of checkpoint ``path`` whose SHA-256 differs from the one ``meta.json`` recorded
    (unreadable ones too); [] for an intact checkpoint, or one written before checksums were kept
    (format 1). Reads every file: seconds for a replay buffer of gigabytes."""
    recorded = read_meta(path).get("sha256") or {}
    damaged = []
    for name, expected in sorted(recorded.items()):
        try:
            if _sha256(path / name) != expected:
                damaged.append(name)
        except OSError:
            damaged.append(name)
    return damaged


def is_complete(path: Path) -> bool:
    """Whether ``path`` is a complete checkpoint: meta.json present and intact (format 2: its fields'
    checksum), every file of its size."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("format") not in _FORMATS:
            return False
        if meta["format"] >= 2 and (meta.get("meta_sha256") != _fields_digest(meta) or "sha256" not in meta):
            return False
        if meta["format"] == 1 and ("sha256" in meta or "meta_sha256" in meta):
            return False  # a format 2 meta.json whose "format" changed: no checkpoint of format 1 has them
        return all(
            (path / f).stat().st_size == size for f, size in meta["files"].items()
        ) and set(meta["files"]) >= set(FILES)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def find_latest(run_dir: os.PathLike, verify: bool = False) -> Optional[Path]:
    """The newest complete checkpoint, else None.

    ``latest`` is a pointer written after each checkpoint; a crash between the two leaves it one
    behind, so the newest complete folder wins over it (names sort by step). With ``verify``, the
    newest one whose files match their checksums (:func:`damaged_files`); each damaged one passed
    over is named in a warning.
    """
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return None
    try:
        name = (root / "latest").read_text().strip()
    except OSError:
        name = ""
    candidates = [p for p in sorted(root.glob(PREFIX + "*"), reverse=True) if is_complete(p)]
    if not candidates:
        return None
    if name and candidates[0].name != name and not is_complete(root / name):
        warnings.warn(f"checkpoint '{name}' named by {root / 'latest'} is incomplete; using '{candidates[0].name}'")
    if not verify:
        return candidates[0]
    for path in candidates:
        damaged = damaged_files(path)
        if not damaged:
            return path
        warnings.warn(f"checkpoint '{path}' is damaged: {', '.join(damaged)} no longer match(es) the checksum "
                      "written with it (a disk fault, or a file changed or cut short since); passing over it")
    return None


def checkpoint_folders(run_dir: os.PathLike) -> list[Path]:
    """Every checkpoint folder of the run, complete or not, oldest first."""
    root = checkpoint_root(run_dir)
    return sorted(root.glob(PREFIX + "*")) if root.is_dir() else []


def set_aside_newer(run_dir: os.PathLike, chosen: Path) -> list[Path]:
    """Rename every checkpoint folder newer than ``chosen`` (damaged or incomplete: a resume passed over
    it) to ``damaged-<name>``, so that the resumed run's pruning and same-step overwrites never delete
    it and no later resume picks it; return the new paths."""
    root = checkpoint_root(run_dir)
    moved = []
    for path in sorted(root.glob(PREFIX + "*")):
        if path.name > chosen.name:
            target = root / f"damaged-{path.name}"
            if target.exists():
                target = root / f"damaged-{path.name}-{uuid.uuid4().hex[:8]}"
            os.rename(path, target)
            moved.append(target)
    if moved:
        _fsync_dir(root)
        _write_latest(root, chosen.name)  # it named one of those
    return moved


def read_meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text())


def load_state(path: Path) -> dict:
    """``state.pt`` of a checkpoint (RNG, env, extra)."""
    import torch

    return torch.load(path / "state.pt", weights_only=False)
