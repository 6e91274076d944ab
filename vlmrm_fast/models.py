"""Loading CLIP models through open_clip's registries, and what their towers expect.

``pretrained`` resolves, in this order, to: None (random weights, the same in every build: seeded with
:data:`RANDOM_WEIGHTS_SEED` or :func:`random_weights_seed`'s, the caller's RNG untouched; with a warning), one of open_clip's
pretrained tags for the model, or a local checkpoint file. Downloads go through open_clip's own
cache; when the hub cannot be reached, a tag is loaded from that cache or fails at once with an
error that says how to pass a local file instead (open_clip itself would retry for about a minute).
"""
from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
import re
import socket
import traceback
import urllib.request
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union, cast
from urllib.parse import urlparse

from vlmrm_fast.callers import stacklevel_outside_package
from vlmrm_fast.llvm_clash import guard_triton_load

guard_triton_load()  # open_clip's torchvision loads Triton: kept out where it may crash and is not needed

import open_clip  # noqa: E402
import torch  # noqa: E402

from vlmrm_fast.ops.preprocess import PreprocessMode, PreprocessSpec, mean_std_of
from vlmrm_fast.quiet_logging import root_records_dropped

TINY_MODEL = "vlmrm-tiny"
"""A tiny random-init CLIP (2 layers per tower, width 64, 224 px input) for tests and offline demos."""

_CONFIG_DIR = Path(__file__).parent / "model_configs"
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
_LOCAL_DIR_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
"""The weight files open_clip reads from a ``local-dir:`` folder (or a hub repo)."""
_LOCAL_DIR_NAMED = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                    "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")
"""The weight files open_clip picks by name in a ``local-dir:`` folder, in its order of preference; among other files
it takes the first by name, safetensors first (:func:`local_dir_weights`)."""
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


RANDOM_WEIGHTS_SEED = 0
"""The seed of random weights (``pretrained=None``) by default: every build of a model gives the same weights, in
any process and on any backend, so offline runs compare. Drawn from a generator of its own; the caller's RNG is
left as it was. :func:`random_weights_seed` picks another."""

_random_weights_seed = RANDOM_WEIGHTS_SEED


@contextlib.contextmanager
def _cpu_float32_defaults() -> Iterator[None]:
    """torch's default dtype float32 and default device the CPU inside, the caller's again after: random weights
    are drawn in them (under a caller's float64 default, or ``torch.set_default_device("cuda")``, whose
    generator draws other values and which ``fork_rng(devices=[])`` would not give back, the same seed gives
    other weights)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.device("cpu"):
            yield
    finally:
        torch.set_default_dtype(previous)


@contextlib.contextmanager
def random_weights_seed(seed: int) -> Iterator[None]:
    """Inside the block, random weights (``pretrained=None``: ``create_clip``, ``CLIPReward.from_pretrained``) are
    drawn with ``seed`` instead of :data:`RANDOM_WEIGHTS_SEED`: several random reward models (an ensemble), or a
    training run's own (``vlmrm-fast train`` draws them from its ``seed``)."""
    global _random_weights_seed
    before, _random_weights_seed = _random_weights_seed, int(seed)
    try:
        yield
    finally:
        _random_weights_seed = before


def names_a_file(pretrained: str) -> bool:
    """Whether ``pretrained`` (not a tag of the model) is meant as a checkpoint path, by its form: a folder in it,
    or a checkpoint's suffix; else it reads as a mistyped tag."""
    return os.sep in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES)


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were asked for but cannot be had (offline, unknown tag, bad checkpoint)."""


def register_model_configs() -> None:
    """Add our model configs (``vlmrm-tiny``) to open_clip's registry; safe to call again."""
    if TINY_MODEL not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_DIR)


register_model_configs()  # on import, so that open_clip.create_model("vlmrm-tiny") works after it


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (or ``HF_ENDPOINT``) answers a TCP connection within ``timeout``; behind
    a proxy (``HTTPS_PROXY`` and the like, which huggingface_hub uses), whether the proxy does."""
    # huggingface_hub's own reading of its switch: TRANSFORMERS_OFFLINE stands in for HF_HUB_OFFLINE when unset.
    offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "0"
    if offline.upper() in ("1", "ON", "YES", "TRUE"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    proxies = urllib.request.getproxies()
    proxy = proxies.get(endpoint.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(endpoint.hostname or ""):
        endpoint = urlparse(proxy if "://" in proxy else "http://" + proxy)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Make huggingface_hub answer from its cache only, without network retries."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - open_clip then has no hub downloads to silence
        yield
        return
    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def _quiet_open_clip_logs():
    """Keep open_clip's root-logger lines ("No pretrained weights loaded", "Failed to download")
    out of the user's output: our warnings and errors say the same with the fix."""
    return root_records_dropped(os.path.dirname(open_clip.__file__))


def check_model_name(model_name: str) -> None:
    """A ``ValueError`` suggesting close names where open_clip has no config called ``model_name``."""
    if model_name.startswith(("hf-hub:", "local-dir:")):
        return
    known = open_clip.list_models()
    if model_name not in known:
        close = difflib.get_close_matches(model_name, known, n=5, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"Unknown model {model_name!r}: open_clip has no config of that name.{hint} "
            "`open_clip.list_models()` lists them all; the tiny test model is 'vlmrm-tiny'."
        )


def _local_file_hint(model_name: str) -> str:
    return (
        f"To load weights without network, download the checkpoint once on a machine with network "
        f"(e.g. `open_clip.create_model({model_name!r}, pretrained=TAG)` fills ~/.cache/huggingface), "
        "or pass pretrained='/path/to/open_clip_pytorch_model.bin' (or .safetensors; on the command line "
        "--pretrained PATH), with the open_clip_config.json that comes with it in the same folder."
    )


def _config_quick_gelu(model_name: str) -> bool:
    return bool((open_clip.get_model_config(model_name) or {}).get("quick_gelu", False))


def _tag_quick_gelu(model_name: str, tag: str) -> bool:
    """Whether a tag's weights were trained with QuickGELU: its pretrained config says so (open_clip
    >= 2.29), or open_clip lists the tag under the model's "-quickgelu" config too (every version)."""
    if open_clip.get_pretrained_cfg(model_name, tag).get("quick_gelu", False):
        return True
    quick_name = f"{model_name}-quickgelu"
    return quick_name in open_clip.list_models() and tag in open_clip.list_pretrained_tags_by_model(quick_name)


def _create_from_tag(model_name: str, tag: str, cache_dir: Optional[str]) -> torch.nn.Module:
    online = _hub_reachable()
    context = contextlib.nullcontext() if online else _hub_offline()
    # Weights trained with QuickGELU (OpenAI's, MetaCLIP's, DFN's) get it, whatever the config says:
    # open_clip only warns, and GELU in their place gives other embeddings.
    quick_gelu = _tag_quick_gelu(model_name, tag)
    try:
        with context:
            return open_clip.create_model(model_name, pretrained=tag, cache_dir=cache_dir, require_pretrained=True,
                                          force_quick_gelu=quick_gelu and not _config_quick_gelu(model_name))
    except Exception as error:  # open_clip raises RuntimeError/FileNotFoundError/HTTP errors alike
        where = "the hub is unreachable (offline?) and they are not in the local cache" if not online else str(error)
        raise PretrainedWeightsError(
            f"Could not load pretrained weights {tag!r} for {model_name}: {where}. {_local_file_hint(model_name)}"
        ) from error


SIDECAR_CONFIG = "open_clip_config.json"
"""The config the Hugging Face hub keeps beside open_clip weights: their activation and preprocessing."""


def _not_a_checkpoint(path: str) -> Optional[str]:
    """Why the file at ``path`` cannot hold weights at all, or None. torch.load's own errors for these
    blame the architecture or suggest ``weights_only=False``: the wrong diagnosis, and an unsafe fix."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(64)
        if size == 0:
            return "it is empty"
        if head.startswith(b"version https://git-lfs"):
            return ("it is a git-lfs pointer, not the weights (a repository cloned without git-lfs; "
                    "`git lfs pull` there fetches them)")
        if head.startswith(b"PK\x03\x04"):  # torch.save's zip format
            return None if zipfile.is_zipfile(f) else "its zip archive has no end (a cut download?)"
        if head.startswith(b"\x80"):  # a pickle: torch.save's legacy format
            return None
        if head[8:9] == b"{":  # safetensors: the header's length (8 bytes), then the header, JSON
            length = int.from_bytes(head[:8], "little")
            f.seek(8)
            try:
                header = json.loads(f.read(length)) if 8 + length <= size else None
                ends = [t["data_offsets"][1] for name, t in header.items() if name != "__metadata__"] if header else []
            except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                return "its safetensors header cannot be read"
            if header is None or 8 + length + max(ends, default=0) > size:
                return "it is shorter than its safetensors header says (a cut download?)"
            return None
    return "it is neither a torch.save file (zip or pickle) nor a safetensors file"


def _not_a_checkpoint_error(path: Union[str, Path], why: str) -> PretrainedWeightsError:
    return PretrainedWeightsError(f"{str(path)!r} is not a checkpoint file: {why}. Download it again, or pass another.")


def _refuse_a_non_checkpoint(path: Union[str, Path], local_dir: bool = False) -> None:
    """Refuse a file that holds no weights, or whose format is not the one its name makes open_clip read it in;
    ``local_dir``: one of a ``local-dir:`` folder's files, which open_clip finds by their names."""
    why = _not_a_checkpoint(str(path))
    if why is not None:
        raise _not_a_checkpoint_error(path, why)
    # open_clip reads a file as safetensors by its name alone: an intact file of the other format read as damaged.
    with open(path, "rb") as f:
        head = f.read(9)
    safetensors = head[8:9] == b"{" and not head.startswith((b"PK\x03\x04", b"\x80"))
    if safetensors != str(path).endswith(".safetensors"):
        what, suffix = ("a safetensors file", "'.safetensors'") if safetensors else ("a torch.save file", "'.pt'")
        # In a local-dir: folder open_clip finds weights by name, and never a '.pt' file: the name it reads first.
        fix = (f"rename it to {_LOCAL_DIR_WEIGHTS[0 if safetensors else 1]!r} in its folder" if local_dir else
               f"rename it (or link it) to a name ending in {suffix}, and pass that")
        raise PretrainedWeightsError(
            f"{str(path)!r} is {what}, but open_clip reads a file as safetensors by its name alone (a name ending in "
            f"'.safetensors'), so it would read this one in the wrong format: {fix}."
        )


def _create_from_file(model_name: str, path: str) -> torch.nn.Module:
    """Weights from a file; their QuickGELU flag and preprocessing from an ``open_clip_config.json``
    beside it, else the model config's (with a warning where tags of the model differ from it)."""
    _refuse_a_non_checkpoint(path)
    sidecar = Path(path).with_name(SIDECAR_CONFIG)
    config = _read_sidecar(sidecar) if sidecar.is_file() else None
    model_cfg, preprocess = (config or {}).get("model_cfg") or {}, (config or {}).get("preprocess_cfg") or {}
    quick_gelu, config_quick_gelu = bool(model_cfg.get("quick_gelu", False)), _config_quick_gelu(model_name)
    # A whole model config without "quick_gelu" (as open_clip writes one for GELU weights) says GELU, as open_clip
    # reads it; an empty one says nothing.
    says = "quick_gelu" in model_cfg or any(key in model_cfg for key in ("embed_dim", "vision_cfg", "text_cfg"))
    if says and not quick_gelu and config_quick_gelu:
        warnings.warn(
            f"{sidecar} says its weights were trained with GELU, but {model_name} runs QuickGELU: load them with "
            f"the config of the same name without '-quickgelu'.", UserWarning, stacklevel=stacklevel_outside_package(),
        )
    try:
        # The sidecar's preprocessing goes through open_clip, which keeps the keys it knows; the input size
        # stays the model's (a checkpoint for another size is refused).
        with _position_embeddings_kept(model_name, path):
            model = open_clip.create_model(
                model_name, pretrained=path, require_pretrained=True,
                force_quick_gelu=quick_gelu and not config_quick_gelu,
                force_preprocess_cfg={k: v for k, v in preprocess.items() if k != "size"} or None)
    except PretrainedWeightsError:
        raise
    except StopIteration as error:  # open_clip reads the first key of what it loaded
        raise PretrainedWeightsError(f"The checkpoint {path!r} holds no weights (an empty state_dict).") from error
    except Exception as error:
        if isinstance(error, EOFError) or "unexpected EOF" in str(error) or "Ran out of input" in str(error):
            raise _not_a_checkpoint_error(path, "it ends early (a cut download?)") from error
        unreadable = _unreadable_checkpoint(error)
        if unreadable:
            raise PretrainedWeightsError(f"The checkpoint {path!r} {unreadable}") from error
        fits = _which_vit_fits(path, model_name)
        raise PretrainedWeightsError(
            f"The checkpoint {path!r} does not load into {model_name}"
            + (f": {fits}" if fits else f": {str(error)[:600].rstrip('.')}. Check that it was saved from this architecture (a "
               "state_dict of the open_clip model).")
        ) from error
    if config is None:
        _warn_if_tags_differ(model, model_name, path)
    return model


def _vit_shape(state_dict: Dict[str, Any]) -> Optional[Tuple[int, int, int, int, int]]:
    """(width, layers, patch size, image size, embedding width) of an open_clip ViT's vision tower, from its
    state_dict (or a model config's ``vision_cfg`` and ``embed_dim``); None where it is not such a ViT."""
    conv, proj = state_dict.get("visual.conv1.weight"), state_dict.get("visual.proj")
    positions = state_dict.get("visual.positional_embedding")
    if not (isinstance(conv, torch.Tensor) and isinstance(proj, torch.Tensor) and isinstance(positions, torch.Tensor)
            and conv.ndim == 4 and proj.ndim == 2):
        return None
    layers = {key.split(".")[3] for key in state_dict if key.startswith("visual.transformer.resblocks.")}
    grid = math.isqrt(max(positions.shape[0] - 1, 0))
    return int(conv.shape[0]), len(layers), int(conv.shape[-1]), grid * int(conv.shape[-1]), int(proj.shape[1])


def _config_vit_shape(model_name: str) -> Optional[Tuple[int, int, int, int, int]]:
    """:func:`_vit_shape` of an open_clip model config (None for a non-ViT or an unknown name)."""
    config = open_clip.get_model_config(model_name) or {}
    vision = config.get("vision_cfg") or {}
    shape = (vision.get("width"), vision.get("layers"), vision.get("patch_size"), vision.get("image_size"),
             config.get("embed_dim"))
    if not all(isinstance(v, int) for v in shape) or vision.get("timm_model_name"):
        return None
    return cast(Tuple[int, int, int, int, int], shape)


def _config_text_shape(model_name: str) -> Optional[Tuple[int, int]]:
    """(vocabulary, width) of a model config's own text tower, as its ``token_embedding.weight``; None for a
    Hugging Face text tower or a captioner's (CoCa)."""
    config = open_clip.get_model_config(model_name) or {}
    text = config.get("text_cfg") or {}
    if text.get("hf_model_name") or config.get("multimodal_cfg"):
        return None
    defaults = open_clip.model.CLIPTextCfg()
    return text.get("vocab_size", defaults.vocab_size), text.get("width", defaults.width)


def _which_vit_fits(path: str, model_name: str) -> Optional[str]:
    """What a checkpoint that does not load into ``model_name`` holds (a ViT's widths, layers and sizes) and
    the open_clip configs it fits: the rest of the error's sentence; None where that cannot be told."""
    try:  # memory-mapped where torch can (a zip checkpoint): the failed load's copy may still be held
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        state_dict = state_dict.get("state_dict", state_dict) if isinstance(state_dict, dict) else {}
        state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    except Exception:  # noqa: BLE001 - safetensors, a legacy pickle: open_clip's reader
        try:
            state_dict = open_clip.factory.load_state_dict(path)
        except Exception:  # noqa: BLE001 - the caller reports the load's own error instead
            return None
    found, wanted = _vit_shape(state_dict), _config_vit_shape(model_name)
    if found is None or wanted is None or found == wanted:
        return None
    show = lambda v: (f"width {v[0]}, {v[1]} layers, {v[2]} px patches, {v[3]} px input, "  # noqa: E731
                      f"{v[4]}-d embeddings")
    text = state_dict.get("token_embedding.weight")
    text_shape = tuple(text.shape) if isinstance(text, torch.Tensor) and text.ndim == 2 else None
    fits = [name for name in open_clip.list_models()
            if _config_vit_shape(name) == found and _config_text_shape(name) == text_shape]
    return (f"it holds a vision tower of {show(found)}, and {model_name}'s has {show(wanted)}. "
            + (f"It fits {', '.join(fits)}: pass that model name." if fits else
               "No open_clip config has that shape (and its text tower): pass the model it was saved from."))


def _unreadable_checkpoint(error: BaseException) -> Optional[str]:
    """Why torch could not read the checkpoint (the rest of the sentence), where ``error`` came from reading it
    rather than from fitting its weights to the model; else None. torch's own message for both cases below
    suggests ``weights_only=False``: an unsafe fix, and for a damaged file no fix at all."""
    if not any(frame.filename.endswith(os.path.join("torch", "serialization.py"))
               for frame in traceback.extract_tb(error.__traceback__)):
        return None
    pickled = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    if pickled:
        name = pickled.group(1)
        whole = ": a whole model saved with torch.save(model)?" if name.startswith(("open_clip.", "torch.nn.")) else ""
        return (f"holds a pickled Python object ({name}{whole}), which is not loaded, as unpickling it could run any "
                "code. Save the model's state_dict() (tensors only) instead, or build the reward from the model "
                "itself: CLIPReward(model, tokenizer, goal=...).")
    newer = re.search(r"PyTorch file with version (\d+), but the maximum supported version for reading is (\d+)",
                      str(error))
    if newer:  # intact, but written by a newer torch: no download fixes that
        return (f"was written by a newer PyTorch than this one (file format version {newer.group(1)}; torch "
                f"{torch.__version__} reads up to {newer.group(2)}). Upgrade torch, or save the weights again with "
                "this version.")
    if "TorchScript archive" in str(error):  # intact: OpenAI's clip package saves its checkpoints so
        return ("is a TorchScript archive (torch.jit.save; OpenAI's own CLIP checkpoints, ~/.cache/clip/*.pt, are), "
                "not a state_dict, and is not loaded, as TorchScript runs the file's own code. Use the model's open_clip "
                "tag ('openai' for OpenAI's weights), or, trusting the file, build the model from it and pass that: "
                "model = open_clip.load_openai_model(path, precision='fp32', device='cpu'); CLIPReward(model, "
                "open_clip.get_tokenizer(model_name), goal=...).")
    return (f"cannot be read: its data is damaged ({type(error).__name__}: {_damage_detail(str(error))[:200]}). "
            "Download it again, or pass another.")


def _damage_detail(message: str) -> str:
    """What torch's message on a checkpoint it cannot read says of the data, without its ``weights_only``
    advice: its "Unsupported ..." words (their own line from torch 2.5 on, the end of one in torch 2.4), else
    its last line that gives no such advice."""
    unsupported = re.search(r"Unsupported[^\n]*", message)
    if unsupported:
        return unsupported.group(0).strip()
    lines = [line.strip() for line in message.splitlines() if line.strip() and "weights_only" not in line]
    return lines[-1] if lines else "no detail given"


def _read_sidecar(path: Path) -> dict:
    """An ``open_clip_config.json``: a dict whose ``model_cfg`` and ``preprocess_cfg`` are dicts (or absent)."""
    try:
        config = json.loads(path.read_text())
        ok = isinstance(config, dict) and all(isinstance(config.get(k) or {}, dict) for k in ("model_cfg", "preprocess_cfg"))
    except (OSError, ValueError) as error:
        raise PretrainedWeightsError(f"{path} cannot be read as JSON ({error}): fix or remove it.") from None
    if not ok:
        raise PretrainedWeightsError(
            f"{path} is not an open_clip config (a JSON object with 'model_cfg' and 'preprocess_cfg' objects): "
            "fix or remove it."
        )
    for key in ("mean", "std"):
        values = (config.get("preprocess_cfg") or {}).get(key)
        if values is not None and not _three_finite(values, positive=key == "std"):
            raise PretrainedWeightsError(
                f"{path}: preprocess_cfg.{key} is {values!r}, not three finite numbers"
                + (" above 0" if key == "std" else "") + " (one per RGB channel): fix or remove it."
            )
    return config


def _three_finite(values, *, positive: bool) -> bool:
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        return False
    return len(numbers) == 3 and all(math.isfinite(v) and (v > 0 or not positive) for v in numbers)


def _openclip_resampling(cfg: dict) -> Tuple[str, str]:
    """(resize_mode, interpolation) of an open_clip preprocess config as its eval transform reads them:
    unset is "shortest" and "bicubic", and "random" interpolation is bicubic."""
    interpolation = cfg.get("interpolation") or "bicubic"
    return cfg.get("resize_mode") or "shortest", "bicubic" if interpolation == "random" else interpolation


def _warn_if_tags_differ(model: torch.nn.Module, model_name: str, path: str) -> None:
    """Weights from a bare file get the model config's activation and normalisation; say so where some
    of the model's tags were trained with others, since the file may hold one of those."""
    current = getattr(model.visual, "preprocess_cfg", {})
    quick = _config_quick_gelu(model_name)
    differing = []
    for tag in open_clip.list_pretrained_tags_by_model(model_name):
        cfg = open_clip.get_pretrained_cfg(model_name, tag)
        what = []
        if "mean" in cfg and (mean_std_of(cfg["mean"]) != mean_std_of(current.get("mean", _OPENAI_MEAN))
                              or mean_std_of(cfg["std"]) != mean_std_of(current.get("std", _OPENAI_STD))):
            what.append(f"mean {tuple(cfg['mean'])} std {tuple(cfg['std'])}")
        tag_quick = _tag_quick_gelu(model_name, tag)
        if tag_quick != quick:
            what.append("QuickGELU" if tag_quick else "GELU")
        resampling = _openclip_resampling(cfg)
        if resampling != _openclip_resampling(current):
            what.append("{} {} resize with preprocess='openclip'".format(*resampling))
        if what:
            differing.append(f"{tag} ({', '.join(what)})")
    if differing:
        warnings.warn(
            f"{path} is loaded with {model_name}'s own settings ({'QuickGELU' if quick else 'GELU'}, normalisation "
            f"mean {tuple(current.get('mean', _OPENAI_MEAN))} std {tuple(current.get('std', _OPENAI_STD))}), as no "
            f"{SIDECAR_CONFIG} is beside it. Weights of these tags need others: {'; '.join(differing)}. If the file "
            f"holds one of them, put that tag's {SIDECAR_CONFIG} (downloaded with the weights from the Hugging Face "
            "hub) in the same folder, or load it by its tag.",
            UserWarning,
            stacklevel=stacklevel_outside_package(),
        )


@contextlib.contextmanager
def _position_embeddings_kept(model_name: str, path: str) -> Iterator[None]:
    """While ``path`` loads: open_clip interpolates position embeddings of another length to fit, without
    a word (weights for another image size or context length: another model); here that is refused, as is a
    vision tower's state_dict alone (whose position embeddings would read as the text tower's)."""
    factory = open_clip.factory
    originals = {name: getattr(factory, name) for name in ("resize_pos_embed", "resize_text_pos_embed")
                 if hasattr(factory, name)}

    def guarded(name: str) -> Callable:
        def check(state_dict, model, *args, **kwargs):
            _refuse_transformers_weights(state_dict, path)
            _refuse_wrapped_weights(state_dict, model, path)
            _refuse_a_tower_alone(state_dict, model, path)
            if name == "resize_pos_embed":
                keys, target = ("visual.positional_embedding",), getattr(model.visual, "positional_embedding", None)
            else:
                keys = ("positional_embedding", "text.positional_embedding")
                target = getattr(model, "positional_embedding", getattr(getattr(model, "text", None), "positional_embedding", None))
            saved = next((state_dict[k] for k in keys if k in state_dict), None)
            if saved is not None and isinstance(target, torch.Tensor) and tuple(saved.shape) != tuple(target.shape):
                if tuple(saved.shape[1:]) != tuple(target.shape[1:]):
                    return None  # another width: another architecture, which the strict load reports as such
                what = (f"image or patch size: its vision tower has {saved.shape[0]} position embeddings, "
                        f"{model_name}'s {target.shape[0]} (patches + class token); pick the config of its input "
                        "and patch size (such as the '-256' variants for 256 px weights)" if name == "resize_pos_embed"
                        else f"text context length: {saved.shape[0]} positions, {model_name} has {target.shape[0]}")
                raise PretrainedWeightsError(f"The checkpoint {path!r} is for another {what}.")
            return originals[name](state_dict, model, *args, **kwargs)

        return check

    for name in originals:
        setattr(factory, name, guarded(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(factory, name, original)


def _refuse_transformers_weights(state_dict: dict, path: str) -> None:
    """A Hugging Face transformers ``CLIPModel``'s weights (``text_model.*``, ``vision_model.*``: a hub repo's
    ``model.safetensors`` or ``pytorch_model.bin``) are named as such: open_clip's keys are other ones."""
    names = [name for name in state_dict if isinstance(name, str)]
    if any(n.startswith("text_model.") for n in names) and any(n.startswith("vision_model.") for n in names):
        raise PretrainedWeightsError(
            f"The checkpoint {path!r} holds a Hugging Face transformers CLIPModel's weights (text_model.*, "
            "vision_model.* keys), which open_clip does not read: pass open_clip's weights of that model instead (the "
            "hub repo's open_clip_model.safetensors or open_clip_pytorch_model.bin, with its open_clip_config.json, "
            "where it has them; OpenAI's are the open_clip tag 'openai')."
        )


def _refuse_wrapped_weights(state_dict: dict, model: torch.nn.Module, path: str) -> None:
    """Weights saved under another key (``{"model": state_dict, "optimizer": ...}``) or with a wrapper's prefix on
    every key (torch.compile's ``_orig_mod.``; open_clip strips DataParallel's ``module.`` alone) are named as such,
    with the fix: the strict load would list every key as missing and blame the architecture."""
    wanted = set(model.state_dict()) if isinstance(model, torch.nn.Module) else set()
    if not wanted or wanted & set(state_dict):
        return
    places = [(None, state_dict)] + [(key, inner) for key, inner in state_dict.items() if isinstance(inner, dict)]
    for key, inner in places:
        names = [name for name in inner if isinstance(name, str)]
        first = names[0] if names else ""
        for prefix in {first[: len(first) - len(w)] for w in wanted if first.endswith(w)}:
            if (prefix and not prefix.endswith(".")) or not all(name.startswith(prefix) for name in names):
                continue
            if len(wanted & {name[len(prefix):] for name in names}) < max(len(wanted) // 2, 1):
                continue
            where = f" under its key {key!r} (a training checkpoint's)" if key is not None else ""
            strip = f" with {prefix!r} before every key (torch.compile's, or another wrapper's)" if prefix else ""
            fix = (f"torch.save(torch.load(path)[{key!r}], new_path) keeps them alone" if key is not None and not prefix
                   else "save the bare model's state_dict() (model._orig_mod's for a torch.compile'd model, "
                        f"model.module's under DataParallel/DDP), or what you saved with {prefix!r} taken off each key")
            raise PretrainedWeightsError(
                f"The checkpoint {path!r} holds the model's weights{where}{strip}, not as the model's own state_dict: "
                f"{fix}; pass that file."
            )


def _refuse_a_tower_alone(state_dict: dict, model: torch.nn.Module, path: str) -> None:
    """A ``model.visual.state_dict()`` (no ``visual.`` prefix, no text tower) is named as such. Its keys are told
    by those no key of the whole model shares (CLIP's text tower has ``transformer.resblocks.*`` and
    ``positional_embedding`` too: the whole model's state_dict without ``visual.*`` is no vision tower)."""
    visual = getattr(model, "visual", None)
    if visual is None or any(key.startswith("visual.") for key in state_dict):
        return
    tower_keys = set(visual.state_dict()) - set(model.state_dict())
    if tower_keys and len(tower_keys & set(state_dict)) >= max(len(tower_keys) // 2, 1):
        raise PretrainedWeightsError(
            f"The checkpoint {path!r} holds a vision tower's weights alone (model.visual.state_dict()), without the "
            "text tower the prompts need: save the whole model's state_dict(), or load these into model.visual "
            "yourself and pass the model: CLIPReward(model, tokenizer, goal=...)."
        )


def create_clip(
    model_name: str, pretrained: Union[str, os.PathLike, None], *, cache_dir: Union[str, os.PathLike, None] = None
) -> Tuple[torch.nn.Module, Callable]:
    """An open_clip model (float32, CPU, eval mode) and its tokenizer.

    Args:
        model_name: an open_clip model name ("ViT-B-32", "vlmrm-tiny", "hf-hub:org/repo", "local-dir:PATH").
        pretrained: an open_clip tag for that model, a local checkpoint path, or None for random weights (the
            same in every build, from :data:`RANDOM_WEIGHTS_SEED` or :func:`random_weights_seed`'s; the global torch
            RNG is left as it was).
        cache_dir: where downloads are cached (open_clip's default when None).
    Raises:
        ValueError: unknown model name or tag. FileNotFoundError: a checkpoint path that does not exist.
        PretrainedWeightsError: weights that cannot be downloaded or do not fit the model.
    """
    if not isinstance(model_name, str):
        raise TypeError(f"model_name must be an open_clip model name (a str such as 'ViT-B-32'); got "
                        f"{type(model_name).__name__} {model_name!r}. For a checkpoint file, give its path as pretrained=.")
    check_model_name(model_name)
    if model_name.startswith("local-dir:"):  # open_clip reads the folder's path as given: with "~" it finds none
        model_name = "local-dir:" + os.path.expanduser(model_name[len("local-dir:"):])
    if isinstance(pretrained, os.PathLike):
        pretrained = os.fspath(pretrained)
    if pretrained is not None and not isinstance(pretrained, str):
        raise TypeError(f"pretrained must be an open_clip tag or a checkpoint path (str or path), or None for random "
                        f"weights; got {type(pretrained).__name__} {pretrained!r}.")
    if cache_dir is not None:
        if not isinstance(cache_dir, (str, os.PathLike)):
            raise TypeError(f"cache_dir must be a folder path (str or path) or None; got {type(cache_dir).__name__}.")
        cache_dir = os.fspath(cache_dir)
    try:
        with _quiet_open_clip_logs():  # the tokenizer too: its logging.info would configure the root logger
            model = _create(model_name, pretrained, cache_dir)
            # an hf-hub: model's config (naming its tokenizer) and a Hugging Face tokenizer's files are in that cache
            tokenizer = open_clip.get_tokenizer(model_name, cache_dir=cache_dir)
    except ModuleNotFoundError as exc:  # open_clip imports a tower's or tokenizer's library only when asked for it
        if not exc.name:
            raise
        package = _PIP_NAMES.get(exc.name.split(".")[0], exc.name.split(".")[0])
        raise ModuleNotFoundError(
            f"{model_name!r} needs the {exc.name!r} package, which open_clip imports for this model's towers or "
            f"tokenizer (SigLIP and other Hugging Face text towers: transformers; timm vision towers: timm): "
            f"pip install {package}", name=exc.name) from exc
    model.eval()
    return model, tokenizer


# Import names whose pip package is named otherwise.
_PIP_NAMES = {"google": "protobuf", "PIL": "pillow"}


def _create(model_name: str, pretrained: Optional[str], cache_dir: Optional[str]) -> torch.nn.Module:
    if model_name.startswith(("hf-hub:", "local-dir:")):
        if pretrained is not None:
            raise ValueError(f"{model_name!r} names its own weights; pass pretrained=None with it.")
        if model_name.startswith("hf-hub:") and not _hub_reachable():
            try:  # from the local cache, as a tag is
                with _hub_offline():
                    return open_clip.create_model(model_name, cache_dir=cache_dir, require_pretrained=True)
            except Exception as exc:
                raise PretrainedWeightsError(
                    f"{model_name!r} needs the Hugging Face hub, which is unreachable (offline?), and it is not in "
                    "the local cache. Download the repo once elsewhere and pass 'local-dir:/path/to/it' instead."
                ) from exc
        if model_name.startswith("local-dir:"):
            folder = Path(os.path.expanduser(model_name[len("local-dir:"):]))
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"{model_name!r}: there is no folder {str(folder)!r}. Pass 'local-dir:' and the path of a folder "
                    "holding open_clip_config.json and its weights (a Hugging Face hub repo downloaded there)."
                )
            config = folder / SIDECAR_CONFIG  # the model's whole architecture there: read by open_clip alone
            if not config.is_file():
                raise FileNotFoundError(
                    f"{model_name!r}: the folder has no {SIDECAR_CONFIG}, which gives the model's architecture there: "
                    "put the one that came with the weights in it, or pass the weights file with the open_clip model "
                    "it fits: create_clip('ViT-B-32', '/path/to/weights.pt') (command line: --model, --pretrained)."
                )
            if not _read_sidecar(config).get("model_cfg"):  # a dict where there is one
                raise PretrainedWeightsError(f"{config} has no 'model_cfg' (the model's architecture), which a "
                                             "'local-dir:' folder's config needs: use the one that came with the weights.")
            for name in _LOCAL_DIR_WEIGHTS:
                if (folder / name).is_file():
                    _refuse_a_non_checkpoint(folder / name, local_dir=True)
            _refuse_several_weights(folder)
        try:  # open_clip only logs (and builds random weights) where the folder or repo holds none
            return open_clip.create_model(model_name, cache_dir=cache_dir, require_pretrained=True)
        except Exception as exc:
            if not isinstance(exc, RuntimeError) or "required" not in str(exc).lower():  # found, not loadable
                raise PretrainedWeightsError(f"{model_name!r}: its weights do not load into its config: "
                                             f"{type(exc).__name__}: {exc}") from exc
            raise PretrainedWeightsError(
                f"{model_name!r}: no weights were loaded ({exc}). The folder or repo must hold "
                "open_clip_pytorch_model.bin (or open_clip_model.safetensors) beside its open_clip_config.json."
            ) from exc
    if pretrained is None:
        warnings.warn(
            f"{model_name} has random weights (no pretrained weights asked for): its rewards carry no meaning. "
            "Pass an open_clip tag or a checkpoint path for a real reward model.",
            UserWarning,
            stacklevel=stacklevel_outside_package(),
        )
        with torch.random.fork_rng(devices=[]), _cpu_float32_defaults():  # on the CPU: its generator alone draws them
            torch.manual_seed(_random_weights_seed)
            return open_clip.create_model(model_name)
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained in tags:
        return _create_from_tag(model_name, pretrained, cache_dir)
    pretrained = os.path.expanduser(pretrained)
    if os.path.isfile(pretrained):
        return _create_from_file(model_name, pretrained)
    if os.path.isdir(pretrained):
        raise ValueError(f"{pretrained!r} is a folder, not a checkpoint file: pass the file in it, or, for a folder "
                         f"holding open_clip_config.json and its weights, model_name='local-dir:{pretrained}' "
                         "with pretrained=None.")
    if names_a_file(pretrained):
        raise FileNotFoundError(
            f"No checkpoint file at {pretrained!r}. Pass an existing path, or "
            + (f"one of open_clip's tags for {model_name}: {tags}." if tags else
               f"pretrained=None for random weights (command line: --pretrained none): open_clip has no tags for "
               f"{model_name}.")
        )
    if not tags:
        raise ValueError(
            f"{pretrained!r} is neither an open_clip pretrained tag for {model_name} nor a file, and open_clip has "
            f"no tags for {model_name}: pass a checkpoint path, or pretrained=None for random weights "
            f"(command line: --pretrained none)."
        )
    raise ValueError(
        f"{pretrained!r} is neither an open_clip pretrained tag for {model_name} nor a file. "
        f"Tags for {model_name}: {tags}; or a checkpoint path."
    )


def _weight_files(folder: Path) -> List[str]:
    """The names of the weight files in a ``local-dir:`` folder, in the order open_clip (>= 3) considers them."""
    return sorted((p.name for pattern in ("*.safetensors", "*.bin", "*.pth") for p in folder.glob(pattern) if p.is_file()),
                  key=lambda name: (not name.endswith(".safetensors"), name))


def local_dir_weights(model_name: str) -> Optional[Path]:
    """The weights file open_clip loads for a ``local-dir:FOLDER`` model (absolute), as open_clip picks it: the first
    of :data:`_LOCAL_DIR_NAMED` there, else the first weight file (a folder of several such files, :func:`create_clip`
    refuses); None for other models or a folder with none."""
    if not model_name.startswith("local-dir:"):
        return None
    folder = Path(os.path.expanduser(model_name[len("local-dir:"):])).absolute()
    files = _weight_files(folder) if folder.is_dir() else []
    named = [name for name in _LOCAL_DIR_NAMED if name in files]
    return folder / (named or files)[0] if files else None


def _refuse_several_weights(folder: Path) -> None:
    """Refuse a ``local-dir:`` folder holding several weight files, none of the names open_clip picks: it would load
    the first by name (``epoch_10`` before ``epoch_2``) with only a log line, which is kept out of the output."""
    files = _weight_files(folder)
    if len(files) > 1 and not set(files) & set(_LOCAL_DIR_NAMED):
        raise PretrainedWeightsError(
            f"'local-dir:{folder}' holds several weight files, {files}, and open_clip would load {files[0]!r} for no "
            f"reason but its name: keep the one you mean in the folder alone (or name it {_LOCAL_DIR_WEIGHTS[0]!r} if it "
            f"is a safetensors file, {_LOCAL_DIR_WEIGHTS[1]!r} if a torch.save one)."
        )


def image_size_of(model: torch.nn.Module) -> Tuple[int, int]:
    """(height, width) of the vision tower's input."""
    size = getattr(model.visual, "image_size", None)
    if size is None:
        size = getattr(model.visual, "preprocess_cfg", {}).get("size")
    if size is None:
        raise ValueError("Cannot tell the vision tower's input size: model.visual has no image_size.")
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def preprocess_spec_of(model: torch.nn.Module, mode: str) -> PreprocessSpec:
    """The tower's input size and normalisation, read from the model's open_clip preprocess config.

    With ``mode="openclip"`` the config's ``resize_mode`` and ``interpolation`` come along too (DFN,
    SigLIP and CLIPA tags squash; MobileCLIP, CLIPA and PE resize bilinearly); ``"vlmrm"`` is the
    paper's fixed transform whatever the config says.
    """
    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    mean = cfg.get("mean", getattr(model.visual, "image_mean", None) or _OPENAI_MEAN)
    std = cfg.get("std", getattr(model.visual, "image_std", None) or _OPENAI_STD)
    resampling: Dict[str, Any] = {}  # strings from the config, like mode: PreprocessSpec checks them
    if mode == "openclip":
        resampling = dict(zip(("resize_mode", "interpolation"), _openclip_resampling(cfg)))
    return PreprocessSpec(
        size=image_size_of(model), mean=mean_std_of(mean), std=mean_std_of(std), mode=cast(PreprocessMode, mode),
        **resampling,
    )
