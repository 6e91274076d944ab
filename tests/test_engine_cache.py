"""The TensorRT engine cache: keys, atomic writes, and refusal of stale or damaged files (no TensorRT needed)."""
import dataclasses
import os

import pytest
import torch

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
     ("calibration", "ef" * 32)],
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


def test_weights_digest_follows_the_architecture_too():
    # The same weights under GELU and under QuickGELU are two towers: never one cached engine.
    import open_clip

    torch.manual_seed(0)
    gelu = open_clip.create_model("vlmrm-tiny").visual
    torch.manual_seed(0)
    quick = open_clip.create_model("vlmrm-tiny", force_quick_gelu=True).visual
    assert all(torch.equal(a, b) for a, b in zip(gelu.state_dict().values(), quick.state_dict().values()))
    assert weights_digest(gelu) != weights_digest(quick)

