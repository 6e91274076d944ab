"""Tasks: the text side of the reward, computed once per set of prompts.

For each task (SPEC §1.1): every prompt is embedded and normalised in float32; the goal ``g`` is the
mean of the goal prompts' unit embeddings and the baseline ``b`` the mean of the baseline prompts'
(neither mean is re-normalised); the direction is ``u = (g - b) / |g - b|``.
"""
from __future__ import annotations

import collections
import collections.abc
import math
import numbers
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union, cast

import numpy as np
import torch
import torch.nn.functional as F

from vlmrm_fast.argtypes import undecoded_byte
from vlmrm_fast.callers import stacklevel_outside_package
from vlmrm_fast.ops.score import ScoringTargets
from vlmrm_fast.precision import without_autocast

Prompts = Union[str, Sequence[str]]

# |g - b| below this means goal and baseline coincide: no direction to project on.
_MIN_DIRECTION_NORM = 1e-6


@dataclass(frozen=True)
class Task:
    """One reward: a goal and an optional baseline, each a prompt or a list of prompts (averaged).

    Attributes:
        goal: what the agent should do, e.g. "a humanoid robot kneeling".
        baseline: the neutral description, e.g. "a humanoid robot"; None for no baseline (alpha must be 0).
        alpha: this task's goal-baseline projection strength in [0, 1]; None uses the reward model's ``alpha``.
        name: a label for logs and CSV columns; defaults to the first goal prompt.
    """

    goal: Prompts
    baseline: Optional[Prompts] = None
    alpha: Optional[float] = None
    name: Optional[str] = None

    @property
    def label(self) -> str:
        return self.name or _prompt_list(self.goal, "goal")[0]


def _prompt_list(prompts: Prompts, what: str) -> List[str]:
    if isinstance(prompts, (str, collections.UserString)):
        return [_non_blank(str(prompts), what)]
    if not isinstance(prompts, collections.abc.Sequence) or isinstance(prompts, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be a string or a list of strings; got {type(prompts).__name__}.")
    if len(prompts) == 0:
        raise ValueError(f"{what} is an empty list: give at least one prompt (a string or a list of strings).")
    for p in prompts:
        if not isinstance(p, str):
            raise TypeError(f"{what} must contain strings only; found {type(p).__name__} {p!r}.")
    return [_non_blank(p, what) for p in prompts]


def _non_blank(prompt: str, what: str) -> str:
    # A blank prompt embeds as CLIP's empty text: a reward, but not for anything asked (an unset config
    # value, say). For no baseline, pass baseline=None.
    if not prompt.strip():
        raise ValueError(f"{what} has a blank prompt ({prompt!r}): give it words, e.g. goal='a humanoid robot "
                         "kneeling', baseline='a humanoid robot'; for no baseline, give none (baseline=None; on the "
                         "command line, leave out --baseline).")
    byte = undecoded_byte(prompt)
    if byte is not None:
        raise ValueError(f"{what} has a prompt that is not text ({prompt!r}: {byte!r} is a byte that is not UTF-8, "
                         "from a terminal or file in another encoding): retype it as UTF-8.")
    return prompt


def check_alpha(alpha: float, what: str = "alpha") -> float:
    """``alpha`` as a float in [0, 1], or a ValueError that says so."""
    if isinstance(alpha, torch.Tensor) and alpha.numel() == 1 or isinstance(alpha, np.ndarray) and alpha.size == 1:
        alpha = alpha.item()
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):  # numpy scalars are Real
        raise TypeError(f"{what} must be a number in [0, 1]; got {type(alpha).__name__}.")
    alpha = float(alpha)
    if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise ValueError(
            f"{what}={alpha} is outside [0, 1]: 0 scores against the goal alone (cosine-like), 1 projects "
            "fully onto the goal-baseline direction (README: How it works)."
        )
    return alpha


@torch.inference_mode()
def embed_prompts(model: torch.nn.Module, tokenizer: Callable, prompts: List[str], device: torch.device) -> torch.Tensor:
    """Unit text embeddings [P, D], float32 (computed so, inside a caller's autocast too), on ``device``.
    Refuses token ids that are not one row of integers per prompt (of the context length CLIP's own text
    transformer needs), a prompt that tokenizes as the empty text does, and embeddings that are not finite
    (a silent wrong goal each, else)."""
    if model.training:  # dropout in a text tower (Hugging Face ones have it) would make the goals random
        raise ValueError("rm.model is in training mode (model.train() was called), where dropout layers drop at "
                         "random: call rm.model.eval() before encoding prompts (and .train() again to train it).")
    tokens = _checked_tokens(model, tokenizer(prompts), len(prompts))
    empty = _first_empty_prompt(tokenizer, prompts, tokens)
    if empty is not None:  # "\x00", a lone byte-order mark: cleaned away, so CLIP's empty text, like a blank prompt
        raise ValueError(f"the prompt {empty!r} tokenizes to nothing (no character the tokenizer keeps), so it would "
                         "embed as the empty text: give it words.")
    special = _first_special_token(tokenizer, prompts)
    if special is not None:  # the tower pools at the first end-of-text token: the words after it count for nothing
        raise ValueError(f"the prompt {special[0]!r} holds {special[1]!r}, which CLIP's tokenizer reads as its own "
                         "special token, not as words (the text tower reads no further than an end-of-text token): "
                         "take it out of the prompt.")
    encode_text = cast(Callable[[torch.Tensor], torch.Tensor], model.encode_text)
    with without_autocast(device):
        embeddings = encode_text(tokens.to(device)).float()
    if not torch.isfinite(embeddings).all():
        raise ValueError("the text tower embeds the prompts to NaN/inf: its weights hold NaN/inf (a damaged "
                         "checkpoint, or a fine-tune that diverged); load good weights.")
    return F.normalize(embeddings, dim=-1)


def _first_empty_prompt(tokenizer: Callable, prompts: List[str], tokens: torch.Tensor) -> Optional[str]:
    """The first of ``prompts`` whose token ids [P, L] are those of the empty text, or None."""
    empty = torch.as_tensor(tokenizer([""]))
    if empty.shape[-1] != tokens.shape[1]:  # a tokenizer that pads to the longest text: the empty one asked with them
        both = torch.as_tensor(tokenizer([*prompts, ""]))
        if both.ndim != 2 or both.shape[0] != len(prompts) + 1:
            return None
        tokens, empty = both[:-1], both[-1:]
    same = (tokens == empty.reshape(1, -1)).all(dim=1)
    return prompts[int(same.nonzero()[0])] if same.any() else None


def _behind_tokenize(tokenizer: Callable) -> Callable:
    """open_clip's own ``SimpleTokenizer`` where ``tokenizer`` is ``open_clip.tokenize`` (the function VLM-RM's code
    passes, which calls it), else ``tokenizer``."""
    try:
        import open_clip.tokenizer as open_clip_tokenizer
    except ImportError:
        return tokenizer
    if tokenizer is getattr(open_clip_tokenizer, "tokenize", None):
        return getattr(open_clip_tokenizer, "_tokenizer", tokenizer)
    return tokenizer


def _first_special_token(tokenizer: Callable, prompts: List[str]) -> Optional[Tuple[str, str]]:
    """The first of ``prompts`` in which open_clip's ``SimpleTokenizer`` (CLIP's) finds the text of one of its special
    tokens ("<end_of_text>", "<start_of_text>", any case), with that token; None where there is none (or for
    another tokenizer). ``open_clip.tokenize``, the function VLM-RM's code passes, is that tokenizer too."""
    clip_tokenizer = _behind_tokenize(tokenizer)
    try:
        from open_clip.tokenizer import SimpleTokenizer
    except ImportError:  # a tokenizer of the user's own, without open_clip
        return None
    if not isinstance(clip_tokenizer, SimpleTokenizer):
        return None
    special = set(clip_tokenizer.all_special_ids)
    for prompt in prompts:
        found = [token for token in clip_tokenizer.encode(prompt) if token in special]
        if found:
            return prompt, clip_tokenizer.decoder[found[0]]
    return None


def _checked_tokens(model: torch.nn.Module, tokens: Any, rows: int) -> torch.Tensor:
    """The tokenizer's output as an integer tensor [rows, context length], or a ValueError saying what it is."""
    fix = "the tokenizer must return integer token ids [prompts, context length], as open_clip.get_tokenizer(model_name) does"
    if not isinstance(tokens, torch.Tensor):
        try:
            tokens = torch.as_tensor(tokens)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"the tokenizer returned a {type(tokens).__name__} that is no tensor of token ids: {fix}.") from None
    # CLIP's own text transformer adds a positional embedding of one fixed length (other towers slice theirs, or
    # are Hugging Face models, whose context_length attribute is no requirement).
    positions = getattr(model, "positional_embedding", None)
    width = positions.shape[0] if isinstance(positions, torch.Tensor) and positions.ndim == 2 else None
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool or tokens.ndim != 2:
        raise ValueError(f"the tokenizer returned {tokens.dtype} of shape {tuple(tokens.shape)}: {fix}.")
    if tokens.shape[0] != rows:
        raise ValueError(f"the tokenizer returned {tokens.shape[0]} rows of tokens for {rows} prompts: {fix}.")
    if width is not None and tokens.shape[1] != width:
        raise ValueError(f"the tokenizer's context length is {tokens.shape[1]}, the text tower's {width}: use the "
                         "model's own tokenizer (open_clip.get_tokenizer(model_name)).")
    return tokens


@dataclass(frozen=True)
class EncodedTasks:
    """Goals [T, D], unit directions [T, D] (zero rows where none) and per-task alpha overrides."""

    tasks: Tuple[Task, ...]
    goals: torch.Tensor
    directions: torch.Tensor
    has_direction: Tuple[bool, ...]

    def targets(self, default_alpha: float) -> ScoringTargets:
        """The scoring op's inputs with each task's alpha resolved; checks that alpha > 0 has a direction."""
        alphas = []
        for task, has_dir in zip(self.tasks, self.has_direction):
            alpha = default_alpha if task.alpha is None else check_alpha(task.alpha)
            if alpha > 0 and not has_dir:
                _no_direction(task, alpha)
            alphas.append(alpha)
        alphas_t = torch.tensor(alphas, dtype=torch.float32, device=self.goals.device)
        return ScoringTargets(self.goals, self.directions, alphas_t)


def task_list(
    goal: Optional[Prompts], baseline: Optional[Prompts], tasks: Optional[Sequence[Task]]
) -> Tuple[List[Task], bool]:
    """The tasks that ``goal=``/``baseline=`` or ``tasks=`` give, and whether it is the single-task form."""
    if tasks is None:
        if goal is None:
            raise ValueError("Give a goal prompt (goal='a humanoid robot kneeling') or tasks=[Task(...), ...].")
        return [Task(goal=goal, baseline=baseline)], True
    if goal is not None or baseline is not None:
        raise ValueError("Pass either goal=/baseline= (one task) or tasks= (several), not both.")
    return ([tasks] if isinstance(tasks, Task) else list(tasks)), False


def check_tasks(tasks: Sequence[Task], default_alpha: float) -> None:
    """What can be checked without the model: types, prompts, alphas, and a baseline for alpha > 0."""
    if len(tasks) == 0:
        raise ValueError("tasks is empty: give at least one Task(goal=..., baseline=...).")
    for i, task in enumerate(tasks):
        if not isinstance(task, Task):
            raise TypeError(f"tasks[{i}] is a {type(task).__name__}; use vlmrm_fast.Task(goal=..., baseline=...).")
        if task.alpha is not None:
            check_alpha(task.alpha, f"tasks[{i}].alpha")
        if task.name is not None and (not isinstance(task.name, str) or not task.name.strip()):
            # A name keys info["vlm_rewards"] and the wrappers' task=, where an int means a column index.
            raise TypeError(f"tasks[{i}].name must be a non-blank string (or None: the first goal prompt); "
                            f"got {task.name!r}.")
        _prompt_list(task.goal, "goal")
        if task.baseline is not None:
            _prompt_list(task.baseline, "baseline")
        alpha = default_alpha if task.alpha is None else task.alpha
        if alpha > 0 and task.baseline is None:
            _no_direction(task, alpha)


def _no_direction(task: Task, alpha: float) -> None:
    why = "it has no baseline" if task.baseline is None else "its goal and baseline embed to the same vector (same prompts?)"
    raise ValueError(
        f"Task {task.label!r} cannot use alpha={alpha}: {why}, so the goal-baseline direction is "
        "undefined. Pass alpha=0 (in Python: to from_pretrained or set_tasks, or as this Task's own alpha for it "
        "alone), or give a baseline that differs from the goal."
    )


_MEASURED_CONTEXTS = 4
"""How many contexts' worth of tokens a tokenizer other than CLIP's is asked for to measure a prompt."""


def _warn_of_cut_prompts(tokenizer: Callable, prompts: List[str]) -> None:
    """Warn for each prompt longer than the text tower's context: CLIP's tokenizer cuts it silently.

    open_clip's ``SimpleTokenizer`` (every CLIP model named in the README) says exactly how long a prompt
    is. Any other tokenizer with a ``context_length`` that takes ``context_length=`` as open_clip's do
    (``HFTokenizer``, ``SigLipTokenizer``) is measured by :func:`_padded_lengths`; others are not checked.
    ``open_clip.tokenize``, the function VLM-RM's code passes, is open_clip's ``SimpleTokenizer`` at its default
    context length.
    """
    tokenizer = _behind_tokenize(tokenizer)  # a function, without a context_length
    try:
        from open_clip.tokenizer import SimpleTokenizer
    except ImportError:  # a tokenizer of the user's own, without open_clip
        SimpleTokenizer = ()
    context = getattr(tokenizer, "context_length", None)
    if not isinstance(context, int) or context <= 0:
        return
    prompts = list(dict.fromkeys(prompts))
    lengths: Optional[List[int]]
    if isinstance(tokenizer, SimpleTokenizer):
        lengths, measured = [len(tokenizer.encode(p)) + 2 for p in prompts], None  # with start and end tokens
    else:
        measured = _MEASURED_CONTEXTS * context
        lengths = _padded_lengths(tokenizer, prompts, measured)
        if lengths is None:
            return
    for prompt, tokens in zip(prompts, lengths):
        if tokens > context:
            shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
            length = f"at least {tokens}" if tokens == measured else str(tokens)  # it fills all it was given
            warnings.warn(
                f"the prompt {shown!r} is {length} tokens long, but the text tower reads {context}: the "
                f"tokenizer cuts it, so the reward ignores the rest. Shorten it to at most {context - 2} tokens, "
                "or split it into several goal prompts (they are averaged).",
                stacklevel=stacklevel_outside_package(),
            )


def _padded_lengths(tokenizer: Callable, prompts: List[str], width: int) -> Optional[List[int]]:
    """How many tokens each prompt fills when ``tokenizer`` pads or cuts to ``width``: the position after
    its last token that is not padding (what the empty prompt, tokenized with them, ends in). None where
    the tokenizer cannot be asked so. A tokenizer whose end token is its padding (T5's) counts one short,
    so a prompt exactly one token too long can go unwarned; it never warns of a prompt that fits."""
    try:
        ids = torch.as_tensor(tokenizer([*prompts, ""], context_length=width))
    except Exception:  # a tokenizer of another kind: the real tokenization, next, reports its own errors
        return None
    if ids.shape != (len(prompts) + 1, width):
        return None
    not_padding = ids[:-1] != ids[-1, -1]
    after_last = width - not_padding.flip(1).int().argmax(dim=1)
    return torch.where(not_padding.any(dim=1), after_last, 0).tolist()


def own_copy(task: Task) -> Task:
    """``task`` with copies of its prompt lists and its alpha as a float: what is encoded is what ``rm.tasks`` shows
    and what ``rebuild_backend`` and a change of ``rm.alpha`` read again, whatever the caller does later to the
    list (or the alpha tensor) it passed, and ``rm.tasks`` hands out such copies too."""
    def own(prompts: Optional[Prompts]) -> Optional[Prompts]:
        return prompts if prompts is None or isinstance(prompts, (str, collections.UserString, tuple)) else list(prompts)

    alpha = None if task.alpha is None else check_alpha(task.alpha)
    return replace(task, goal=cast(Prompts, own(task.goal)), baseline=own(task.baseline), alpha=alpha)


def encode_tasks(
    model: torch.nn.Module, tokenizer: Callable, tasks: Sequence[Task], device: torch.device
) -> EncodedTasks:
    """Embed every task's prompts in one text-tower pass and form goals and directions."""
    check_tasks(tasks, default_alpha=0.0)
    tasks = [own_copy(task) for task in tasks]
    prompts: List[str] = []
    spans = []
    for task in tasks:
        goal = _prompt_list(task.goal, "goal")
        baseline = [] if task.baseline is None else _prompt_list(task.baseline, "baseline")
        spans.append((len(prompts), len(goal), len(baseline)))
        prompts += goal + baseline
    _warn_of_cut_prompts(tokenizer, prompts)
    embeddings = embed_prompts(model, tokenizer, prompts, device)
    goals, directions, has_direction = [], [], []
    for start, n_goal, n_base in spans:
        goal_mean = embeddings[start : start + n_goal].mean(dim=0)
        direction = torch.zeros_like(goal_mean)
        ok = False
        if n_base:
            diff = goal_mean - embeddings[start + n_goal : start + n_goal + n_base].mean(dim=0)
            norm = diff.norm()
            ok = bool(norm > _MIN_DIRECTION_NORM)
            if ok:
                direction = diff / norm
        goals.append(goal_mean)
        directions.append(direction)
        has_direction.append(ok)
    return EncodedTasks(tuple(tasks), torch.stack(goals), torch.stack(directions), tuple(has_direction))
