"""The TensorRT engine cache: keys, atomic writes, refusal of stale or damaged files, and when a
built engine is cached (no TensorRT needed)."""
import dataclasses
import os
import re
import types

import pytest
import torch

from vlmrm_fast.backends.base import BackendError
from vlmrm_fast.backends.engine_cache import EngineCache, EngineKey, weights_digest

KEY = EngineKey(model="ViT-B-32", weights="ab" * 32, precision="bf16", image_size=(224, 224),
                batch_range=(1, 128, 256), compute_capability=(9, 0), tensorrt_version="10.8.0",
                device_name="NVIDIA H200", torch_version="2.11.0", recipe=1)


def test_round_trip(tmp_path):
    cache = EngineCache(tmp_path)
    assert cache.load(KEY) is None
    path = cache.store(KEY, b"engine bytes")
    assert path.parent == tmp_path and cache.load(KEY) == b"engine bytes"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


@pytest.mark.parametrize(
    "field,value",
    [("compute_capability", (8, 0)), ("tensorrt_version", "10.9.0"), ("precision", "fp16"),
     ("batch_range", (1, 64, 128)), ("weights", "cd" * 32), ("image_size", (336, 336)),
     ("device_name", "NVIDIA H100 80GB HBM3"), ("torch_version", "2.12.0"), ("recipe", 2),
     ("calibration", "ef" * 32), ("tensorrt_build", "tensorrt-cu13-libs 10.13.3.9"), ("exporter", "dynamo")],
)
def test_every_key_field_changes_the_file(tmp_path, field, value):
    cache = EngineCache(tmp_path)
    cache.store(KEY, b"old")
    other = dataclasses.replace(KEY, **{field: value})
    assert cache.path(other) != cache.path(KEY) and cache.load(other) is None


def test_a_file_under_the_right_name_but_another_key_is_refused(tmp_path):
    cache = EngineCache(tmp_path)
    other = dataclasses.replace(KEY, tensorrt_version="9.3")
    cache.store(other, b"stale")
    cache.path(other).rename(cache.path(KEY))  # e.g. copied between machines by hand
    assert cache.load(KEY) is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty", "header-not-a-dict"])
def test_damaged_files_are_refused(tmp_path, damage):
    cache = EngineCache(tmp_path)
    path = cache.store(KEY, bytes(range(256)) * 10)
    blob = path.read_bytes()
    blob = {
        "truncate": blob[:-100],
        "flip": blob[:-1] + bytes([blob[-1] ^ 1]),
        "garbage": b"not an engine",
        "empty": b"",
        "header-not-a-dict": b"VLMRMTRT1\n[1, 2]\n" + blob.split(b"\n", 2)[2],
    }[damage]
    path.write_bytes(blob)
    assert cache.load(KEY) is None


def test_weights_digest_follows_the_weights():
    layer = torch.nn.Linear(4, 3).to(torch.bfloat16)
    before = weights_digest(layer)
    assert weights_digest(layer) == before
    with torch.no_grad():
        layer.weight[0, 0] += 1
    assert weights_digest(layer) != before


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="tells files from folders by /proc/self/fd (Linux)")
def test_atomic_write_flushes_the_file_then_its_folder(tmp_path, monkeypatch):
    # The data before the rename, the folder entry after it: both must reach the disk.
    from vlmrm_fast import atomic

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}"))),
                                                        real_fsync(fd))[1])
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (events.append(("replace",)), real_replace(a, b))[1])
    atomic.write_atomically(tmp_path / "engine.plan", b"bytes")
    assert events == [("fsync", False), ("replace",), ("fsync", True)]
    assert (tmp_path / "engine.plan").read_bytes() == b"bytes"


def test_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    from vlmrm_fast import atomic

    target = tmp_path / "engine.plan"
    atomic.write_atomically(target, b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic.write_atomically(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["engine.plan"]  # the temporary file is gone


def test_a_full_disk_names_the_file_being_written(tmp_path, monkeypatch):
    # bench on a full disk ended with "error: [Errno 28] No space left on device", naming no file.
    import errno
    from pathlib import Path

    from vlmrm_fast import atomic

    def full(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", full)
    target = tmp_path / "bench.json"
    with pytest.raises(OSError, match=rf"No space left on device: '{re.escape(str(target))}'") as error:
        atomic.write_atomically(target, b"{}")
    assert error.value.errno == errno.ENOSPC and list(tmp_path.iterdir()) == []


def test_weights_digest_follows_the_architecture_too():
    # The same weights under GELU and under QuickGELU are two towers: never one cached engine.
    import open_clip

    torch.manual_seed(0)
    gelu = open_clip.create_model("vlmrm-tiny").visual
    torch.manual_seed(0)
    quick = open_clip.create_model("vlmrm-tiny", force_quick_gelu=True).visual
    assert all(torch.equal(a, b) for a, b in zip(gelu.state_dict().values(), quick.state_dict().values()))
    assert weights_digest(gelu) != weights_digest(quick)


def test_weights_digest_is_the_same_after_a_cuda_reward_ran_the_patch_embedding_as_a_matmul():
    # backend='torch' or 'compile' on CUDA swaps visual.conv1 for a PatchMatmulConv2d in place (same
    # weights, same state_dict); the engine is built from the convolution (export folds it back), so a
    # tensorrt reward on that model must find the engine a fresh load of the model cached.
    import open_clip

    from vlmrm_fast.backends.patch_embed import use_patch_matmul

    torch.manual_seed(0)
    visual = open_clip.create_model("vlmrm-tiny").visual
    before = weights_digest(visual)
    assert use_patch_matmul(visual)
    assert weights_digest(visual) == before
    assert type(visual.conv1).__name__ == "PatchMatmulConv2d"  # left as it was


# ---- loading or building an engine (TensorRT's runtime stood in for: no TensorRT needed) ----------

FAKE_TRT = types.SimpleNamespace(float16="float16", bfloat16="bfloat16", float32="float32",
                                 TensorIOMode=types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT"))


class FakeEngine:
    """What engine_io_problem reads of a deserialized ICudaEngine: its named I/O tensors."""

    def __init__(self, tensors, origin=b""):
        self.tensors, self.origin = tensors, origin  # name -> (mode, dtype, shape)
        self.num_io_tensors = len(tensors)

    def get_tensor_name(self, i):
        return list(self.tensors)[i]

    def get_tensor_mode(self, name):
        return self.tensors[name][0]

    def get_tensor_dtype(self, name):
        return self.tensors[name][1]

    def get_tensor_shape(self, name):
        return self.tensors[name][2]


def tower_tensors(pixels="bfloat16", embeddings="float32"):
    return {"pixels": ("INPUT", pixels, (-1, 3, 224, 224)), "embeddings": ("OUTPUT", embeddings, (-1, 512))}


@pytest.mark.parametrize(
    "tensors,precision,problem",
    [(tower_tensors(), "bf16", None), (tower_tensors(), "fp8-bf16", None),
     (tower_tensors("float16"), "fp16", None), (tower_tensors("float16"), "fp8-fp16", None),
     (tower_tensors("float32"), "fp32", None),
     (tower_tensors(), "fp16", "'pixels' is INPUT bfloat16 of rank 4, not INPUT float16"),
     (tower_tensors(embeddings="bfloat16"), "bf16", "'embeddings' is OUTPUT bfloat16"),
     ({**tower_tensors(), "pixels": ("INPUT", "bfloat16", (-1, 224, 224))}, "bf16", "of rank 3, not"),
     ({**tower_tensors(), "pixels": ("OUTPUT", "bfloat16", (-1, 3, 224, 224))}, "bf16", "'pixels' is OUTPUT"),
     ({"frames": tower_tensors()["pixels"], "embeddings": tower_tensors()["embeddings"]}, "bf16",
      r"tensors \['frames', 'embeddings'\]"),
     ({**tower_tensors(), "extra": ("OUTPUT", "float32", (-1,))}, "bf16", "tensors")],
)
def test_engine_io_check(tensors, precision, problem):
    # The backend hands TensorRT raw pointers: an engine with other tensors or types would read the
    # pixels' bytes as another dtype, silently.
    from vlmrm_fast.backends.tensorrt import engine_io_problem

    found = engine_io_problem(FAKE_TRT, FakeEngine(tensors), precision)
    if problem is None:
        assert found is None
    else:
        assert found is not None and re.search(problem, found), found


class Runtime:
    """deserialize_cuda_engine: None for bytes TensorRT would refuse, else an engine with the tensors given."""

    def __init__(self, engines):
        self.engines = engines  # payload -> tensors, or None

    def deserialize(self, payload):
        tensors = self.engines.get(payload)
        return None if tensors is None else FakeEngine(tensors, payload)


def load_or_build(cache, runtime, built=None):
    from vlmrm_fast.backends.tensorrt import engine_io_problem, load_or_build_engine

    builds = []

    def build():
        builds.append(built)
        if built is None:
            raise AssertionError("built although the cache held a good engine")
        return built

    engine = load_or_build_engine(cache, KEY, runtime.deserialize, build,
                                  lambda engine: engine_io_problem(FAKE_TRT, engine, KEY.precision))
    return engine, builds


def test_a_good_cached_engine_is_loaded_not_rebuilt(tmp_path):
    cache = EngineCache(tmp_path)
    cache.store(KEY, b"good")
    engine, builds = load_or_build(cache, Runtime({b"good": tower_tensors()}))
    assert engine.origin == b"good" and not builds


@pytest.mark.parametrize("cached", [b"refused by this TensorRT", b"another tower's"])
def test_a_cached_engine_that_does_not_load_or_fit_is_rebuilt_and_replaced(tmp_path, cached):
    cache = EngineCache(tmp_path)
    cache.store(KEY, cached)
    runtime = Runtime({b"another tower's": tower_tensors("float16"), b"fresh": tower_tensors()})
    engine, builds = load_or_build(cache, runtime, built=b"fresh")
    assert engine.origin == b"fresh" and builds == [b"fresh"]
    assert cache.load(KEY) == b"fresh"


@pytest.mark.parametrize("tensors,error", [(None, "cannot deserialize"),
                                           (tower_tensors(embeddings="float16"), "not the tower's")])
def test_a_built_engine_that_does_not_load_or_fit_is_never_cached(tmp_path, tensors, error):
    # Cached, it would be read, hashed and rebuilt at every start.
    cache = EngineCache(tmp_path)
    with pytest.raises(BackendError, match=error):
        load_or_build(cache, Runtime({b"bad": tensors}), built=b"bad")
    assert cache.load(KEY) is None
    assert [p.name for p in tmp_path.iterdir()] == [cache.path(KEY).name + ".lock"]  # the build's empty lock file


def test_a_built_engine_survives_a_cache_it_cannot_write(tmp_path, monkeypatch):
    cache = EngineCache(tmp_path)

    def read_only(key, payload):
        raise PermissionError(13, "Permission denied", str(cache.path(key)))

    monkeypatch.setattr(cache, "store", read_only)
    with pytest.warns(UserWarning, match="not cached.*Permission denied"):
        engine, _ = load_or_build(cache, Runtime({b"fresh": tower_tensors()}), built=b"fresh")
    assert engine.origin == b"fresh"


def test_a_cache_folder_that_cannot_be_made_holds_no_lock_and_still_builds(tmp_path):
    # No lock file can be opened (the cache path runs through a file here; a read-only folder on a cluster):
    # the build goes on unlocked and unstored, rather than failing the reward model's construction.
    (tmp_path / "a-file").write_text("")
    cache = EngineCache(tmp_path / "a-file" / "engines")
    with cache.build_lock(KEY) as held:
        assert held is False
    with pytest.warns(UserWarning, match="not cached"):
        engine, builds = load_or_build(cache, Runtime({b"fresh": tower_tensors()}), built=b"fresh")
    assert engine.origin == b"fresh" and builds == [b"fresh"]


def test_the_key_names_tensorrts_cuda_build(monkeypatch):
    # The CUDA 12 and 13 wheels report the same tensorrt.__version__.
    import importlib.metadata

    from vlmrm_fast.backends.engine_cache import tensorrt_build

    def dists(*names):
        return lambda: [types.SimpleNamespace(metadata={"Name": n}, version="10.13.3.9") for n in names]

    monkeypatch.setattr(importlib.metadata, "distributions", dists("numpy", "tensorrt_cu12_libs", "tensorrt-cu12-bindings"))
    assert tensorrt_build() == "tensorrt-cu12-libs 10.13.3.9"
    monkeypatch.setattr(importlib.metadata, "distributions", dists("tensorrt-cu13-libs", "tensorrt"))
    assert tensorrt_build() == "tensorrt-cu13-libs 10.13.3.9"
    monkeypatch.setattr(importlib.metadata, "distributions", dists("numpy"))
    assert tensorrt_build() == ""  # a system or container install


def test_engine_builds_write_their_graphs_in_the_cache_folder(tmp_path):
    # Gigabytes of ONNX for ViT-bigG-14: not the system's temporary folder (often a small tmpfs),
    # unless the cache folder cannot be made.
    from vlmrm_fast.backends.tensorrt import scratch_parent

    assert scratch_parent(tmp_path / "cache" / "tensorrt") == tmp_path / "cache" / "tensorrt"
    (tmp_path / "file").write_bytes(b"")
    assert scratch_parent(tmp_path / "file" / "tensorrt") is None


def test_default_cache_folder_follows_the_variable_or_the_home_folder(tmp_path, monkeypatch):
    from vlmrm_fast.backends.engine_cache import default_cache_dir

    monkeypatch.setenv("VLMRM_FAST_CACHE", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache" / "tensorrt"
    assert EngineCache().directory == tmp_path / "cache" / "tensorrt"
    monkeypatch.delenv("VLMRM_FAST_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "vlmrm_fast" / "tensorrt"


def test_weights_digest_follows_dtype_and_shape_of_equal_bytes():
    # Zero weights have the same bytes in bfloat16 and float16, and the same repr: the dtype (and the
    # shape of a buffer, which the repr does not show) must still tell the towers apart.
    layer = torch.nn.Linear(4, 3)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    assert weights_digest(layer.to(torch.bfloat16)) != weights_digest(layer.to(torch.float16))
    a, b = torch.nn.Module(), torch.nn.Module()
    a.register_buffer("table", torch.zeros(2, 6))
    b.register_buffer("table", torch.zeros(3, 4))
    assert weights_digest(a) != weights_digest(b)


def test_a_model_name_with_slashes_stays_in_the_cache_folder(tmp_path):
    # open_clip's hf-hub names hold "/": the file must still sit in the cache folder itself.
    cache = EngineCache(tmp_path)
    key = dataclasses.replace(KEY, model="hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    path = cache.store(key, b"engine")
    assert path.parent == tmp_path and "/" not in path.name and cache.load(key) == b"engine"


def test_a_file_of_another_format_version_is_refused(tmp_path):
    # A later format (another magic line) is refused, even where its header would parse.
    cache = EngineCache(tmp_path)
    path = cache.store(KEY, b"engine bytes")
    blob = path.read_bytes()
    assert blob.startswith(b"VLMRMTRT1\n")
    path.write_bytes(b"VLMRMTRT2\n" + blob[len(b"VLMRMTRT1\n"):])
    assert cache.load(KEY) is None


def test_an_unreadable_cache_entry_is_a_miss(tmp_path):
    cache = EngineCache(tmp_path)
    cache.path(KEY).mkdir()  # something that is not a readable file under the engine's name
    assert cache.load(KEY) is None


# ---- vlmrm_fast.atomic.write_atomically (what the engine cache writes with) ----------------------------


def test_atomic_write_gives_the_permissions_of_a_plain_open(tmp_path):
    from vlmrm_fast import atomic

    old = os.umask(0o022)
    try:
        atomic.write_atomically(tmp_path / "engine.plan", b"bytes")
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    assert (tmp_path / "engine.plan").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777 == 0o644


def test_interrupted_atomic_write_leaves_no_temporary(tmp_path, monkeypatch):
    from vlmrm_fast import atomic

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic.write_atomically(tmp_path / "engine.plan", b"new")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_makes_missing_folders(tmp_path):
    from vlmrm_fast import atomic

    target = tmp_path / "a" / "b" / "engine.plan"
    assert atomic.write_atomically(target, b"bytes") == target and target.read_bytes() == b"bytes"


def test_atomic_write_stages_in_the_target_folder_and_fsyncs_every_byte(tmp_path, monkeypatch):
    # The temporary file sits beside the target (a rename across file systems is no rename), and holds
    # all of the data when it is flushed to disk (not some of it left in Python's buffer).
    from vlmrm_fast import atomic

    sizes, sources = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (sizes.append(os.fstat(fd).st_size), real_fsync(fd))[1])
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (sources.append(a), real_replace(a, b))[1])
    data = b"x" * 1000  # under the 8 KiB buffer: all of it buffered until flushed
    atomic.write_atomically(tmp_path / "engine.plan", data)
    assert sizes[0] == len(data)
    assert [os.path.dirname(s) for s in sources] == [str(tmp_path)]



@pytest.mark.parametrize("target_exists", [True, False], ids=["to-a-file", "to-a-new-file"])
def test_atomic_write_writes_through_a_symbolic_link(tmp_path, target_exists):
    # scores.csv -> data/run-7.csv: the file the link leads to gets the data (staged beside it), as a plain open
    # writes; the rename went onto the link, replacing it and leaving its target as it was.
    from vlmrm_fast import atomic

    target = tmp_path / "data" / "run-7.csv"
    if target_exists:
        target.parent.mkdir()
        target.write_bytes(b"old")
    link = tmp_path / "scores.csv"
    link.symlink_to(target)
    assert atomic.write_atomically(link, b"new") == link
    assert link.is_symlink() and os.readlink(link) == str(target) and target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "scores.csv"]  # no temporary left beside the link
    assert [p.name for p in target.parent.iterdir()] == ["run-7.csv"]
    assert atomic.destination_of(tmp_path / "plain.csv") == tmp_path / "plain.csv"


def test_atomic_write_refuses_a_loop_of_links(tmp_path):
    # realpath leaves a loop unresolved: the rename replaced the link with a file, where a plain open fails.
    import errno

    from vlmrm_fast import atomic

    (tmp_path / "a.csv").symlink_to("b.csv")
    (tmp_path / "b.csv").symlink_to("a.csv")
    with pytest.raises(OSError) as raised:
        atomic.write_atomically(tmp_path / "a.csv", b"x")
    assert raised.value.errno == errno.ELOOP and (tmp_path / "a.csv").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "b.csv"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open descriptors in /proc/self/fd (Linux)")
def test_atomic_write_closes_what_it_opens(tmp_path):
    from vlmrm_fast import atomic

    atomic.write_atomically(tmp_path / "warm-up", b"")
    before = len(os.listdir("/proc/self/fd"))
    for i in range(5):
        atomic.write_atomically(tmp_path / f"engine{i}.plan", b"bytes")
    assert len(os.listdir("/proc/self/fd")) == before


# ---- behaviours a mutation audit found untested ---------------------------------------------------


def test_storing_an_engine_is_atomic_and_makes_the_cache_folder(tmp_path, monkeypatch):
    # The cache's own writes go through write_atomically: a first run makes ~/.cache/vlmrm_fast/tensorrt,
    # and a write that fails (disk full, a crash before the rename) leaves the previous engine whole.
    from vlmrm_fast import atomic

    cache = EngineCache(tmp_path / "fresh" / "tensorrt")
    cache.store(KEY, b"old engine")
    assert cache.load(KEY) == b"old engine"

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        cache.store(KEY, b"new engine, never complete")
    assert cache.load(KEY) == b"old engine"
    assert [p.name for p in cache.directory.iterdir()] == [cache.path(KEY).name]


def test_processes_sharing_the_cache_build_an_engine_once(tmp_path):
    # Subprocess envs each making their reward model (as the backend's pickling error advises), or an
    # array job's tasks, start on an empty cache at once: one builds (ViT-bigG-14: minutes, 8 GiB of
    # builder workspace and a float32 copy of the tower on the GPU), the others wait and load its engine.
    import threading
    import time

    from vlmrm_fast.backends.tensorrt import engine_io_problem, load_or_build_engine

    runtime = Runtime({b"fresh": tower_tensors()})
    builds, engines, errors = [], [], []
    start = threading.Barrier(3)

    def build():
        builds.append(threading.get_ident())
        time.sleep(0.5)  # long enough for the others to find the cache empty
        return b"fresh"

    def worker():
        try:
            cache = EngineCache(tmp_path)  # each its own, as in separate processes
            start.wait()
            engines.append(load_or_build_engine(cache, KEY, runtime.deserialize, build,
                                                lambda engine: engine_io_problem(FAKE_TRT, engine, KEY.precision)))
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(builds) == 1 and [e.origin for e in engines] == [b"fresh"] * 3


def test_a_build_removes_what_a_killed_build_of_its_engine_left(tmp_path):
    # SIGKILL or the OOM killer mid-build runs no clean-up: gigabytes of ONNX (ViT-bigG-14) in a scratch
    # folder, or half an engine in write_atomically's temporary file, would stay in the cache for good.
    import os
    import subprocess

    from vlmrm_fast.scratch import this_host as _this_host

    cache = EngineCache(tmp_path)
    other = dataclasses.replace(KEY, precision="fp16")
    dead = subprocess.Popen(["true"])
    dead.wait()
    base = f".{cache.path(KEY).name}.build-"
    host = _this_host()
    scratch = tmp_path / f"{base}{host}-{dead.pid}-abc123"
    (scratch / "export").mkdir(parents=True)
    (scratch / "export" / "tower.onnx").write_bytes(b"graph")
    running = tmp_path / f"{base}{host}-{os.getpid()}-live"  # this very process: alive
    running.mkdir()
    elsewhere = tmp_path / f"{base}node17-{dead.pid}-other"  # another node's build, maybe running
    elsewhere.mkdir()
    half_written = tmp_path / f".{cache.path(KEY).name}.x1y2.tmp"
    half_written.write_bytes(b"half an engine")
    os.utime(half_written, (0, 0))  # long ago
    being_written = tmp_path / f".{cache.path(KEY).name}.n0w1.tmp"  # maybe another node's store, under way
    being_written.write_bytes(b"an engine being written")
    others = [tmp_path / (cache.scratch_prefix(other) + "def456"), tmp_path / f".{cache.path(other).name}.z9.tmp"]
    others[0].mkdir()
    others[1].write_bytes(b"another engine being written")
    engine, builds = load_or_build(cache, Runtime({b"fresh": tower_tensors()}), built=b"fresh")
    assert builds == [b"fresh"] and not scratch.exists() and not half_written.exists()
    assert running.exists() and elsewhere.exists() and being_written.exists()
    assert all(p.exists() for p in others)  # another key's build may be running beside this one


def test_a_cache_that_cannot_lock_still_builds_and_removes_nothing(tmp_path, monkeypatch):
    # A file system without locks: builds go on side by side, so none may remove another's scratch folder.
    import fcntl

    def no_locks(fd, operation):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    cache = EngineCache(tmp_path)
    running = tmp_path / (cache.scratch_prefix(KEY) + "abc123")
    running.mkdir()
    engine, builds = load_or_build(cache, Runtime({b"fresh": tower_tensors()}), built=b"fresh")
    assert engine.origin == b"fresh" and running.exists()


# ---- vlmrm_fast.scratch and vlmrm_fast.atomic: what a mutation audit found unguarded --------------------


def test_a_scratch_folder_of_another_host_is_abandoned_only_after_a_day():
    # Another host's process cannot be asked whether it runs: its folder stays for ABANDONED_AFTER_S (longer
    # than any build), then goes; this host's folder of a live process stays.
    from vlmrm_fast.scratch import is_abandoned, this_host

    base = ".tower.onnx.export-"
    assert not is_abandoned(f"{base}node17-123-abc", base, age_s=2 * 3600.0)  # a long build elsewhere
    assert is_abandoned(f"{base}node17-123-abc", base, age_s=25 * 3600.0)
    assert not is_abandoned(f"{base}{this_host()}-{os.getpid()}-abc", base, age_s=3600.0)  # this process: alive


def test_a_process_of_another_user_counts_as_alive(monkeypatch):
    # os.kill(pid, 0) on another user's process raises PermissionError: it runs, and its folder must stay.
    from vlmrm_fast import scratch

    def not_permitted(pid, signal):
        raise PermissionError(1, "Operation not permitted")

    def gone(pid, signal):
        raise ProcessLookupError(3, "No such process")

    monkeypatch.setattr(scratch.os, "kill", not_permitted)
    assert scratch.alive(1)
    monkeypatch.setattr(scratch.os, "kill", gone)
    assert not scratch.alive(1)


def test_the_host_of_a_scratch_folder_names_its_pid_namespace():
    # Containers sharing a host name (--net=host) have their own process ids: a pid is only asked about by
    # a process of the same PID namespace.
    import socket

    from vlmrm_fast.scratch import this_host

    if not os.path.exists("/proc/self/ns/pid"):
        pytest.skip("no PID namespaces here")
    assert this_host() == f"{socket.gethostname()}@{os.stat('/proc/self/ns/pid').st_ino}"


def test_atomic_write_follows_a_umask_other_than_the_usual_one(tmp_path):
    # The mode is read from the umask in force, not assumed to be 0o644.
    from vlmrm_fast import atomic

    old = os.umask(0o027)
    try:
        atomic.write_atomically(tmp_path / "engine.plan", b"bytes")
    finally:
        os.umask(old)
    assert (tmp_path / "engine.plan").stat().st_mode & 0o777 == 0o640
