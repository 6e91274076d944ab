"""Model loading: local checkpoints, open_clip tags offline, and clear errors for the rest."""
import contextlib
import re
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from conftest import make_tiny
from vlmrm_fast import CLIPReward, PretrainedWeightsError, create_clip
from vlmrm_fast import models
from vlmrm_fast.ops._triton import triton_runs_on

needs_local_dir = pytest.mark.skipif(int(open_clip.__version__.split(".")[0]) < 3, reason="open_clip < 3 has no local-dir: models")


def test_tiny_config_is_registered_with_open_clip():
    assert "vlmrm-tiny" in open_clip.list_models()


def test_loading_leaves_the_root_logger_unconfigured():
    # open_clip logs through the root logger, whose first use configures it (basicConfig): a user's
    # own logging.basicConfig afterwards would then do nothing. A fresh interpreter: pytest configures
    # the root logger itself.
    script = textwrap.dedent("""
        import logging, warnings
        import numpy as np
        warnings.simplefilter("ignore")
        from vlmrm_fast import CLIPReward
        rm = CLIPReward.from_pretrained("vlmrm-tiny", None, goal="a cat", baseline="an animal", device="cpu")
        rm(np.zeros((2, 40, 40, 3), np.uint8))
        rm.set_tasks(goal="a dog")
        print(logging.getLogger().handlers)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


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


def test_checkpoint_of_another_vit_names_its_shape_and_the_configs_it_fits(tmp_path):
    # A ViT-S-32 or ViT-B-32 state_dict passed with the wrong model name: the strict load's list of unexpected
    # keys (cut off at 600 characters) said nothing of which model the file is for.
    shapes = {k: v.shape for k, v in open_clip.create_model("ViT-S-32").state_dict().items()}
    torch.save({k: torch.zeros(()).expand(shape) for k, shape in shapes.items()}, tmp_path / "s32.pt")  # bytes, not MB
    with pytest.raises(PretrainedWeightsError) as error:
        create_clip("vlmrm-tiny", str(tmp_path / "s32.pt"))
    assert str(error.value) == (
        f"The checkpoint {str(tmp_path / 's32.pt')!r} does not load into vlmrm-tiny: it holds a vision tower of width "
        "384, 12 layers, 32 px patches, 224 px input, 384-d embeddings, and vlmrm-tiny's has width 64, 2 layers, 32 "
        "px patches, 224 px input, 32-d embeddings. It fits ViT-S-32: pass that model name.")
    del shapes["token_embedding.weight"]  # another text tower: no config named
    torch.save({k: torch.zeros(()).expand(shape) for k, shape in shapes.items()}, tmp_path / "s32.pt")
    with pytest.raises(PretrainedWeightsError, match="No open_clip config has that shape .*: pass the model it was"):
        create_clip("vlmrm-tiny", str(tmp_path / "s32.pt"))


def test_the_hub_is_reached_through_the_proxy_huggingface_hub_would_use(monkeypatch):
    # Cluster nodes often reach the internet only through HTTPS_PROXY: probing the hub itself there said
    # "unreachable" and refused every download that huggingface_hub would have made through the proxy.
    import socket

    from vlmrm_fast.models import _hub_reachable

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "https_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # resolves nowhere: only the proxy answers
    with socket.create_server(("127.0.0.1", 0)) as proxy:
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.getsockname()[1]}")
        assert _hub_reachable(timeout=2.0)
        monkeypatch.setenv("NO_PROXY", "hub.invalid")  # the hub is not behind it
        assert not _hub_reachable(timeout=2.0)
        monkeypatch.delenv("NO_PROXY")
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        assert not _hub_reachable(timeout=2.0)


def _cut(data: bytes) -> bytes:
    return data[: len(data) * 2 // 3]


@pytest.mark.parametrize("kind,why", [
    ("empty", "it is empty"),
    ("lfs", r"it is a git-lfs pointer, not the weights .*`git lfs pull`"),
    ("cut zip", r"its zip archive has no end \(a cut download\?\)"),
    ("cut safetensors", r"it is shorter than its safetensors header says \(a cut download\?\)"),
    ("bad safetensors header", "its safetensors header cannot be read"),
    ("text", "it is neither a torch.save file .* nor a safetensors file"),
])
def test_a_file_that_is_no_checkpoint_is_named_so_not_blamed_on_the_architecture(tmp_path, kind, why):
    # torch.load's errors for these said to check the architecture, or to pass weights_only=False.
    import io

    from safetensors.torch import save as safetensors_bytes

    state = open_clip.create_model("vlmrm-tiny").state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    contents = {
        "empty": b"",
        "lfs": b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 605157884\n",
        "cut zip": _cut(buffer.getvalue()),
        "cut safetensors": _cut(safetensors_bytes({k: v.contiguous() for k, v in state.items()})),
        "bad safetensors header": (7).to_bytes(8, "little") + b"{nope}}" + b"\0" * 64,
        "text": b"<html>404 Not Found</html>\n" * 4,
    }
    path = tmp_path / "open_clip_pytorch_model.bin"
    path.write_bytes(contents[kind])
    with pytest.raises(PretrainedWeightsError, match=f"is not a checkpoint file: {why}.* Download it again") as error:
        create_clip("vlmrm-tiny", str(path))
    assert "architecture" not in str(error.value) and "weights_only" not in str(error.value)


def test_whole_checkpoints_of_every_format_pass_the_file_check(tmp_path):
    from safetensors.torch import save_file

    from vlmrm_fast.models import _not_a_checkpoint

    state = {k: v.contiguous() for k, v in open_clip.create_model("vlmrm-tiny").state_dict().items()}
    torch.save(state, tmp_path / "zip.pt")
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    save_file(state, tmp_path / "w.safetensors")
    assert [_not_a_checkpoint(str(tmp_path / n)) for n in ("zip.pt", "legacy.pt", "w.safetensors")] == [None] * 3


@pytest.mark.parametrize("name,saved_as,suffix", [("weights", "safetensors", "'.safetensors'"),
                                                   ("open_clip_pytorch_model.bin", "safetensors", "'.safetensors'"),
                                                   ("w.safetensors", "torch", "'.pt'")])
def test_an_intact_checkpoint_named_as_the_other_format_says_to_rename_it(tmp_path, name, saved_as, suffix):
    # open_clip picks safetensors or torch.load by the name alone: an intact safetensors file without the suffix
    # read as "its data is damaged ... Download it again", a torch.save file named .safetensors as another architecture.
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in open_clip.create_model("vlmrm-tiny").state_dict().items()}
    (save_file if saved_as == "safetensors" else torch.save)(state, str(tmp_path / name))
    with pytest.raises(PretrainedWeightsError, match=f"reads a file as safetensors by its name alone.*rename it .*{suffix}") as error:
        create_clip("vlmrm-tiny", str(tmp_path / name))
    assert "damaged" not in str(error.value) and "architecture" not in str(error.value)


def test_checkpoint_of_another_width_is_another_architecture_not_another_image_size(tmp_path):
    # Position embeddings of the same count but another width: not a question of image size.
    wide = open_clip.create_model("vlmrm-tiny")
    state = wide.state_dict()
    state["visual.positional_embedding"] = torch.zeros(state["visual.positional_embedding"].shape[0], 7)
    torch.save(state, tmp_path / "wide.pt")
    with pytest.raises(PretrainedWeightsError, match="does not load into vlmrm-tiny") as error:
        create_clip("vlmrm-tiny", str(tmp_path / "wide.pt"))
    assert "image or patch size" not in str(error.value)
    assert ".. Check" not in str(error.value)  # torch's message ends with a full stop of its own


@needs_local_dir
def test_local_dir_without_weights_is_refused_not_random(tmp_path):
    # open_clip builds such a model with random weights and only logs it; pretrained weights were asked for.
    import json

    (tmp_path / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": open_clip.get_model_config("vlmrm-tiny"), "preprocess_cfg": {}}))
    with pytest.raises(PretrainedWeightsError, match="no weights were loaded.*open_clip_pytorch_model.bin"):
        create_clip(f"local-dir:{tmp_path}", None)
    state = open_clip.create_model("vlmrm-tiny").state_dict()
    state["visual.proj"] = torch.zeros(3, 3)  # weights there, but for another model
    torch.save(state, tmp_path / "open_clip_pytorch_model.bin")
    with pytest.raises(PretrainedWeightsError, match=r"(?s)weights do not load into its config.*visual.proj"):
        create_clip(f"local-dir:{tmp_path}", None)
    model, _ = make_tiny(seed=3)
    torch.save(model.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    loaded, _ = create_clip(f"local-dir:{tmp_path}", None)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


@needs_local_dir
def test_a_local_dir_with_several_weight_files_is_refused_not_read_by_name(tmp_path):
    # open_clip took the first by name (epoch_10 before epoch_2) and said so in a log line alone, which is kept out
    # of the output: one of several fine-tunes, silently. The fix names a file name for each format (one named
    # open_clip_model.safetensors alone: a torch.save file renamed so is read as safetensors, and refused).
    import json

    (tmp_path / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": open_clip.get_model_config("vlmrm-tiny"), "preprocess_cfg": {}}))
    state = open_clip.create_model("vlmrm-tiny").state_dict()
    for name in ("epoch_2.pth", "epoch_10.pth"):
        torch.save(state, tmp_path / name)
    with pytest.raises(PretrainedWeightsError, match=r"several weight files, \['epoch_10.pth', 'epoch_2.pth'\].*alone.*"
                                                     r"'open_clip_pytorch_model.bin' if a torch.save one"):
        create_clip(f"local-dir:{tmp_path}", None)
    (tmp_path / "epoch_10.pth").rename(tmp_path / "open_clip_pytorch_model.bin")  # as told: no doubt which
    create_clip(f"local-dir:{tmp_path}", None)


def test_a_local_dir_without_a_usable_open_clip_config_names_the_config_not_the_weights(tmp_path):
    # open_clip's errors for these read "its weights do not load into its config".
    torch.save(open_clip.create_model("vlmrm-tiny").state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"the folder has no open_clip_config.json.*create_clip\('ViT-B-32'"):
        create_clip(f"local-dir:{tmp_path}", None)
    (tmp_path / "open_clip_config.json").write_text('{"preprocess_cfg": {}}')
    with pytest.raises(PretrainedWeightsError, match=r"open_clip_config.json has no 'model_cfg'") as error:
        create_clip(f"local-dir:{tmp_path}", None)
    assert "weights do not load" not in str(error.value)


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint file.*laion2b_s34b_b79k"):
        create_clip("ViT-B-32", str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match="No checkpoint file"):  # a pathlib.Path as well as a str
        create_clip("ViT-B-32", tmp_path / "missing.pt")
    # A model open_clip has no tags for: the fix named is random weights (pretrained=None), not a tag "none".
    with pytest.raises(FileNotFoundError, match=r"Pass an existing path, or pretrained=None for random weights "
                                                r"\(command line: --pretrained none\): open_clip has no tags for vlmrm-tiny"):
        create_clip("vlmrm-tiny", str(tmp_path / "missing.pt"))


@pytest.mark.parametrize("args,match", [
    ((None, None), r"model_name must be an open_clip model name \(a str such as 'ViT-B-32'\); got NoneType"),
    ((Path("vlmrm-tiny"), None), r"got PosixPath .*For a checkpoint file, give its path as pretrained="),
    (("vlmrm-tiny", 5), r"pretrained must be an open_clip tag or a checkpoint path.*got int 5"),
    (("vlmrm-tiny", False), r"pretrained must be .*None for random weights; got bool False"),
], ids=["none", "path", "int", "false"])
def test_arguments_of_the_wrong_type_are_named(args, match):
    # They ended in AttributeError ('NoneType' object has no attribute 'startswith') or os.fspath's TypeError.
    with pytest.raises(TypeError, match=match):
        CLIPReward.from_pretrained(*args, goal="a")
    with pytest.raises(TypeError, match=r"cache_dir must be a folder path \(str or path\) or None; got int"):
        create_clip("vlmrm-tiny", None, cache_dir=5)


def test_unknown_model_name_suggests_close_ones():
    with pytest.raises(ValueError, match="Unknown model 'ViT-B-23'.*ViT-B-32"):
        CLIPReward.from_pretrained("ViT-B-23", None, goal="a")


def test_unknown_tag_lists_the_known_ones():
    with pytest.raises(ValueError, match="neither an open_clip pretrained tag.*laion2b_s34b_b79k.*or a checkpoint path"):
        create_clip("ViT-B-32", "laion9b")
    # A model without tags (the tiny one): the ways out, not a list that reads "none".
    with pytest.raises(ValueError, match=r"no tags for vlmrm-tiny: pass a checkpoint path, or pretrained=None .*"
                                         r"--pretrained none"):
        create_clip("vlmrm-tiny", "none")


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


def _activation(model):
    return type(model.visual.transformer.resblocks[0].mlp.gelu).__name__


def test_quickgelu_tags_get_quickgelu(monkeypatch):
    # OpenAI's (and MetaCLIP's, DFN's) weights were trained with QuickGELU, which ViT-B-32's config
    # lacks: open_clip only warns about it, and GELU in its place gives other embeddings.
    calls, tiny = [], make_tiny()[0]

    def create_model(name, **kwargs):
        calls.append(kwargs)
        return tiny

    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(open_clip, "create_model", create_model)
    create_clip("ViT-B-32", "openai")
    create_clip("ViT-B-32", "laion2b_s34b_b79k")
    create_clip("ViT-B-32-quickgelu", "openai")  # the config has it already
    assert [c["force_quick_gelu"] for c in calls] == [True, False, False]


def _save_tiny(path, **create):
    torch.manual_seed(5)
    model = open_clip.create_model("vlmrm-tiny", **create)
    torch.save(model.state_dict(), path)
    return model


def test_checkpoint_with_its_open_clip_config_gets_its_activation_and_normalisation(tmp_path):
    import json

    _save_tiny(tmp_path / "open_clip_pytorch_model.bin", force_quick_gelu=True)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": {**open_clip.get_model_config("vlmrm-tiny"), "quick_gelu": True},
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    }))
    model, _ = create_clip("vlmrm-tiny", str(tmp_path / "open_clip_pytorch_model.bin"))
    assert _activation(model) == "QuickGELU"
    spec = models.preprocess_spec_of(model, "vlmrm")
    assert spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.5, 0.5, 0.5)
    (tmp_path / "open_clip_config.json").unlink()  # without it: the config's own settings
    model, _ = create_clip("vlmrm-tiny", str(tmp_path / "open_clip_pytorch_model.bin"))
    assert _activation(model) == "GELU" and models.preprocess_spec_of(model, "vlmrm").mean[0] == pytest.approx(0.48145466)


def test_bare_checkpoint_warns_where_tags_of_the_model_differ(tmp_path, monkeypatch):
    path = tmp_path / "weights.pt"
    _save_tiny(path)
    tags = {"plain": {}, "halves": {"mean": (0.5,) * 3, "std": (0.5,) * 3}, "quick": {"quick_gelu": True},
            "squashed": {"resize_mode": "squash", "interpolation": "bilinear"}, "spelt": {"resize_mode": "shortest"}}
    monkeypatch.setattr(open_clip, "list_pretrained_tags_by_model", lambda name: list(tags))
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda name, tag: tags[tag])
    with pytest.warns(UserWarning, match=r"no open_clip_config.json.*halves \(mean \(0.5, 0.5, 0.5\).*quick \(QuickGELU\)"
                                         r"; squashed \(squash bilinear resize with preprocess='openclip'\)\. "):
        create_clip("vlmrm-tiny", str(path))
    del tags["halves"], tags["quick"], tags["squashed"]  # "spelt" gives open_clip's default explicitly
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_clip("vlmrm-tiny", str(path))  # every tag matches the config: nothing to say


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".bin"])  # .bin: torch's legacy (non-zip) format
def test_checkpoint_for_another_image_size_is_refused(tmp_path, suffix):
    # open_clip would interpolate the position embeddings to fit, silently: another model.
    torch.manual_seed(5)
    model = open_clip.create_model("vlmrm-tiny", force_image_size=256)
    path = tmp_path / f"tiny-256{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path,
                   _use_new_zipfile_serialization=suffix == ".pt")
    with pytest.raises(PretrainedWeightsError, match=r"another image or patch size: its vision tower has 65 .* vlmrm-tiny's 50"):
        create_clip("vlmrm-tiny", str(path))
    assert open_clip.factory.resize_pos_embed.__module__ == "open_clip.model"  # open_clip's own again afterwards


def test_checkpoint_for_another_context_length_is_refused(tmp_path):
    state = open_clip.create_model("vlmrm-tiny").state_dict()
    state["positional_embedding"] = state["positional_embedding"][:32]  # as a 32-token text tower saves it
    path = tmp_path / "tiny-ctx32.pt"
    torch.save(state, path)
    with pytest.raises(PretrainedWeightsError, match=r"another text context length: 32 positions, vlmrm-tiny has 77"):
        create_clip("vlmrm-tiny", str(path))


@pytest.mark.parametrize("key,values", [("std", [0, 0, 0]), ("std", "Infinity"), ("mean", "NaN"), ("mean", [0.5]),
                                        ("std", ["a", "b", "c"]), ("mean", [0.5, 0.5, 0.5, 0.5])],
                         ids=["std0", "std-inf", "mean-nan", "mean-1", "std-str", "mean-4"])
def test_an_open_clip_config_with_unusable_mean_or_std_names_the_file(tmp_path, key, values):
    # An infinite std (JSON's Infinity is read) gave every frame the same pixels, so the same reward, silently.
    import json

    _save_tiny(tmp_path / "weights.pt")
    values = [values] * 3 if isinstance(values, str) and values in ("Infinity", "NaN") else values
    text = json.dumps({"preprocess_cfg": {key: values}}).replace('"Infinity"', "Infinity").replace('"NaN"', "NaN")
    (tmp_path / "open_clip_config.json").write_text(text)
    with pytest.raises(PretrainedWeightsError, match=rf"open_clip_config.json: preprocess_cfg.{key} is .*not three "
                                                     r"finite numbers.*fix or remove it"):
        create_clip("vlmrm-tiny", str(tmp_path / "weights.pt"))


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"model_cfg": 3}'])
def test_unreadable_open_clip_config_names_the_file(tmp_path, text):
    _save_tiny(tmp_path / "weights.pt")
    (tmp_path / "open_clip_config.json").write_text(text)
    with pytest.raises(PretrainedWeightsError, match=r"open_clip_config.json .*fix or remove it"):
        create_clip("vlmrm-tiny", str(tmp_path / "weights.pt"))


def test_open_clip_config_saying_gelu_beside_a_quickgelu_model_warns(tmp_path, monkeypatch):
    import json

    _save_tiny(tmp_path / "weights.pt")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"quick_gelu": False}}))
    monkeypatch.setattr(models, "_config_quick_gelu", lambda name: True)  # as a "-quickgelu" config would
    with pytest.warns(UserWarning, match="trained with GELU.*without '-quickgelu'"):
        create_clip("vlmrm-tiny", str(tmp_path / "weights.pt"))


def test_a_whole_open_clip_config_without_quick_gelu_beside_a_quickgelu_model_warns(tmp_path, monkeypatch):
    # open_clip writes a GELU model's config without the key (LAION's repos hold such ones), and builds GELU from it:
    # only an explicit "quick_gelu": false was taken to say GELU, so LAION weights ran QuickGELU without a word.
    import json

    _save_tiny(tmp_path / "weights.pt")
    (tmp_path / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": open_clip.get_model_config("vlmrm-tiny"), "preprocess_cfg": {}}))
    monkeypatch.setattr(models, "_config_quick_gelu", lambda name: True)  # as a "-quickgelu" config would
    with pytest.warns(UserWarning, match="trained with GELU.*without '-quickgelu'"):
        create_clip("vlmrm-tiny", str(tmp_path / "weights.pt"))


def test_quickgelu_tags_are_known_from_the_quickgelu_config_too(monkeypatch):
    # open_clip before 2.29 has no quick_gelu flag on tags; it lists them under "<model>-quickgelu".
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda name, tag: {})
    assert models._tag_quick_gelu("ViT-B-32", "laion400m_e32")
    assert not models._tag_quick_gelu("ViT-B-32", "laion2b_s34b_b79k")


# ---- behaviours a mutation audit found untested ---------------------------------------------------


@pytest.fixture
def connections(monkeypatch):
    """socket.create_connection stood in for: every connection 'succeeds', and its address is recorded."""
    calls = []

    def create_connection(address, timeout=None):
        calls.append(address)
        return contextlib.nullcontext()

    monkeypatch.setattr(models.socket, "create_connection", create_connection)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return calls


@pytest.mark.parametrize("name,value", [("HF_HUB_OFFLINE", "1"), ("HF_HUB_OFFLINE", "true"), ("HF_HUB_OFFLINE", "YES"),
                                        ("HF_HUB_OFFLINE", "on"), ("TRANSFORMERS_OFFLINE", "1")])
def test_every_spelling_of_hf_hub_offline_counts_as_offline(monkeypatch, connections, name, value):
    # Every spelling huggingface_hub takes as offline: online here, its raw error would replace our
    # "offline: pass a local file" hint for a tag missing from the cache.
    assert models._hub_reachable() is True  # the stand-in answers
    monkeypatch.setenv(name, value)
    assert models._hub_reachable() is False
    assert len(connections) == 1  # offline: not even a connection attempt
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    if name == "TRANSFORMERS_OFFLINE":  # HF_HUB_OFFLINE, set, wins over it, as in huggingface_hub
        assert models._hub_reachable() is True


@pytest.mark.parametrize("endpoint,address", [
    (None, ("huggingface.co", 443)),
    ("http://mirror.local", ("mirror.local", 80)),
    ("https://mirror.local", ("mirror.local", 443)),
    ("http://mirror.local:8080", ("mirror.local", 8080)),
])
def test_hub_reachable_connects_to_hf_endpoint_and_its_port(monkeypatch, connections, endpoint, address):
    if endpoint is None:
        monkeypatch.delenv("HF_ENDPOINT", raising=False)
    else:
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
    assert models._hub_reachable() is True
    assert connections == [address]


def test_hub_offline_is_undone_afterwards():
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    with models._hub_offline():
        assert constants.HF_HUB_OFFLINE is True
    assert constants.HF_HUB_OFFLINE == before
    with pytest.raises(KeyError), models._hub_offline():
        raise KeyError("a failed load")
    assert constants.HF_HUB_OFFLINE == before


def test_an_open_clip_config_of_another_size_keeps_the_models_input_size(tmp_path):
    import json

    _save_tiny(tmp_path / "weights.pt")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"preprocess_cfg": {"size": 256, "mean": [0.5] * 3}}))
    model, _ = create_clip("vlmrm-tiny", str(tmp_path / "weights.pt"))
    assert models.preprocess_spec_of(model, "vlmrm").mean == (0.5, 0.5, 0.5)  # the rest of it is taken
    assert models.image_size_of(model) == (224, 224)
    assert tuple(np.broadcast_to(model.visual.preprocess_cfg["size"], 2)) == (224, 224)  # open_clip's transforms too


def test_an_open_clip_config_without_an_activation_says_nothing(tmp_path, monkeypatch):
    import json

    _save_tiny(tmp_path / "weights.pt")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}, "preprocess_cfg": {}}))
    monkeypatch.setattr(models, "_config_quick_gelu", lambda name: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_clip("vlmrm-tiny", str(tmp_path / "weights.pt"))


def _tags(monkeypatch, tags):
    monkeypatch.setattr(open_clip, "list_pretrained_tags_by_model", lambda name: list(tags))
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda name, tag: tags[tag])


def test_a_checkpoint_with_its_open_clip_config_is_not_warned_about_other_tags(tmp_path, monkeypatch):
    import json

    _save_tiny(tmp_path / "weights.pt")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}, "preprocess_cfg": {}}))
    _tags(monkeypatch, {"halves": {"mean": (0.5,) * 3, "std": (0.5,) * 3}, "quick": {"quick_gelu": True}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_clip("vlmrm-tiny", str(tmp_path / "weights.pt"))


def test_bare_checkpoint_warns_of_a_tag_differing_only_in_std(tmp_path, monkeypatch):
    _save_tiny(tmp_path / "weights.pt")
    _tags(monkeypatch, {"stds": {"mean": models._OPENAI_MEAN, "std": (0.5,) * 3}})
    with pytest.warns(UserWarning, match=r"stds \(mean .* std \(0.5, 0.5, 0.5\)\)"):
        create_clip("vlmrm-tiny", str(tmp_path / "weights.pt"))


def test_bare_checkpoint_beside_a_quickgelu_config_warns_of_gelu_tags(tmp_path, monkeypatch):
    _save_tiny(tmp_path / "weights.pt")
    _tags(monkeypatch, {"gelu": {}})
    monkeypatch.setattr(models, "_config_quick_gelu", lambda name: True)  # as a "-quickgelu" config would
    with pytest.warns(UserWarning, match=r"own settings \(QuickGELU.*gelu \(GELU\)"):
        create_clip("vlmrm-tiny", str(tmp_path / "weights.pt"))


def test_a_text_tower_checkpoint_of_another_context_length_is_refused_under_its_custom_text_key():
    # Custom-text-tower models (model.text) save "text.positional_embedding".
    import types

    model = types.SimpleNamespace(text=types.SimpleNamespace(positional_embedding=torch.zeros(77, 8)))
    with models._position_embeddings_kept("custom", "ckpt.pt"):
        with pytest.raises(PretrainedWeightsError, match="another text context length: 32 positions, custom has 77"):
            open_clip.factory.resize_text_pos_embed({"text.positional_embedding": torch.zeros(32, 8)}, model)


def test_hub_and_local_dir_models_refuse_a_pretrained_tag():
    with pytest.raises(ValueError, match="names its own weights; pass pretrained=None"):
        create_clip("local-dir:/nowhere", "openai")
    with pytest.raises(ValueError, match="names its own weights"):
        create_clip("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "laion2b_s34b_b79k")


def test_hf_hub_model_offline_fails_at_once(monkeypatch):
    def create_model(*args, **kwargs):
        raise AssertionError("open_clip was asked to reach the hub")

    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(open_clip, "create_model", create_model)
    with pytest.raises(PretrainedWeightsError, match="unreachable.*local-dir:"):
        create_clip("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", None)


def test_a_bare_checkpoint_file_name_that_does_not_exist_is_a_missing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("model.pt", "weights.safetensors", "open_clip_pytorch_model.bin"):
        with pytest.raises(FileNotFoundError, match="No checkpoint file"):
            create_clip("vlmrm-tiny", name)


def test_an_open_clip_config_gives_its_own_std_too(tmp_path):
    import json

    _save_tiny(tmp_path / "weights.pt")
    (tmp_path / "open_clip_config.json").write_text(
        json.dumps({"preprocess_cfg": {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}}))
    spec = models.preprocess_spec_of(create_clip("vlmrm-tiny", str(tmp_path / "weights.pt"))[0], "vlmrm")
    assert spec.mean == pytest.approx((0.1, 0.2, 0.3)) and spec.std == pytest.approx((0.4, 0.5, 0.6))


def test_models_come_in_eval_mode(tmp_path):
    model, _ = make_tiny(seed=3)
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        for pretrained in (None, str(tmp_path / "tiny.pt")):
            loaded, _ = create_clip("vlmrm-tiny", pretrained)
            assert not any(m.training for m in loaded.modules())


def test_image_size_of_is_height_then_width():
    import types

    visual = types.SimpleNamespace(image_size=(192, 256))
    assert models.image_size_of(types.SimpleNamespace(visual=visual)) == (192, 256)
    visual = types.SimpleNamespace(preprocess_cfg={"size": 160})
    assert models.image_size_of(types.SimpleNamespace(visual=visual)) == (160, 160)


def test_root_records_dropped_drops_only_that_folders_records_and_leaves_the_root_logger_as_found(tmp_path):
    # What keeps open_clip's and ONNX Runtime's quantiser's root-logger lines out of the user's output.
    import logging
    import os

    from vlmrm_fast.quiet_logging import root_records_dropped

    def record(folder):
        return logging.LogRecord("root", logging.WARNING, os.path.join(str(tmp_path / folder), "module.py"), 1, "m",
                                 None, None)

    root = logging.getLogger()
    before = (list(root.handlers), list(root.filters))
    with root_records_dropped(str(tmp_path / "pkg")):
        assert not root.filter(record("pkg")) and not root.filter(record("pkg/sub"))
        assert root.filter(record("pkg_extra")) and root.filter(record("other"))  # a sibling folder is not inside
        # A handler, so that logging.warning does not configure the unconfigured root logger meanwhile.
        assert [type(h) for h in root.handlers if h not in before[0]] == [logging.NullHandler]
    assert (list(root.handlers), list(root.filters)) == before
    with pytest.raises(RuntimeError, match="inside"):
        with root_records_dropped(str(tmp_path / "pkg")):
            raise RuntimeError("inside")
    assert (list(root.handlers), list(root.filters)) == before  # removed on the way out, an error or not
    assert root.filter(record("pkg"))


def test_loggers_quieted_raises_levels_to_warning_only_and_restores_them():
    # A logger already quieter than WARNING (ERROR) stays so inside; each level, set or unset, is restored.
    import logging

    from vlmrm_fast.quiet_logging import loggers_quieted

    chatty, quiet, unset = (logging.getLogger(f"vlmrm-test-{n}") for n in ("chatty", "quiet", "unset"))
    chatty.setLevel(logging.INFO)
    quiet.setLevel(logging.ERROR)
    try:
        with pytest.raises(RuntimeError):
            with loggers_quieted(chatty.name, quiet.name, unset.name):
                assert (chatty.level, quiet.level) == (logging.WARNING, logging.ERROR)
                assert unset.getEffectiveLevel() >= logging.WARNING
                raise RuntimeError("inside")
        assert (chatty.level, quiet.level, unset.level) == (logging.INFO, logging.ERROR, logging.NOTSET)
    finally:
        for logger in (chatty, quiet, unset):
            logger.setLevel(logging.NOTSET)


# ---- from a mutation audit of the loading code: each test kills a mutation that survived ------------


def test_a_tag_load_is_required_and_goes_to_the_given_cache(monkeypatch, tmp_path):
    # open_clip < 3 builds random weights for a tag it cannot load unless require_pretrained is set.
    calls, tiny = [], make_tiny()[0]
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(open_clip, "create_model", lambda name, **kw: calls.append(kw) or tiny)
    CLIPReward.from_pretrained("ViT-B-32", "laion2b_s34b_b79k", goal="a", device="cpu", backend="torch",
                               cache_dir=tmp_path)
    assert calls[0]["cache_dir"] == str(tmp_path) and calls[0]["require_pretrained"] is True


def test_a_missing_path_without_a_checkpoint_suffix_is_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint file"):
        create_clip("vlmrm-tiny", str(tmp_path / "weights"))


@pytest.mark.filterwarnings("ignore:.*random weights:UserWarning")
def test_from_pretrained_forwards_every_option():
    rm = CLIPReward.from_pretrained("vlmrm-tiny", None, goal="a", device="cpu", dtype="bf16", preprocess="openclip",
                                    max_batch_size=7, backend="compile", backend_options={"buckets": (3, 7)})
    assert rm.dtype == torch.bfloat16 and rm.preprocess_spec.mode == "openclip" and rm.max_batch_size == 7
    assert rm.vision_backend.buckets == (3, 7) and rm.model_name == "vlmrm-tiny"


@pytest.mark.filterwarnings("ignore:.*random weights:UserWarning")
@pytest.mark.skipif(not triton_runs_on(torch.device("cpu")), reason="needs Triton's CPU interpreter")
def test_from_pretrained_forwards_kernels():
    # 'auto' gives the torch path on CPU: only 'triton' shows here whether the choice reached the model.
    rm = CLIPReward.from_pretrained("vlmrm-tiny", None, goal="a", device="cpu", kernels="triton", backend="torch")
    assert rm.kernels == "triton"


def test_a_small_but_real_goal_baseline_direction_is_kept(monkeypatch):
    # |g - b| about 6e-3: goal and baseline that differ a little still define a direction.
    from vlmrm_fast import tasks

    tiny = make_tiny()
    g = torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(0)), dim=0)
    b = torch.nn.functional.normalize(g + 1e-3 * torch.randn(32, generator=torch.Generator().manual_seed(1)), dim=0)
    monkeypatch.setattr(tasks, "embed_prompts", lambda model, tokenizer, prompts, device: torch.stack([g, b]))
    encoded = tasks.encode_tasks(tiny[0], tiny[1], [tasks.Task("x", "y")], torch.device("cpu"))
    assert encoded.has_direction == (True,)


@needs_local_dir
@pytest.mark.parametrize("contents,why", [
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 605157884\n",
     "is not a checkpoint file: it is a git-lfs pointer"),
    (b"", "is not a checkpoint file: it is empty"),
])
def test_a_local_dir_whose_weights_are_no_checkpoint_is_named_so(tmp_path, contents, why):
    # A hub repo cloned without git-lfs: the folder route of the README meets it first. torch's errors
    # (or a bare EOFError, a traceback from the CLI) said nothing of it.
    import json

    (tmp_path / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": open_clip.get_model_config("vlmrm-tiny"), "preprocess_cfg": {}}))
    (tmp_path / "open_clip_pytorch_model.bin").write_bytes(contents)
    with pytest.raises(PretrainedWeightsError, match=why):
        create_clip(f"local-dir:{tmp_path}", None)


def test_checkpoints_with_no_weights_or_cut_short_say_so(tmp_path):
    torch.save({}, tmp_path / "empty.pt")
    with pytest.raises(PretrainedWeightsError, match="holds no weights"):
        create_clip("vlmrm-tiny", str(tmp_path / "empty.pt"))
    torch.save(open_clip.create_model("vlmrm-tiny").state_dict(), tmp_path / "legacy.bin",
               _use_new_zipfile_serialization=False)
    data = (tmp_path / "legacy.bin").read_bytes()
    (tmp_path / "legacy.bin").write_bytes(data[: len(data) // 2])  # a pickle passes the file check: cut later
    with pytest.raises(PretrainedWeightsError, match=r"it ends early \(a cut download\?\)"):
        create_clip("vlmrm-tiny", str(tmp_path / "legacy.bin"))


def test_a_checkpoint_path_may_start_with_home_and_a_folder_is_named_as_one(tmp_path, monkeypatch):
    model, _ = make_tiny(seed=3)
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    monkeypatch.setenv("HOME", str(tmp_path))
    loaded, _ = create_clip("vlmrm-tiny", "~/tiny.pt")
    assert torch.equal(next(loaded.parameters()), next(model.parameters()))
    with pytest.raises(ValueError, match=r"is a folder, not a checkpoint file.*model_name='local-dir:"):
        create_clip("vlmrm-tiny", str(tmp_path))


@needs_local_dir
def test_a_local_dir_may_start_with_home(tmp_path, monkeypatch):
    # The folder was found with "~" expanded, then open_clip was given it as written, and found none: "its weights do
    # not load into its config: FileNotFoundError".
    import json

    model, _ = make_tiny(seed=3)
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": open_clip.get_model_config("vlmrm-tiny"), "preprocess_cfg": {}}))
    torch.save(model.state_dict(), tmp_path / "tiny" / "open_clip_pytorch_model.bin")
    monkeypatch.setenv("HOME", str(tmp_path))
    loaded, _ = create_clip("local-dir:~/tiny", None)
    assert torch.equal(next(loaded.parameters()), next(model.parameters()))


def _cached_hub_repo(cache: Path, model: torch.nn.Module) -> None:
    """``hf-hub:fakeorg/tiny`` in a Hugging Face cache folder as huggingface_hub lays it out: ``model``'s weights
    beside vlmrm-tiny's open_clip_config.json."""
    import json

    repo = cache / "models--fakeorg--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    (snapshot / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": open_clip.get_model_config("vlmrm-tiny"), "preprocess_cfg": {}}))
    torch.save(model.state_dict(), snapshot / "open_clip_pytorch_model.bin")


def test_an_hf_hub_model_in_the_local_cache_loads_offline(tmp_path, monkeypatch):
    # As a cached tag does: offline, the hub's cache answers (it was refused before open_clip was asked).
    model, _ = make_tiny(seed=5)
    _cached_hub_repo(tmp_path, model)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = models._create("hf-hub:fakeorg/tiny", None, str(tmp_path))  # the weights (its tokenizer: transformers)
    assert torch.equal(next(loaded.parameters()), next(model.parameters()))
    with pytest.raises(PretrainedWeightsError, match="unreachable .* not in the local cache.*local-dir:"):
        models._create("hf-hub:fakeorg/other", None, str(tmp_path))


def test_an_hf_hub_models_tokenizer_is_read_from_the_cache_dir_its_weights_came_from(tmp_path, monkeypatch):
    # The tokenizer was asked for without cache_dir: its config (which names CLIP's own tokenizer here) was looked for
    # in the default cache, and open_clip fell back to a Hugging Face tokenizer named after the repo ("needs the
    # 'transformers' package", or, with it, another tokenizer than the model's).
    from huggingface_hub import constants

    _cached_hub_repo(tmp_path, make_tiny(seed=5)[0])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # huggingface_hub reads the variable at its import
    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))
    _, tokenizer = create_clip("hf-hub:fakeorg/tiny", None, cache_dir=tmp_path)
    assert isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # torch's, reading the garbage file
def test_damaged_pickled_or_tower_only_checkpoints_are_named_without_torchs_unsafe_advice(tmp_path):
    # torch.load's own message for the first two suggests weights_only=False (running the file's code), and the
    # last read as "another text context length": the tower's 50 position embeddings taken for the text's 77.
    model = open_clip.create_model("vlmrm-tiny")
    torch.save(model.state_dict(), tmp_path / "good.pt")
    data = bytearray((tmp_path / "good.pt").read_bytes())
    start = data.index(b"data.pkl") + 200  # inside the pickled index of the tensors, past the zip entry's header
    data[start : start + 50] = bytes(b ^ 0xFF for b in data[start : start + 50])
    (tmp_path / "damaged.pt").write_bytes(bytes(data))
    (tmp_path / "garbage.pt").write_bytes(b"\x80garbage" * 10)  # passes the file check: a pickle's first byte
    torch.save(model, tmp_path / "whole.pt")
    torch.save(model.visual.state_dict(), tmp_path / "tower.pt")
    for name in ("damaged.pt", "garbage.pt"):
        with pytest.raises(PretrainedWeightsError, match=r"cannot be read: its data is damaged.*Download it again") as error:
            create_clip("vlmrm-tiny", str(tmp_path / name))
        assert "weights_only" not in str(error.value)
    with pytest.raises(PretrainedWeightsError, match=r"pickled Python object \(open_clip.model.CLIP: a whole model.*state_dict\(\)"):
        create_clip("vlmrm-tiny", str(tmp_path / "whole.pt"))
    import argparse

    torch.save({"state_dict": model.state_dict(), "args": argparse.Namespace(lr=1)}, tmp_path / "with-args.pt")
    with pytest.raises(PretrainedWeightsError, match=r"pickled Python object \(argparse.Namespace\), which is not loaded") as error:
        create_clip("vlmrm-tiny", str(tmp_path / "with-args.pt"))
    assert "whole model" not in str(error.value)
    with pytest.raises(PretrainedWeightsError, match=r"vision tower's weights alone \(model.visual.state_dict\(\)\)"):
        create_clip("vlmrm-tiny", str(tmp_path / "tower.pt"))
    create_clip("vlmrm-tiny", str(tmp_path / "good.pt"))  # the file they came from loads


def test_weights_under_another_key_or_with_a_wrappers_prefix_are_named_so(tmp_path):
    # A torch.compile'd model's state_dict ("_orig_mod." keys, "module." before them under DDP) or a training
    # checkpoint's {"model": ...} failed the strict load with every key "missing" and "check that it was saved from
    # this architecture": it was.
    state_dict = open_clip.create_model("vlmrm-tiny").state_dict()
    torch.save({"model": state_dict, "epoch": 3}, tmp_path / "nested.pt")
    torch.save({f"module._orig_mod.{k}": v for k, v in state_dict.items()}, tmp_path / "compiled.pt")
    with pytest.raises(PretrainedWeightsError, match=r"weights under its key 'model' .*torch.load\(path\)\['model'\]"):
        create_clip("vlmrm-tiny", str(tmp_path / "nested.pt"))
    with pytest.raises(PretrainedWeightsError, match=r"with '_orig_mod.' before every key .*model._orig_mod's"):
        create_clip("vlmrm-tiny", str(tmp_path / "compiled.pt"))


def test_a_transformers_clip_checkpoint_is_named_as_such(tmp_path):
    # A hub repo's model.safetensors of transformers' CLIPModel failed with a list of every open_clip key missing.
    from safetensors.torch import save_file

    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(8, 4),
               "vision_model.embeddings.patch_embedding.weight": torch.zeros(4, 3, 2, 2),
               "visual_projection.weight": torch.zeros(4, 4), "logit_scale": torch.zeros(())},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(PretrainedWeightsError, match=r"Hugging Face transformers CLIPModel's weights .*open_clip_model"):
        create_clip("vlmrm-tiny", str(tmp_path / "model.safetensors"))


def test_a_text_tower_alone_is_not_named_a_vision_tower(tmp_path):
    # CLIP's text tower shares key names with the vision tower (transformer.resblocks.*, positional_embedding): the
    # whole model's state_dict without its visual.* keys read as "a vision tower's weights alone".
    state_dict = open_clip.create_model("vlmrm-tiny").state_dict()
    torch.save({k: v for k, v in state_dict.items() if not k.startswith("visual.")}, tmp_path / "text.pt")
    with pytest.raises(PretrainedWeightsError, match=r"(?s)does not load into vlmrm-tiny.*Missing key.*visual\.") as error:
        create_clip("vlmrm-tiny", str(tmp_path / "text.pt"))
    assert "vision tower" not in str(error.value)


@pytest.mark.parametrize("message", [
    # torch 2.4: the words at the end of a line of its advice
    "Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will likely succeed, but "
    "it can result in arbitrary code execution.\n Please file an issue with the following so that we can make "
    "`weights_only=True` compatible with your use case: WeightsUnpickler error: Unsupported operand 121\n\nCheck the "
    "documentation of torch.load to learn more about types accepted by default with weights_only https://x.",
    # torch 2.5 on: on their own line
    "Weights only load failed. In PyTorch 2.6, we changed the default value of the `weights_only` argument.\n"
    "Unsupported operand 121\n\nCheck the documentation of torch.load to learn more about weights_only https://x.",
], ids=["torch-2.4", "torch-2.5+"])
def test_a_damaged_checkpoint_is_described_without_torchs_weights_only_advice(message):
    # The whole-suite run on torch 2.4 found its advice in our "damaged" message: the words were looked for
    # at the start of a line only.
    assert models._damage_detail(message) == "Unsupported operand 121"
    assert models._damage_detail("bad\nthe weights_only advice") == "bad"  # no such words: a line without it


def test_a_checkpoint_from_a_newer_torch_says_to_upgrade_torch_not_to_download_again(tmp_path):
    import zipfile

    torch.save(open_clip.create_model("vlmrm-tiny").state_dict(), tmp_path / "good.pt")
    with zipfile.ZipFile(tmp_path / "good.pt") as source, zipfile.ZipFile(tmp_path / "newer.pt", "w") as newer:
        for item in source.infolist():  # the same file, its format version raised past what this torch reads
            newer.writestr(item, b"99\n" if item.filename.endswith("/version") else source.read(item))
    with pytest.raises(PretrainedWeightsError, match=r"newer PyTorch than this one \(file format version 99; torch "
                                                     r".* reads up to \d+\)\. Upgrade torch") as error:
        create_clip("vlmrm-tiny", str(tmp_path / "newer.pt"))
    assert "damaged" not in str(error.value) and "Download it again" not in str(error.value)


@pytest.mark.filterwarnings("ignore:'torch.load' received a zip file that looks like a TorchScript:UserWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 6), reason=(
    "torch < 2.6 loads a TorchScript archive by default (weights_only=False), and open_clip reads its state_dict"))
def test_a_torchscript_checkpoint_is_named_as_such_not_as_damaged(tmp_path):
    # OpenAI's clip package keeps its checkpoints as TorchScript archives; torch.load(weights_only=True) refuses
    # them, and that refusal read as a damaged file ("Download it again"), which no download fixes.
    class Tower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    torch.jit.script(Tower()).save(str(tmp_path / "ViT-B-32.pt"))
    with pytest.raises(PretrainedWeightsError, match=r"is a TorchScript archive .*open_clip.load_openai_model") as error:
        create_clip("vlmrm-tiny", str(tmp_path / "ViT-B-32.pt"))
    assert "damaged" not in str(error.value) and "weights_only" not in str(error.value)


def test_a_local_dir_that_does_not_exist_is_named_as_such(tmp_path):
    with pytest.raises(FileNotFoundError, match="there is no folder .*nowhere"):
        create_clip(f"local-dir:{tmp_path / 'nowhere'}", None)


def test_random_interpolation_is_read_as_bicubic_as_open_clips_eval_transform_does():
    # open_clip's eval transform takes interpolation "random" (a training setting) as bicubic.
    model, _ = make_tiny()
    model.visual.preprocess_cfg = {**model.visual.preprocess_cfg, "interpolation": "random", "resize_mode": None}
    spec = models.preprocess_spec_of(model, "openclip")
    assert (spec.resize_mode, spec.interpolation) == ("shortest", "bicubic")


def test_the_vlmrm_transform_ignores_a_config_that_squashes_or_resizes_bilinearly():
    # resize_mode/interpolation are read for preprocess="openclip" only; "vlmrm" is the paper's fixed transform.
    model, _ = make_tiny()
    model.visual.preprocess_cfg = {**model.visual.preprocess_cfg, "resize_mode": "squash", "interpolation": "bilinear"}
    spec = models.preprocess_spec_of(model, "vlmrm")
    assert (spec.mode, spec.resize_mode, spec.interpolation) == ("vlmrm", "shortest", "bicubic")
    assert models.preprocess_spec_of(model, "openclip").resize_mode == "squash"


def test_the_random_weights_warning_names_the_callers_line():
    # Raised a different number of calls below create_clip and CLIPReward.from_pretrained: both point at the line
    # that asked for the model (here), not at vlmrm_fast's own code.
    with pytest.warns(UserWarning, match="has random weights") as caught:
        create_clip("vlmrm-tiny", None)
    assert [w.filename for w in caught if "random weights" in str(w.message)] == [__file__]
    with pytest.warns(UserWarning, match="has random weights") as caught:
        CLIPReward.from_pretrained("vlmrm-tiny", None, goal="a robot", device="cpu")
    assert [w.filename for w in caught if "random weights" in str(w.message)] == [__file__]


def test_a_model_whose_tower_needs_a_missing_package_names_the_package_to_install(monkeypatch):
    # ViT-B-16-SigLIP without transformers failed with open_clip's bare "No module named 'transformers'".
    from vlmrm_fast import models

    def needs_transformers(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'transformers'", name="transformers")

    monkeypatch.setattr(models, "_create", needs_transformers)
    with pytest.raises(ModuleNotFoundError, match=r"'ViT-B-16-SigLIP' needs the 'transformers' package.*pip install "
                                                  r"transformers$") as error:
        models.create_clip("ViT-B-16-SigLIP", None)
    assert error.value.name == "transformers"

    def needs_protobuf(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'google.protobuf'", name="google.protobuf")

    monkeypatch.setattr(models, "_create", needs_protobuf)
    with pytest.raises(ModuleNotFoundError, match=r"pip install protobuf$"):
        models.create_clip("ViT-B-16-SigLIP", None)


def test_random_weights_are_the_same_under_a_float64_default_dtype():
    # torch.set_default_dtype(torch.float64) (common in RL code): the weights were drawn in float64, other values
    # from the same seed, so rewards moved by ~3e-2 against every other process. The caller's default stays.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        want = create_clip("vlmrm-tiny", None)[0].state_dict()
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            got = create_clip("vlmrm-tiny", None)[0].state_dict()
            assert torch.get_default_dtype() == torch.float64
        finally:
            torch.set_default_dtype(previous)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_random_weights_are_drawn_on_the_cpu_under_another_default_device():
    # torch.set_default_device("cuda") would draw them with the CUDA generator: other weights, and a CUDA RNG
    # that fork_rng(devices=[]) does not give back. "meta" stands in for it here (no values at all).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        want = create_clip("vlmrm-tiny", None)[0].state_dict()
        torch.set_default_device("meta")
        try:
            got = models._create("vlmrm-tiny", None, None).state_dict()
            assert torch.empty(1).device.type == "meta"  # the caller's default again
        finally:
            torch.set_default_device(None)
    assert all(got[k].device.type == "cpu" and torch.equal(want[k], got[k]) for k in want)


def test_random_weights_are_the_same_in_every_build_and_leave_the_global_rng_alone():
    # pretrained=None (`--pretrained none`): offline smoke runs compare across runs and backends only if their
    # weights do; and a build must not move the caller's RNG stream (their seeded frames, SAC's initialisation).
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        first, _ = create_clip("vlmrm-tiny", None)
        assert torch.equal(torch.random.get_rng_state(), before)
        torch.manual_seed(7)  # another global state: the same weights
        second = CLIPReward.from_pretrained("vlmrm-tiny", None, goal="a cat", device="cpu", backend="torch").model
    one, two = first.state_dict(), second.state_dict()
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k].cpu()) for k in one)
    assert not torch.equal(one["visual.proj"], make_tiny(seed=1)[0].state_dict()["visual.proj"])  # seeds differ
    # Another seed on request (an ensemble of random models; train draws them from its --seed), restored after.
    from vlmrm_fast.models import random_weights_seed

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with random_weights_seed(5):
            five = create_clip("vlmrm-tiny", None)[0].state_dict()["visual.proj"]
            assert torch.equal(five, create_clip("vlmrm-tiny", None)[0].state_dict()["visual.proj"])
        assert not torch.equal(five, one["visual.proj"])
        assert torch.equal(create_clip("vlmrm-tiny", None)[0].state_dict()["visual.proj"], one["visual.proj"])


@pytest.mark.parametrize("name,saved_as", [("open_clip_model.safetensors", "torch"),
                                           ("open_clip_pytorch_model.bin", "safetensors")])
@needs_local_dir
def test_a_local_dirs_file_in_the_other_format_is_told_a_name_the_folder_is_read_by(tmp_path, name, saved_as):
    # The fix for a file named as the other format was "a name ending in '.pt', and pass that": in a local-dir:
    # folder open_clip finds the weights by name and reads no '.pt' file, so following it loaded no weights at all.
    import json

    from safetensors.torch import save_file

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": open_clip.get_model_config("vlmrm-tiny"), "preprocess_cfg": {}}))
    state = {k: v.contiguous() for k, v in open_clip.create_model("vlmrm-tiny").state_dict().items()}
    (save_file if saved_as == "safetensors" else torch.save)(state, str(folder / name))
    with pytest.raises(PretrainedWeightsError, match=r"by its name alone.*: rename it to '([a-z_.]+)' in its folder") as error:
        create_clip(f"local-dir:{folder}", None)
    (folder / name).rename(folder / re.search(r"rename it to '([a-z_.]+)'", str(error.value)).group(1))
    create_clip(f"local-dir:{folder}", None)  # the fix given loads


@pytest.mark.skipif(not hasattr(open_clip.factory, "_find_checkpoint_in_dir"), reason="this open_clip has no local-dir:")
@pytest.mark.parametrize("files", [
    [], ["x.txt"], ["epoch_2.pth", "epoch_10.pth"], ["a.bin", "z.safetensors"], ["model.pth", "pytorch_model.bin"],
    ["open_clip_pytorch_model.bin", "open_clip_pytorch_model.safetensors", "model.safetensors"], ["b.safetensors"],
])
def test_local_dir_weights_is_the_file_open_clip_loads(tmp_path, files):
    # train records and checks this file's bytes: it must be the one open_clip's own search picks.
    from vlmrm_fast.models import local_dir_weights

    for name in files:
        (tmp_path / name).write_bytes(b"weights")
    found = open_clip.factory._find_checkpoint_in_dir(tmp_path)
    assert local_dir_weights(f"local-dir:{tmp_path}") == (None if found is None else Path(found))
    assert local_dir_weights("ViT-B-32") is None
