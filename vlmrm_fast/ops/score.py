"""Scoring: image embeddings -> VLM-RM rewards for T tasks at once.

For a unit embedding ``x``, goal ``g`` (a mean of unit prompt embeddings, not re-normalised), unit
direction ``u`` (from baseline to goal) and ``alpha`` in [0, 1], the reward is

    r = 1 - 0.5 * |M (x - g)|^2,    M = alpha * u u^T + (1 - alpha) * I        (SPEC §1.1)

M is the identity plus a rank-one term, so with ``v = x - g``:

    |M v|^2 = (1 - alpha)^2 |v|^2 + alpha (2 - alpha) (u . v)^2
    |v|^2   = 1 - 2 x.g + |g|^2,    u . v = x.u - g.u

Each row needs its norm and two dot products per task: O(D T), not O(D^2). The kernel reads the
raw tower output once, normalises it on the fly and accumulates in float32.

A zero, NaN or inf embedding gives a NaN reward, and so does one whose norm is outside
[:data:`MIN_NORM`, about 1.8e19], where float32 cannot square it accurately; callers check the (small)
reward tensor rather than the embeddings (see :class:`vlmrm_fast.CLIPReward`).
"""
from dataclasses import dataclass, field
from typing import Literal

import torch

from vlmrm_fast.ops._triton import HAS_TRITON, on_device, require_working_interpreter


MIN_NORM = 1e-12
"""The smallest embedding norm scored. Below about 1e-19 the squares of a row's entries fall below
float32's normal range and lose precision (a norm of 1e-21 cost 3e-4 in reward); from 1e-12 on, the
entries that underflow add at most D * 1.2e-38 to a squared norm of at least 1e-24, a relative error
under 1e-10 for any CLIP width. Tower outputs have norms of about 1 to 100. The kernel compares its
float32 squared norm with ``MIN_NORM ** 2``, the torch path (and ``CLIPReward.embed``) the norm with
``MIN_NORM``: a row within float32 rounding of the bound may fall on either side."""


@dataclass(frozen=True)
class ScoringTargets:
    """The text side of T tasks, on one device, all float32 and contiguous.

    Attributes:
        goals: [T, D] goal embeddings ``g``.
        directions: [T, D] unit directions ``u`` (a zero row where a task has none; alpha must be 0 there).
        alphas: [T] projection strengths in [0, 1].
        goal_sq_norms: [T] ``|g|^2`` (derived once, here).
        goal_dot_directions: [T] ``g . u`` (derived once, here).
    """

    goals: torch.Tensor
    directions: torch.Tensor
    alphas: torch.Tensor
    goal_sq_norms: torch.Tensor = field(init=False)
    goal_dot_directions: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        # Derived per set of prompts, not per call: at small N these would cost more than the kernel.
        for name in ("goals", "directions", "alphas"):
            object.__setattr__(self, name, getattr(self, name).to(torch.float32).contiguous())
        object.__setattr__(self, "goal_sq_norms", (self.goals * self.goals).sum(dim=1))
        object.__setattr__(self, "goal_dot_directions", (self.goals * self.directions).sum(dim=1))

    @property
    def num_tasks(self) -> int:
        return self.goals.shape[0]

    @property
    def dim(self) -> int:
        return self.goals.shape[1]


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _score_kernel(
        x_ptr,
        goals_ptr,
        dirs_ptr,
        goal_sq_ptr,
        goal_dir_ptr,
        alpha_ptr,
        out_ptr,
        n_rows,
        n_tasks,
        stride_xn,
        stride_xd,
        stride_on,
        DIM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
        MIN_SQ_NORM: tl.constexpr,
    ):
        # One program: BLOCK_N embeddings x BLOCK_T tasks; D is swept in BLOCK_D chunks. D is a
        # compile-time constant (one per model): see the loop-bound note in ops/preprocess.py.
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        tasks = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < n_rows
        task_ok = tasks < n_tasks
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xn

        sq_norm = tl.zeros((BLOCK_N,), dtype=tl.float32)
        x_dot_g = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
        x_dot_u = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
        for d0 in range(0, DIM, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < DIM
            x = tl.load(
                x_rows + cols.to(tl.int64)[None, :] * stride_xd, mask=row_ok[:, None] & col_ok[None, :], other=0.0
            )
            x = x.to(tl.float32)
            t_mask = task_ok[:, None] & col_ok[None, :]
            g = tl.load(goals_ptr + tasks[:, None] * DIM + cols[None, :], mask=t_mask, other=0.0)
            u = tl.load(dirs_ptr + tasks[:, None] * DIM + cols[None, :], mask=t_mask, other=0.0)
            sq_norm += tl.sum(x * x, axis=1)
            x_dot_g += tl.sum(x[:, None, :] * g[None, :, :], axis=2)
            x_dot_u += tl.sum(x[:, None, :] * u[None, :, :], axis=2)

        # Rows past the end get a dummy norm. A zero row, one whose squared norm overflows float32
        # (1/sqrt(inf) = 0 would score it as x = 0) and one too small to square accurately (MIN_NORM)
        # get NaN, by design.
        sq_norm = tl.where(row_ok, sq_norm, 1.0)
        inv_norm = 1.0 / tl.sqrt(sq_norm)
        inv_norm = tl.where((inv_norm > 0.0) & (sq_norm >= MIN_SQ_NORM), inv_norm, float("nan"))[:, None]
        goal_sq = tl.load(goal_sq_ptr + tasks, mask=task_ok, other=0.0)[None, :]
        goal_dir = tl.load(goal_dir_ptr + tasks, mask=task_ok, other=0.0)[None, :]
        alpha = tl.load(alpha_ptr + tasks, mask=task_ok, other=0.0)[None, :]
        v_sq = 1.0 - 2.0 * x_dot_g * inv_norm + goal_sq
        u_dot_v = x_dot_u * inv_norm - goal_dir
        keep = 1.0 - alpha
        reward = 1.0 - 0.5 * (keep * keep * v_sq + alpha * (2.0 - alpha) * u_dot_v * u_dot_v)
        out = out_ptr + rows.to(tl.int64)[:, None] * stride_on + tasks[None, :]
        tl.store(out, reward, mask=row_ok[:, None] & task_ok[None, :])


def _blocks(n_tasks: int) -> tuple:
    block_t = min(max(triton.next_power_of_2(n_tasks), 2), 16)
    block_n = 16
    # Keep the [BLOCK_N, BLOCK_T, BLOCK_D] products within a few thousand registers' worth.
    block_d = max(16, min(128, 4096 // (block_n * block_t)))
    return block_n, block_t, block_d


def score_triton(embeddings: torch.Tensor, targets: ScoringTargets) -> torch.Tensor:
    """Launch the fused kernel: one program per 16 rows x up to 16 tasks.

    Args:
        embeddings: [N, D] float32/bfloat16/float16, any strides, on the targets' device.
    Returns:
        [N, T] float32 rewards.
    """
    require_working_interpreter()
    embeddings = embeddings.resolve_neg()  # a view with the negative bit (x.conj().imag) holds -x in memory: the kernel reads that
    n, dim = embeddings.shape
    out = torch.empty((n, targets.num_tasks), dtype=torch.float32, device=embeddings.device)
    if n == 0:
        return out
    block_n, block_t, block_d = _blocks(targets.num_tasks)
    grid = (triton.cdiv(n, block_n), triton.cdiv(targets.num_tasks, block_t))
    with on_device(embeddings.device):
        _score_kernel[grid](
            embeddings,
            targets.goals,
            targets.directions,
            targets.goal_sq_norms,
            targets.goal_dot_directions,
            targets.alphas,
            out,
            n, targets.num_tasks,
            embeddings.stride(0), embeddings.stride(1), out.stride(0),
            DIM=dim, BLOCK_N=block_n, BLOCK_T=block_t, BLOCK_D=block_d, MIN_SQ_NORM=MIN_NORM**2,
            enable_fp_fusion=True,  # pinned, as in ops/preprocess.py: Triton 3.10 changes the default
        )
    return out


def unit_rows(embeddings: torch.Tensor) -> torch.Tensor:
    """[N, D] float -> [N, D] float32 rows of norm 1, as the kernel normalises them: NaN rows where the
    norm is not finite, or under :data:`MIN_NORM` (zero included)."""
    x = embeddings.to(torch.float32)
    norm = x.norm(dim=1, keepdim=True)
    return x / torch.where((norm < float("inf")) & (norm >= MIN_NORM), norm, float("nan"))


def score_torch(embeddings: torch.Tensor, targets: ScoringTargets) -> torch.Tensor:
    """The same closed form in plain torch, float32: the fallback and the kernel's reference."""
    x = unit_rows(embeddings)
    x_dot_g = x @ targets.goals.T
    x_dot_u = x @ targets.directions.T
    alpha = targets.alphas[None, :]
    v_sq = 1.0 - 2.0 * x_dot_g + targets.goal_sq_norms[None, :]
    u_dot_v = x_dot_u - targets.goal_dot_directions[None, :]
    return 1.0 - 0.5 * ((1.0 - alpha) ** 2 * v_sq + alpha * (2.0 - alpha) * u_dot_v**2)


def score(
    embeddings: torch.Tensor, targets: ScoringTargets, *, impl: Literal["triton", "torch"] = "triton"
) -> torch.Tensor:
    """Rewards [N, T] float32 from embeddings [N, D] (unnormalised is fine: rows are normalised here)."""
    if embeddings.ndim != 2 or embeddings.shape[1] != targets.dim:
        raise ValueError(
            f"embeddings must be [N, {targets.dim}] (the text embeddings' width); got {tuple(embeddings.shape)}."
        )
    if impl == "triton":
        return score_triton(embeddings, targets)
    return score_torch(embeddings, targets)
