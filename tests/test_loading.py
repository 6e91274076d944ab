"""Model loading: local checkpoints, open_clip tags offline, and clear errors for the rest."""
import time

import numpy as np
import open_clip
import pytest
import torch

from conftest import make_tiny
from vlmrm_fast import CLIPReward, PretrainedWeightsError, create_clip
from vlmrm_fast import models


def test_tiny_config_is_registered_with_open_clip():
    assert "vlmrm-tiny" in open_clip.list_models()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_local_checkpoint_round_trip(tmp_path, suffix):
    model, _ = make_tiny(seed=3)
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        torch.save(model.state_dict(), path)
    frames = np.random.default_rng(0).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    loaded = CLIPReward.from_pretrained("vlmrm-tiny", str(path), goal="a", baseline="b", alpha=0.5,
                                        device="cpu", kernels="torch")
    original = CLIPReward(model, open_clip.get_tokenizer("vlmrm-tiny"), goal="a", baseline="b", alpha=0.5,
                          device="cpu", kernels="torch")
    assert torch.equal(loaded(frames), original(frames))
    # Not the same as fresh random weights: the checkpoint really was read.
    other, _ = make_tiny(seed=4)
    assert not torch.equal(next(other.parameters()), next(loaded.model.parameters()))


def test_checkpoint_of_another_architecture(tmp_path):
    path = tmp_path / "vitb32.pt"
    torch.save({"visual.conv1.weight": torch.zeros(3)}, path)
    with pytest.raises(PretrainedWeightsError, match="does not load into vlmrm-tiny"):
        create_clip("vlmrm-tiny", str(path))


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint file.*laion2b_s34b_b79k"):
        create_clip("ViT-B-32", str(tmp_path / "missing.pt"))


def test_unknown_model_name_suggests_close_ones():
    with pytest.raises(ValueError, match="Unknown model 'ViT-B-23'.*ViT-B-32"):
        CLIPReward.from_pretrained("ViT-B-23", None, goal="a")


def test_unknown_tag_lists_the_known_ones():
    with pytest.raises(ValueError, match="neither an open_clip pretrained tag.*laion2b_s34b_b79k"):
        create_clip("ViT-B-32", "laion9b")


def test_offline_tag_fails_fast_and_names_the_local_file_route(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    start = time.monotonic()
    with pytest.raises(PretrainedWeightsError, match=r"unreachable.*pretrained='/path/to/"):
        create_clip("ViT-B-32", "laion2b_s34b_b79k", cache_dir=str(tmp_path))
    # open_clip's own path retries for about a minute; the cache-only lookup answers at once.
    assert time.monotonic() - start < 20


def test_hf_hub_offline_env_counts_as_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert models._hub_reachable() is False


def test_random_weights_warn():
    with pytest.warns(UserWarning, match="random weights"):
        create_clip("vlmrm-tiny", None)
