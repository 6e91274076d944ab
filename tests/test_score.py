"""The score op (Triton kernel and torch path) against the explicit D x D formula in float64.

Tolerance: rewards are O(1) and both paths accumulate in float32 whatever the input dtype (bf16 and
fp16 inputs are upcast exactly), so the only error is float32 rounding over D products: ~D^0.5 *
6e-8 < 1e-6 for D <= 1280; the bound is 2e-6 (the project's float32 bar is 1e-5, and a slip in a
small term of the closed form can hide under that). A wrong term costs >1e-2. The reference is
computed from the same (rounded) inputs, so low-precision inputs meet the same bound.
"""
import pytest
import torch

from conftest import DEVICES
from reference import reference_reward_from_embeddings
from vlmrm_fast.ops.score import ScoringTargets, score


def _targets(t, d, gen, zero_alpha_rows=()):
    goals = torch.nn.functional.normalize(torch.randn(t, d, generator=gen), dim=1)
    goals = goals * (0.6 + 0.4 * torch.rand(t, 1, generator=gen))  # prompt means have |g| < 1
    dirs = torch.nn.functional.normalize(torch.randn(t, d, generator=gen), dim=1)
    alphas = torch.rand(t, generator=gen)
    for k in zero_alpha_rows:
        dirs[k] = 0.0
        alphas[k] = 0.0
    return ScoringTargets(goals, dirs, alphas)


def _reference(x, targets):
    cols = []
    for k in range(targets.num_tasks):
        u = targets.directions[k].double()
        cols.append(
            reference_reward_from_embeddings(
                x, targets.goals[k].double(), u if u.abs().sum() > 0 else None, targets.alphas[k].item()
            )
        )
    return torch.stack(cols, dim=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d,t", [(37, 53, 1), (5, 1280, 3), (70, 77, 19), (1, 17, 2)])
def test_matches_explicit_projection(device, impl, dtype, n, d, t, rng):
    targets = _targets(t, d, rng, zero_alpha_rows=[t - 1] if t > 1 else [])
    x = (torch.randn(n, d, generator=rng) * 3).to(dtype)  # unnormalised, as the tower returns them
    on_device = ScoringTargets(*(v.to(device) for v in (targets.goals, targets.directions, targets.alphas)))
    out = score(x.to(device), on_device, impl=impl)
    assert out.shape == (n, t) and out.dtype == torch.float32
    err = (out.cpu().double() - _reference(x, targets)).abs().max().item()
    assert err <= 2e-6, err


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_strided_embeddings(device, impl, rng):
    targets = _targets(2, 33, rng)
    wide = torch.randn(9, 80, generator=rng)
    x = wide[::2, 7:40]  # row stride 160, a column offset
    on_device = ScoringTargets(*(v.to(device) for v in (targets.goals, targets.directions, targets.alphas)))
    out = score(wide.to(device)[::2, 7:40], on_device, impl=impl)
    assert (out.cpu().double() - _reference(x, targets)).abs().max().item() <= 1e-5
    transposed = torch.randn(33, 9, generator=rng).T  # column stride 9: the kernel must not assume 1
    out = score(transposed.to(device), on_device, impl=impl)
    assert (out.cpu().double() - _reference(transposed, targets)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_a_view_with_the_negative_bit_scores_its_values(device, impl, rng):
    # x.conj().imag is a view of -x's memory with the negative bit set: the kernel read the memory, and so the
    # rewards of -x, a sign off in the u . v term.
    targets = _targets(2, 33, rng)
    x = torch.randn(5, 33, generator=rng)
    view = torch.complex(torch.zeros_like(x), -x).to(device).conj().imag
    assert view.is_neg() and torch.equal(view.cpu(), x)
    on_device = ScoringTargets(*(v.to(device) for v in (targets.goals, targets.directions, targets.alphas)))
    assert (score(view, on_device, impl=impl).cpu().double() - _reference(x, targets)).abs().max().item() <= 2e-6


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_alpha_zero_single_goal_is_cosine(impl, rng):
    goal = torch.nn.functional.normalize(torch.randn(1, 40, generator=rng), dim=1)
    x = torch.randn(11, 40, generator=rng)
    out = score(x, ScoringTargets(goal, torch.zeros(1, 40), torch.zeros(1)), impl=impl)[:, 0]
    cosine = torch.nn.functional.cosine_similarity(x.double(), goal.double(), dim=1)
    assert (out.double() - cosine).abs().max().item() <= 1e-6


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # the interpreter's numpy, on purpose
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_nan_inf_and_zero_rows_give_nan_rewards(impl, rng):
    targets = _targets(2, 24, rng)
    x = torch.randn(5, 24, generator=rng)
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    x[3] = 0.0
    out = score(x, targets, impl=impl)
    assert torch.isnan(out[1:4]).all() and torch.isfinite(out[[0, 4]]).all()


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_norms_float32_cannot_square_give_nan_not_a_wrong_reward(impl, rng):
    # |x|^2 overflows (or underflows to 0) in float32: normalising would give x = 0 (or 0/0), so a
    # finite reward there would be wrong. Below MIN_NORM (1e-12) the squares of the entries approach
    # float32's subnormals and lose precision (a norm of 1e-21 once cost 3e-4 in reward): NaN too.
    # Large or small but representable rows still score as their direction.
    targets = _targets(2, 24, rng)
    x = torch.randn(7, 24, generator=rng)
    x[1] *= 1e20
    x[2] *= 1e-25
    x[3] = x[3] / x[3].norm() * 1e-21
    x[4] = x[4] / x[4].norm() * 0.9e-12
    x[5] *= 1e15
    x[6] = x[6] / x[6].norm() * 1.1e-12
    out = score(x, targets, impl=impl)
    assert torch.isnan(out[1:5]).all()
    ok = [0, 5, 6]
    want = _reference(x[ok].double() / x[ok].double().norm(dim=1, keepdim=True), targets)
    assert (out[ok].double() - want).abs().max().item() <= 2e-6


def test_rejects_wrong_width(rng):
    with pytest.raises(ValueError, match=r"\[N, 24\]"):
        score(torch.randn(3, 25), _targets(1, 24, rng), impl="torch")


# ---- behaviours a mutation audit found untested ---------------------------------------------------


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_targets_are_stored_float32_and_contiguous(impl, rng):
    # The kernel reads goals and directions as dense [T, D] float32 rows: column-major views and
    # float64 inputs must be copied into that layout, not read as they lie.
    targets = _targets(3, 20, rng)
    odd = ScoringTargets(targets.goals.double().T.contiguous().T, targets.directions.T.contiguous().T,
                         targets.alphas.double())
    for name in ("goals", "directions", "alphas", "goal_sq_norms", "goal_dot_directions"):
        value = getattr(odd, name)
        assert value.dtype == torch.float32 and value.is_contiguous(), name
    x = torch.randn(5, 20, generator=rng)
    assert (score(x, odd, impl=impl) - score(x, targets, impl=impl)).abs().max().item() <= 1e-6


def test_rejects_embeddings_that_are_not_a_matrix(rng):
    with pytest.raises(ValueError, match=r"\[N, 24\]"):
        score(torch.randn(24), _targets(1, 24, rng), impl="torch")
