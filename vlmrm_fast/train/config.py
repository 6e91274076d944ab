"""Training configuration: :class:`TrainConfig`, presets, config files and overrides.

A run's configuration is built in layers, later ones winning:

1. the defaults of :class:`TrainConfig` (the paper's settings, SPEC §1.3);
2. a preset (``--preset kneeling`` or ``--preset smoke``), see :data:`PRESETS`;
3. a config file (``--config run.toml``; TOML, or JSON for ``.json``) of flat ``key = value`` pairs
   (tables such as ``[sac]`` are allowed and flattened: their keys are the field names);
4. command-line overrides: ``--set key=value`` (value read as TOML, e.g. ``--set alpha=0.5``,
   ``--set 'goal=["a", "b"]'``, else as a plain string) and the explicit flags of ``vlmrm-fast train``.

The effective configuration is written to ``RUN_DIR/config.json`` and into every checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import difflib
import functools
import hashlib
import importlib
import json
import math
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional, Union, get_args, get_origin, get_type_hints

from vlmrm_fast.argtypes import BACKEND_NAMES, FLOAT32_MAX, dtype_name, undecoded_byte

tomllib: Optional[ModuleType]  # None: Python < 3.11 without tomli (TOML configs refused, JSON read)
if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python < 3.11
    try:  # imported by name: the same type to mypy whether or not tomli is installed
        tomllib = importlib.import_module("tomli")
    except ImportError:
        tomllib = None

TEXTURED_HUMANOID = "vlmrm_fast/TexturedHumanoid-v0"
REWARD_MODES = ("replace", "add", "log")
REWARD_TIMINGS = ("step", "deferred")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _parse_device(name: str) -> Any:
    from vlmrm_fast.backends.base import parse_device  # here: reading a config needs no torch otherwise

    return parse_device(name)


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with its documentation (shown by ``vlmrm-fast train --help``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=functools.partial(type(default), default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Everything that defines a VLM-RM training run (SAC on CLIP rewards).

    Defaults are the paper's humanoid setup (SPEC §1.3). Each field's ``metadata["help"]`` is its
    documentation; ``vlmrm-fast train --help`` lists them all.
    """

    # ---- environment
    env_id: str = _f(TEXTURED_HUMANOID, "gymnasium env id; it must render RGB frames with render_mode='rgb_array'")
    env_kwargs: dict = _f({}, "extra keyword arguments for gymnasium.make (TOML table / JSON object)")
    n_envs: int = _f(32, "number of environments stepped together (one DummyVecEnv)")
    episode_length: int = _f(100, "fixed episode length in env steps (passed as max_episode_steps)")
    render_width: Optional[int] = _f(None, "width of the frames scored by the reward model (default: the model's input size)")
    render_height: Optional[int] = _f(None, "height of the frames scored by the reward model (default: the model's input size)")

    # ---- reward model
    model: str = _f("ViT-bigG-14", "open_clip model name (vlmrm-tiny: the tiny random model for tests)")
    pretrained: Optional[str] = _f("laion2b_s39b_b160k", "open_clip tag, a local checkpoint path, or none (random weights)")
    goal: list = _f(["a humanoid robot kneeling"], "goal prompt(s); several are averaged")
    baseline: list = _f(["a humanoid robot"], "baseline prompt(s); several are averaged (used when alpha > 0; none: no baseline)")
    alpha: float = _f(0.0, "goal-baseline regularisation strength in [0, 1]")
    preprocess: str = _f("vlmrm", "frame preprocessing: vlmrm (the original's squash) or openclip")
    reward_mode: str = _f("replace", "replace: reward = VLM; add: env reward + weight * VLM; log: env reward, VLM only logged")
    reward_weight: float = _f(1.0, "weight of the VLM reward in add mode")
    reward_timing: str = _f("deferred", "step: rewards per env step, batched over envs; deferred: frames of a whole rollout scored in one batch before the gradient steps (the paper)")
    reward_device: Optional[str] = _f(None, "torch device of the reward model and of the deferred frame buffer (default: cuda if available)")
    reward_dtype: str = _f("auto", "vision-tower precision: auto, float32, bfloat16, float16")
    reward_backend: str = _f("auto", "vision-tower backend: auto, torch, compile, onnxruntime, tensorrt")
    reward_batch_size: Optional[int] = _f(None, "frames per reward-model call (default: the model's, 256 on CUDA, 32 on CPU)")

    # ---- SAC (stable-baselines3)
    learning_rate: float = _f(6e-4, "SAC learning rate")
    batch_size: int = _f(512, "SAC minibatch size")
    gamma: float = _f(0.95, "discount factor")
    tau: float = _f(0.005, "target network soft-update coefficient")
    learning_starts: int = _f(50_000, "env steps (over all envs) of random actions before learning")
    train_freq: int = _f(100, "rollout length: vector-env steps collected between training phases")
    gradient_steps: int = _f(100, "gradient steps per training phase (paper: 100 per 100 env steps)")
    buffer_size: int = _f(1_000_000, "replay buffer capacity in transitions")
    ent_coef: str = _f("auto", "SAC entropy coefficient ('auto' or a number)")
    net_arch: list = _f([256, 256], "hidden layer sizes of actor and critics")
    sac_device: str = _f("auto", "torch device of the SAC networks")
    total_timesteps: int = _f(10_000_000, "total env steps (over all envs)")
    seed: int = _f(0, "random seed (envs, SAC, action sampling)")

    # ---- outputs
    run_dir: Optional[str] = _f(None, "output folder (default: runs/<preset or 'run'>-<time>-<pid>)")
    checkpoint_every: int = _f(100_000, "env steps between checkpoints (0: only at the end and on SIGINT/SIGTERM)")
    keep_checkpoints: int = _f(2, "how many of the newest checkpoints to keep")
    eval_every: int = _f(100_000, "env steps between evaluation videos (0: never)")
    eval_episodes: int = _f(1, "episodes per evaluation (the first is recorded)")
    video_width: int = _f(480, "evaluation video width")
    video_height: int = _f(480, "evaluation video height")
    video_length: Optional[int] = _f(None, "frames per evaluation video (default: the episode length)")
    tensorboard: bool = _f(True, "write TensorBoard logs to RUN_DIR/tb")
    log_every: int = _f(0, "env steps between TensorBoard dumps (0: every rollout)")
    progress: bool = _f(True, "show a progress bar with steps/s (where stderr is a file or a pipe, a job's log: a line a minute)")

    # ------------------------------------------------------------------------- helpers

    def to_dict(self) -> dict:
        """Plain JSON-able dict of all fields."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "TrainConfig":
        """Build from a dict, checking names and types (unknown keys: ``ValueError`` naming them)."""
        return apply_overrides(cls(), data, source)

    def validate(self) -> "TrainConfig":
        """Check values; raises ``ValueError`` naming the field and the fix. Returns self."""
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        need(self.n_envs >= 1, f"n_envs must be >= 1, got {self.n_envs}")
        need(self.episode_length >= 1, f"episode_length must be >= 1, got {self.episode_length}")
        need("max_episode_steps" not in self.env_kwargs,
             f"env_kwargs sets max_episode_steps={self.env_kwargs.get('max_episode_steps')!r}, which the run sets "
             "from episode_length: give episode_length instead (--episode-length N, or --set episode_length=N)")
        for name in ("render_width", "render_height"):
            value = getattr(self, name)
            need(value is None or value >= 1,
                 f"{name} must be a positive number of pixels (or none for the model's input size), got {value}")
        need(self.video_width >= 1 and self.video_height >= 1,
             f"video_width/video_height must be positive, got {self.video_width}x{self.video_height}")
        need(0.0 <= self.alpha <= 1.0, f"alpha must be in [0, 1], got {self.alpha}")
        need(self.reward_mode in REWARD_MODES, f"reward_mode must be one of {', '.join(REWARD_MODES)}, got {self.reward_mode!r}")
        need(self.reward_timing in REWARD_TIMINGS,
             f"reward_timing must be one of {', '.join(REWARD_TIMINGS)}, got {self.reward_timing!r}")
        need(self.reward_dtype in DTYPES,
             f"reward_dtype must be one of {', '.join(DTYPES)} (or fp32, bf16, fp16), got {self.reward_dtype!r}")
        need(self.reward_backend in ("auto", *BACKEND_NAMES),
             f"reward_backend must be one of auto, {', '.join(BACKEND_NAMES)}, got {self.reward_backend!r}")
        need(self.preprocess in ("vlmrm", "openclip"), f"preprocess must be vlmrm or openclip, got {self.preprocess!r}")
        need(bool(self.goal) and all(isinstance(g, str) and g.strip() for g in self.goal),
             "goal needs at least one prompt, none blank")
        need(all(isinstance(b, str) and b.strip() for b in self.baseline), "baseline prompts must be non-blank strings")
        for prompt in (*self.goal, *self.baseline):  # as CLIPReward refuses them, but before the envs are made
            need(undecoded_byte(prompt) is None,
                 f"the prompt {prompt!r} is not text: it holds a byte that is not UTF-8, from a terminal or file in "
                 "another encoding; retype it as UTF-8")
        need(self.alpha == 0 or bool(self.baseline), "alpha > 0 needs a baseline prompt; set baseline or alpha = 0")
        need(self.reward_batch_size is None or self.reward_batch_size >= 1, "reward_batch_size must be >= 1 (or none)")
        need(abs(self.reward_weight) <= FLOAT32_MAX,  # NaN fails too
             "reward_weight must be finite and within float32's range (the rewards' type)")
        need(self.batch_size >= 1 and self.train_freq >= 1 and self.gradient_steps >= 0,
             "batch_size and train_freq must be >= 1, gradient_steps >= 0")
        need(self.learning_starts >= 0, "learning_starts must be >= 0")
        need(math.isfinite(self.learning_rate) and self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        need(0.0 < self.gamma <= 1.0, f"gamma (discount) must be in (0, 1], got {self.gamma}")
        need(0.0 < self.tau <= 1.0, f"tau (target smoothing) must be in (0, 1], got {self.tau}")
        need(bool(self.net_arch) and all(isinstance(n, int) and n >= 1 for n in self.net_arch),
             f"net_arch must be positive layer sizes, got {self.net_arch}")
        need(self.buffer_size >= self.train_freq * self.n_envs,
             f"buffer_size ({self.buffer_size} transitions) must hold at least one rollout (train_freq x n_envs = "
             f"{self.train_freq} x {self.n_envs}); raise buffer_size")
        need(self.total_timesteps >= 1, "total_timesteps must be >= 1")
        need(self.checkpoint_every >= 0 and self.eval_every >= 0 and self.log_every >= 0,
             "checkpoint_every, eval_every and log_every must be >= 0")
        need(self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1")
        need(self.eval_episodes >= 1, "eval_episodes must be >= 1")
        need(self.video_length is None or self.video_length >= 1, "video_length must be >= 1 (or none)")
        need(self.reward_device is None or _parse_device(self.reward_device) is not None,
             f"reward_device {self.reward_device!r} is not a torch device: pass cuda, cuda:N or cpu (or none)")
        need(self.reward_device is None or _parse_device(self.reward_device).type in ("cpu", "cuda"),
             f"reward_device={self.reward_device!r}: vlmrm_fast runs on CUDA GPUs and the CPU; pass cuda, cuda:N or "
             "cpu (or none)")
        need(0 <= self.seed < 2**32, f"seed must be in [0, 2**32) (numpy and gymnasium seeds), got {self.seed}")
        if self.ent_coef != "auto":
            # SB3 asserts on these deep inside SAC, after the env and the reward model are built.
            automatic = self.ent_coef.startswith("auto_")
            try:
                value = float(self.ent_coef[len("auto_"):] if automatic else self.ent_coef)
            except ValueError:
                value = math.nan
            need(math.isfinite(value) and (value > 0 if automatic else value >= 0),
                 f"ent_coef must be 'auto', 'auto_<initial value > 0>' (e.g. auto_0.1) or a number >= 0, "
                 f"got {self.ent_coef!r}")
        return self


# --------------------------------------------------------------------------- presets

PRESETS: dict[str, dict] = {
    # SPEC §1.3: the paper-scale kneeling run.
    "kneeling": dict(
        env_id=TEXTURED_HUMANOID, n_envs=32, episode_length=100, model="ViT-bigG-14",
        pretrained="laion2b_s39b_b160k", goal=["a humanoid robot kneeling"], baseline=["a humanoid robot"],
        alpha=0.0, reward_mode="replace", reward_timing="deferred", reward_batch_size=3200, batch_size=512,
        learning_rate=6e-4, gamma=0.95, tau=0.005, learning_starts=50_000, train_freq=100, gradient_steps=100,
        total_timesteps=10_000_000,
    ),
    # A CPU run of a few hundred steps with the tiny random model: checks the plumbing, learns nothing.
    "smoke": dict(
        env_id=TEXTURED_HUMANOID, n_envs=2, episode_length=50, render_width=64, render_height=64,
        model="vlmrm-tiny", pretrained=None, reward_device="cpu", reward_dtype="float32", reward_backend="torch",
        reward_timing="deferred", batch_size=32, learning_starts=50, train_freq=25, gradient_steps=5,
        buffer_size=2_000, net_arch=[32, 32], sac_device="cpu", total_timesteps=300, checkpoint_every=100,
        eval_every=0, video_width=64, video_height=64,
    ),
}

#: Fields that may differ between a checkpoint and the config it is resumed with.
RESUMABLE_FIELDS = frozenset({
    "total_timesteps", "run_dir", "checkpoint_every", "keep_checkpoints", "eval_every", "eval_episodes",
    "video_width", "video_height", "video_length", "tensorboard", "log_every", "progress", "reward_device",
    "reward_backend", "reward_batch_size", "sac_device",
})


def from_preset(name: str) -> TrainConfig:
    """The config of a preset (``ValueError`` naming the presets if unknown)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return apply_overrides(TrainConfig(), PRESETS[name], f"preset {name!r}")


# --------------------------------------------------------------------------- files and overrides


class _RepeatedKey(Exception):
    pass


def _without_repeats(pairs: list) -> dict:
    """A JSON object as a dict, refusing a key given twice (json keeps the last one silently)."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _RepeatedKey(key)
        out[key] = value
    return out


def load_config_file(path: Union[str, Path]) -> dict:
    """Read a TOML (or ``.json``) config file into a flat dict (tables flattened)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"config file '{path}' is a folder; pass the TOML (or .json) file in it")
    if not path.is_file():
        raise FileNotFoundError(f"config file '{path}' does not exist")
    try:
        text = path.read_text(encoding="utf-8")  # what TOML and JSON files are, whatever the locale says
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise ValueError(f"config file '{path}' is not UTF-8 text ({exc.reason} on line {line}); save it as UTF-8 "
                         "TOML (or .json)") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text, object_pairs_hook=_without_repeats)
        except json.JSONDecodeError as exc:
            raise ValueError(f"config file '{path}' is not valid JSON: {exc}") from None
        except _RepeatedKey as exc:  # TOML refuses these itself
            raise ValueError(f"config file '{path}' sets {exc.args[0]!r} twice in one object; keep one") from None
    else:
        if tomllib is None:  # pragma: no cover
            raise ValueError(f"reading '{path}' needs tomli on Python < 3.11 (pip install tomli), or use JSON")
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"config file '{path}' is not valid TOML: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file '{path}' must hold key = value pairs")
    flat: dict = {}
    where: dict = {}  # key -> where it was set, for the error on a key set twice
    names = {f.name for f in fields(TrainConfig)}
    for key, value in data.items():
        section = isinstance(value, dict) and key not in names  # a section like [sac]
        for name, item in (value.items() if section else [(key, value)]):
            place = f"[{key}]" if section else "the top level"
            if name in flat:
                raise ValueError(
                    f"config file '{path}' sets {name!r} twice, in {where[name]} and in {place}; keep one"
                )
            flat[name], where[name] = item, place
    return flat


def parse_set(items: list[str]) -> dict:
    """``["alpha=0.5", "goal=a robot"]`` -> dict; values read as TOML literals, else strings (and as typed for a text
    field, where TOML reads a number or a boolean: ``run_dir=123``, ``goal=true``, as their flags take them)."""
    hints = get_type_hints(TrainConfig)
    # Not ent_coef, a number as often as not: its value is the number's text, as coerce writes it.
    text = {name for name, hint in hints.items() if str in (hint, *get_args(hint))} - {"ent_coef"} | {"goal", "baseline"}
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        value = _parse_literal(raw.strip())
        out[key] = raw.strip() if key in text and isinstance(value, (bool, int, float)) else value
    return out


def _parse_literal(raw: str) -> Any:
    if raw.lower() in ("none", "null"):
        return None
    if tomllib is not None:
        try:
            return tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            pass
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def apply_overrides(config: TrainConfig, values: dict, source: str = "overrides") -> TrainConfig:
    """A copy of ``config`` with ``values`` applied, each converted to its field's type."""
    hints = get_type_hints(TrainConfig)
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        guesses = {key: difflib.get_close_matches(key, sorted(names), n=1) for key in unknown}
        hint = "".join(f"; did you mean {guess[0]!r} for {key!r}?" for key, guess in guesses.items() if guess)
        written = (" It was written by another version of vlmrm_fast: resume it with that version."
                   if source.startswith("checkpoint") else "")  # a run's own keys, not a typo of the user's
        raise ValueError(
            f"unknown config key(s) in {source}: {', '.join(unknown)}{hint or '.'}{written} Valid keys are listed by "
            "'vlmrm-fast train --help' (as flags: key total_timesteps is --total-timesteps)"
        )
    converted = {key: coerce(key, hints[key], value, source) for key, value in values.items()}
    return dataclasses.replace(config, **converted)


def coerce(name: str, hint: Any, value: Any, source: str = "config") -> Any:
    """Convert ``value`` (from TOML, JSON or a command line) to the type ``hint`` of field ``name``."""
    optional = get_origin(hint) is Union and type(None) in get_args(hint)
    base = next(a for a in get_args(hint) if a is not type(None)) if optional else hint
    if isinstance(value, str) and not value.strip():
        # An empty value is a slip (an unset shell variable, say), not "none": for pretrained, none means
        # random weights, which must be asked for by name.
        raise ValueError(f"{name} in {source} is empty: give a value" + (", or none" if optional else ""))
    one = value[0] if isinstance(value, list) and len(value) == 1 else value  # --baseline none: ["none"]
    if name == "baseline" and (one is None or isinstance(one, str) and one.lower() in ("none", "null")):
        return []  # no baseline prompt, as none unsets other fields; not the prompt "none"
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ValueError(f"{name} in {source} cannot be none")

    def bad(expected: str) -> ValueError:
        return ValueError(f"{name} in {source} must be {expected}, got {value!r}")

    if name == "reward_dtype" and isinstance(value, str):
        value = dtype_name(value, long=True)  # bf16 as well as bfloat16, as in the other commands

    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        if isinstance(value, int) and value in (0, 1):  # --set progress=1 reads as the integer 1
            return bool(value)
        raise bad("true or false")
    if base is int:
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, float) and value.is_integer():
            return int(value)  # 1e7 in TOML/JSON
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return int(value.replace("_", ""))  # exact: a float holds integers up to 2**53 only
            try:
                f = float(value.replace("_", ""))  # 1e7
            except ValueError:
                raise bad("an integer") from None
            if f.is_integer():
                return int(f)
            raise bad("an integer")
        if isinstance(value, int):
            return value
        raise bad("an integer")
    if base is float:
        if isinstance(value, bool):
            raise bad("a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad("a number") from None
    if base is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and name == "ent_coef":
            return str(value)
        if isinstance(value, (datetime.date, datetime.time)):  # --set run_dir=2024-05-01 reads as a TOML date
            return value.isoformat()
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if base is list:
        if name == "net_arch":  # layer sizes: "64,64" or "64 64" on a command line, [64, 64] in TOML
            items = value.replace(",", " ").split() if isinstance(value, str) else (
                value if isinstance(value, (list, tuple)) else [value])
            try:
                sizes = [coerce(name, int, item, source) for item in items]
            except ValueError:
                raise bad("a list of positive layer sizes, e.g. 256,256") from None
            if not sizes or min(sizes) < 1:
                raise bad("a list of positive layer sizes, e.g. 256,256")
            return sizes
        if isinstance(value, str) and value.lstrip().startswith("["):  # not TOML: unquoted items
            raise bad('a list of quoted strings, e.g. ["a humanoid robot kneeling", "a kneeling robot"] '
                      "(a single value needs no brackets)")
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        return list(value)
    if base is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise bad("a JSON object") from None
        if not isinstance(value, dict):
            raise bad("a table / JSON object")
        return dict(value)
    return value  # pragma: no cover


def diff_configs(saved: TrainConfig, given: TrainConfig, ignore=RESUMABLE_FIELDS,
                 same_weights: Callable[[Optional[str], Optional[str]], bool] = lambda a, b: False,
                 ) -> list[tuple[str, Any, Any]]:
    """``(field, saved value, given value)`` for each field that differs, outside ``ignore``; two values of
    ``pretrained`` that ``same_weights`` says name the same weights do not differ."""
    a, b = saved.to_dict(), given.to_dict()
    return [(k, a[k], b[k]) for k in a if k not in ignore and a[k] != b[k]
            and not (k == "pretrained" and same_weights(a[k], b[k]))]


def weights_file(model: str, pretrained: Optional[str]) -> Optional[Path]:
    """The local checkpoint file ``pretrained`` names, absolute, as CLIPReward reads it (``~`` expanded,
    relative to the working folder; an open_clip tag of ``model`` comes first); None for a tag, none, or a
    path with no file."""
    if not pretrained or not os.path.isfile(os.path.expanduser(pretrained)):
        return None
    import open_clip

    if pretrained in open_clip.list_pretrained_tags_by_model(model):
        return None
    return Path(os.path.abspath(os.path.expanduser(pretrained)))


def with_absolute_weights_path(config: TrainConfig) -> TrainConfig:
    """``config`` with a local checkpoint path in ``pretrained`` made absolute, so that the saved config
    names the same file wherever the run is resumed from (a cluster job's working folder changes)."""
    path = weights_file(config.model, config.pretrained)
    return config if path is None else dataclasses.replace(config, pretrained=str(path))


_digests: dict = {}


def file_digest(path: Union[str, os.PathLike]) -> tuple[int, str]:
    """(size, SHA-256) of a file, read once a process while its size and modification time stay the same
    (a resume compares the weights file twice: from the command line, then in train)."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        _digests[key] = (stat.st_size, digest.hexdigest())
    return _digests[key]


def field_help() -> dict[str, str]:
    """Field name -> documentation."""
    return {f.name: f.metadata.get("help", "") for f in fields(TrainConfig)}
