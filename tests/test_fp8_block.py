"""Each fp8 block's LayerNorms in its matmuls' input quantisation (vlmrm_fast/backends/fp8_block.py) against
a float64 block written from its formula, which path runs where, and the swap's bookkeeping.

The op (a residual add, LayerNorm, quantisation) is held to its float64 reference in
tests/test_layer_norm_quantize.py; here the block is. Tolerance, as tests/test_torch_fp8.py argues for fp8:
twice PyTorch's own fp8 error against the float64 block (PyTorch's own: the block in bf16 with each
projection's input rounded through E4M3 with one scale a tensor, its weight with one a row). The fused
block quantises per row, and its LayerNorms without rounding them to bf16 first: no less accurate. A lost
residual, a LayerNorm with the other's parameters or none, or the wrong scale is off by far more.
"""
import copy
import math
import warnings
from collections import OrderedDict

import open_clip.transformer
import pytest
import torch

from conftest import DEVICES, make_tiny
from test_fp8_gelu_mlp import assert_the_replaced_module_runs_outside_and_compiled, cpu_fp8  # helpers only
from test_gelu_epilogue import reference_mlp, register_probe
from test_layer_norm import reference_layer_norm
from test_torch_fp8 import PerTensorFp8Linear, _usable
from vlmrm_fast.backends import fp8_block, torch_fp8
from vlmrm_fast.backends.base import original_modules
from vlmrm_fast.backends.eager import adapt_tower
from vlmrm_fast.backends.fast_path import turned_off
from vlmrm_fast.backends.fp8_block import Float8Block, is_fusable_fp8_block, use_fp8_block_fusion
from vlmrm_fast.backends.fp8_gelu_mlp import use_fp8_gelu_fusion
from vlmrm_fast.backends.torch_fp8 import Float8Linear, quantize_fp8, replace_projections
from vlmrm_fast.backends.triton_layer_norm import TritonLayerNorm, use_triton_layer_norm
from vlmrm_fast.ops._triton import tower_kernels

Block = open_clip.transformer.ResidualAttentionBlock


@pytest.fixture
def kernel_calls(monkeypatch):
    """What each fp8 activation kernel was handed (interpreted on CPU): ("LayerNorm", rows, with the add)
    for the block's op, (rows, the activation applied) for the quantisation kernel; how a test knows which path ran."""
    calls = []
    quantize, norm = torch_fp8.quantize_rows_triton, fp8_block.layer_norm_quantize_triton

    def quantizing(rows, activation=None):
        calls.append((rows.shape[0], activation))
        return quantize(rows, activation=activation)

    def normalising(x, *args, add=None):
        calls.append(("LayerNorm", x.numel() // x.shape[-1], add is not None))
        return norm(x, *args, add=add)

    monkeypatch.setattr(torch_fp8, "quantize_rows_triton", quantizing)
    monkeypatch.setattr(fp8_block, "layer_norm_quantize_triton", normalising)
    return calls


def fused_calls(rows: int) -> list:
    """The kernel calls of one fused block on ``rows`` tokens: ln_1 with in_proj's quantisation, out_proj's,
    ln_2 with the residual add and c_fc's, c_proj's with the GELU."""
    return [("LayerNorm", rows, False), (rows, None), ("LayerNorm", rows, True), (rows, "gelu")]


def block(width: int = 32, heads: int = 2, ratio: float = 4.0, seed: int = 0, act=torch.nn.GELU) -> Block:
    """An open_clip block (float64, CPU) whose LayerNorms and attention biases are random too (not 1 and 0)."""
    torch.manual_seed(seed)
    module = Block(width, heads, mlp_ratio=ratio, act_layer=act, batch_first=True).double().eval()
    with torch.no_grad():
        for norm in (module.ln_1, module.ln_2):
            norm.weight.normal_(1, 0.3)
            norm.bias.normal_(0, 0.1)
        module.attn.in_proj_bias.normal_(0, 0.1)
        module.attn.out_proj.bias.normal_(0, 0.1)
    return module


def reference_block(x: torch.Tensor, module: Block) -> torch.Tensor:
    """float64, from the formula: x + attention(LN_1(x)), then that plus MLP(LN_2(that)); attention
    softmax(q k^T / sqrt(d)) v in each head, batch-first tokens [B, L, E]."""
    x = x.double()
    attn = module.attn
    batch, tokens, width = x.shape
    heads = attn.num_heads
    h = reference_layer_norm(x, module.ln_1.weight, module.ln_1.bias, module.ln_1.eps)
    qkv = h @ attn.in_proj_weight.double().T + attn.in_proj_bias.double()
    q, k, v = qkv.view(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(width // heads), dim=-1) @ v
    x = x + a.transpose(1, 2).reshape(batch, tokens, width) @ attn.out_proj.weight.double().T + attn.out_proj.bias.double()
    h = reference_layer_norm(x, module.ln_2.weight, module.ln_2.bias, module.ln_2.eps)
    fc, proj = module.mlp.c_fc, module.mlp.c_proj
    if type(module.mlp.gelu) is torch.nn.GELU and module.mlp.gelu.approximate == "none":
        return x + reference_mlp(h, module.mlp)
    h = h @ fc.weight.double().T + fc.bias.double()
    return x + ACTIVATIONS[type(module.mlp.gelu)](h) @ proj.weight.double().T + proj.bias.double()


ACTIVATIONS = {
    open_clip.transformer.QuickGELU: lambda h: h / (1 + torch.exp(-1.702 * h)),
    torch.nn.ReLU: lambda h: h.clamp_min(0),
}
"""float64 activations other than the exact GELU, from their formulas."""


def with_projections(module: Block, projection, device="cpu") -> Block:
    """A bf16 copy of ``module`` on ``device`` with its attention and MLP projections made by ``projection``."""
    low = copy.deepcopy(module).to(device, torch.bfloat16)
    holder = torch.nn.Module()
    holder.transformer = torch.nn.Sequential(low)
    replace_projections(holder, projection)
    return low


def fp8_block_of(module: Block, device="cpu") -> Block:
    """``module`` as the "torch" backend has it with fp8 and its kernels: fp8 projections, the MLP's GELU
    fused, the block swapped (a fresh bf16 copy on ``device``)."""
    holder = torch.nn.Module()
    holder.transformer = torch.nn.Sequential(copy.deepcopy(module).to(device, torch.bfloat16))
    quantize_fp8(holder)
    use_fp8_gelu_fusion(holder)
    assert use_fp8_block_fusion(holder) == 1
    return holder.transformer[0]


def _x(width: int = 32, shape=(3, 5), device="cpu", seed: int = 4) -> torch.Tensor:
    return torch.randn(*shape, width, generator=torch.Generator().manual_seed(seed)).to(device, torch.bfloat16)


# (batch, tokens), width, heads, MLP ratio: sizes multiples of 16 (fp8 matmuls), odd token counts,
# ViT-B-32's block
SHAPES = [((3, 37), 48, 3, 4.0), ((2, 11), 32, 2, 5.0), ((2, 50), 768, 12, 4.0)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,width,heads,ratio", SHAPES)
def test_within_twice_pytorchs_own_fp8_error(shape, width, heads, ratio, device, kernel_calls):
    _usable(device)
    exact = block(width, heads, ratio)
    x = _x(width, shape, seed=1)
    want = reference_block(x, exact)
    with torch.inference_mode():
        own_error = (with_projections(exact, PerTensorFp8Linear, device)(x.to(device)).double().cpu() - want).abs().max()
        fused = fp8_block_of(exact, device)
        with tower_kernels():
            got = fused(x.to(device))
    assert kernel_calls == fused_calls(math.prod(shape))
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    error = (got.double().cpu() - want).abs().max().item()
    assert 0 < own_error.item() and error <= 2 * own_error.item(), (error, own_error.item())


@cpu_fp8
def test_each_layer_norm_hands_the_op_its_own_parameters(kernel_calls, monkeypatch):
    # The weight, bias and eps of ln_1, then of ln_2 (the residual add with it), as the modules hold them.
    fused, handed = fp8_block_of(block(48, 3)), []
    fused.ln_1.eps, fused.ln_2.eps = 1e-6, 1e-3
    real = fp8_block.layer_norm_quantize_triton

    def spying(x, weight, bias, eps, add=None):
        handed.append((weight, bias, eps))
        return real(x, weight, bias, eps, add=add)

    monkeypatch.setattr(fp8_block, "layer_norm_quantize_triton", spying)
    with torch.inference_mode(), tower_kernels():
        fused(_x(48))
    assert [(w is norm.weight, b is norm.bias, eps) for (w, b, eps), norm in zip(handed, (fused.ln_1, fused.ln_2))] == [
        (True, True, 1e-6), (True, True, 1e-3)]


@cpu_fp8
def test_outside_the_backends_calls_and_compiled_it_is_the_replaced_block(kernel_calls):
    assert_the_replaced_module_runs_outside_and_compiled(fp8_block_of(block()), _x(), kernel_calls)


@cpu_fp8
@pytest.mark.parametrize("where", ["ln_1", "attn", "attn.in_proj", "ln_2", "mlp", "mlp.c_fc", "ls_1", "every module"])
def test_hooks_on_the_modules_it_skips_run_the_replaced_block(where, kernel_calls):
    # A probe of a LayerNorm's output or the attention's input must see it: the fused call skips them.
    fused, seen = fp8_block_of(block()), []
    handle = register_probe(fused.get_submodule(where.split()[0]) if where != "every module" else fused, where, seen)
    try:
        with torch.inference_mode(), tower_kernels():
            got = fused(_x())
            want = fused.original()(_x())
    finally:
        handle.remove()
    assert seen and not [call for call in kernel_calls if call[0] == "LayerNorm"] and torch.equal(got, want)
    with torch.inference_mode(), tower_kernels():
        fused(_x())
    assert kernel_calls[-4:] == fused_calls(15)  # the hook removed: fused again


@cpu_fp8
@pytest.mark.parametrize("where", ["mlp.gelu", "mlp.c_proj pre"])
def test_hooks_on_the_gelu_or_c_proj_fire_and_only_the_gelu_is_unfused(where, kernel_calls):
    # The block still fuses its LayerNorms; the GELU and c_proj are called as modules, so their hooks fire.
    fused, seen = fp8_block_of(block()), []
    register_probe(fused.get_submodule(where.split()[0]), where, seen)
    with torch.inference_mode(), tower_kernels():
        fused(_x())
    assert seen == [where] and kernel_calls == fused_calls(15)[:3] + [(15, None)]


@cpu_fp8
@pytest.mark.parametrize("act,applied", [(open_clip.transformer.QuickGELU, "quick_gelu"), (torch.nn.ReLU, None)],
                         ids=["QuickGELU", "ReLU"])
def test_other_activations_keep_the_layer_norms_fused(act, applied, kernel_calls):
    # OpenAI's towers' QuickGELU goes into c_proj's quantisation as the exact GELU does; another activation
    # (ReLU) is called as its module between c_fc and c_proj. Within twice PyTorch's own fp8 error.
    exact = block(48, 3, act=act)
    x = _x(48, (3, 37), seed=1)
    want = reference_block(x, exact)
    with torch.inference_mode():
        own_error = (with_projections(exact, PerTensorFp8Linear)(x).double() - want).abs().max().item()
        fused = fp8_block_of(exact)
        with tower_kernels():
            got = fused(x)
    assert kernel_calls == fused_calls(111)[:3] + [(111, applied)]
    error = (got.double() - want).abs().max().item()
    assert 0 < own_error and error <= 2 * own_error, (error, own_error)


@cpu_fp8
def test_a_hook_on_out_proj_fires_and_the_block_stays_fused(kernel_calls):
    fused, seen = fp8_block_of(block()), []
    fused.attn.out_proj.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.inference_mode(), tower_kernels():
        fused(_x())
    assert seen == [(3, 5, 32)] and kernel_calls == fused_calls(15)


@cpu_fp8
def test_other_calls_go_to_the_replaced_block(kernel_calls):
    # A mask, cross-attention inputs, strided tokens: the block's own forward (its fp8 attention refuses a
    # mask by name).
    fused = fp8_block_of(block())
    with torch.inference_mode(), tower_kernels():
        fused(_x(), attn_mask=None)  # what open_clip's Transformer passes: fused
        fused(_x(), None, None, None)  # what it passes under grad checkpointing
        assert kernel_calls == fused_calls(15) * 2
        with pytest.raises(ValueError, match="cannot take other calls"):
            fused(_x(), attn_mask=torch.zeros(5, 5))
        other = _x(seed=5)  # no ln_1_kv: open_clip's block ignores cross-attention inputs
        assert torch.equal(fused(_x(), other, other), fused.original()(_x()))
        assert torch.equal(fused(_x().transpose(0, 1).contiguous().transpose(0, 1)), fused.original()(_x()))
    # the mask refused before any matmul; then the replaced block's own calls, four of them (tokens whose rows
    # are not evenly spaced among them): in_proj's, out_proj's, c_fc's, then c_proj's with the GELU
    assert kernel_calls[8:] == ([(15, None)] * 3 + [(15, "gelu")]) * 4


@cpu_fp8
def test_changed_children_run_the_replaced_block(kernel_calls):
    # A user's edit of the swapped block: what it holds now is what runs, unfused.
    def wider_out_proj(b):  # sizes that do not fit: the block's own error, and the kernels stay on
        b.attn.out_proj = torch_fp8.Float8Linear(torch.randn(48, 32), None, torch.bfloat16)

    def mlp_subclass(b):  # a subclass may compute otherwise: its own forward
        b.mlp = type("MyMLP", (torch.nn.Sequential,), {})(OrderedDict(b.mlp._modules))

    changes = {
        "layer scale": lambda b: setattr(b, "ls_1", open_clip.transformer.LayerScale(32, 0.1).to(torch.bfloat16)),
        "RMSNorm": lambda b: setattr(b, "ln_2", torch.nn.RMSNorm(32).to(torch.bfloat16)),
        "bf16 in_proj": lambda b: setattr(b.attn, "in_proj", torch.nn.Linear(32, 96).to(torch.bfloat16)),
        "bf16 out_proj": lambda b: setattr(b.attn, "out_proj", torch.nn.Linear(32, 32).to(torch.bfloat16)),
        "wider out_proj": wider_out_proj,
        "MLP subclass": mlp_subclass,
    }
    for name, change in changes.items():
        fused = fp8_block_of(block())
        change(fused)
        with torch.inference_mode(), tower_kernels():
            if name == "wider out_proj":
                with pytest.raises(RuntimeError, match="size of tensor"):
                    fused(_x())
            else:
                assert torch.equal(fused(_x()), fused.original()(_x())), name  # each with the quantisation kernel
        assert not [call for call in kernel_calls if call[0] == "LayerNorm"] and not turned_off(), name


@cpu_fp8
def test_autograd_runs_the_replaced_block(kernel_calls):
    fused = fp8_block_of(block())
    with tower_kernels():
        got = fused(_x())
    assert got.requires_grad and not [call for call in kernel_calls if call[0] == "LayerNorm"]


@cpu_fp8
def test_a_kernel_that_fails_is_turned_off_with_one_warning(kernel_calls, monkeypatch):
    # No GPU has run it: a build or launch error costs speed, not the run. torch's ops then compute the
    # same op for that call; the later calls run the replaced block (its Triton LayerNorms outrun torch's
    # ops for the fused one), whose layers keep their own kernels.
    def failing(x, *args, add=None):
        kernel_calls.append(("LayerNorm", x.numel() // x.shape[-1], add is not None))
        raise RuntimeError("ptxas fatal: Unresolved extern function '__nv_rsqrtf'")

    fused = fp8_block_of(block())
    monkeypatch.setattr(fp8_block, "layer_norm_quantize_triton", failing)
    with torch.inference_mode(), tower_kernels():
        with pytest.warns(RuntimeWarning, match="LayerNorm and quantisation kernel.*__nv_rsqrtf.*from now on"):
            got = fused(_x())
        assert kernel_calls == [("LayerNorm", 15, False), (15, None), (15, "gelu")]  # ln_2 not tried again
        del kernel_calls[:]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            again = fused(_x())
        calls_again = kernel_calls[:]
        want = fused.original()(_x())
    assert torch.equal(again, want) and calls_again == kernel_calls[len(calls_again):]  # the replaced block,
    assert calls_again == [(15, None)] * 3 + [(15, "gelu")] and torch_fp8.QUANTIZE_ROWS.on  # its kernels on
    assert (got.double() - want.double()).abs().max().item() < 0.1  # the first: fused, with torch's ops


# ---- the swap ----------------------------------------------------------------------------------------


def test_only_open_clip_blocks_with_fp8_layers_are_fused():
    assert not is_fusable_fp8_block(block().to(torch.bfloat16))  # not fp8
    assert is_fusable_fp8_block(fp8_block_of(block()).original())
    cross = Block(32, 2, batch_first=True, is_cross_attention=True)
    holder = torch.nn.Module()
    holder.transformer = torch.nn.Sequential(cross)
    quantize_fp8(holder)
    assert not is_fusable_fp8_block(holder.transformer[0])  # ln_1_kv
    scaled = Block(32, 2, ls_init_value=0.1, batch_first=True)
    holder.transformer = torch.nn.Sequential(scaled)
    quantize_fp8(holder)
    assert not is_fusable_fp8_block(scaled)
    with pytest.raises(ValueError, match="is not an open_clip ResidualAttentionBlock with fp8 projections"):
        Float8Block.from_block(block())


def test_the_swap_shares_the_layers_and_keys():
    model, _ = make_tiny()
    visual = model.visual.to(torch.bfloat16).eval()
    quantize_fp8(visual)
    use_fp8_gelu_fusion(visual)
    keys = list(visual.state_dict())
    first = visual.transformer.resblocks[0]
    children = dict(first.named_children())
    assert use_fp8_block_fusion(visual) == 2 and use_fp8_block_fusion(visual) == 2  # a second call: unchanged
    assert use_triton_layer_norm(visual) > 0  # the LayerNorms inside are swapped too, as the backend does
    swapped = visual.transformer.resblocks[0]
    assert type(swapped) is Float8Block and swapped.attn is children["attn"] and swapped.mlp is children["mlp"]
    assert type(swapped.ln_1) is TritonLayerNorm and swapped.ln_1.weight is children["ln_1"].weight
    assert list(visual.state_dict()) == keys
    with original_modules(visual):
        put_back = visual.transformer.resblocks[0]
        assert type(put_back) is Block and type(put_back.ln_1) is type(children["ln_1"])
        assert type(put_back.mlp) is torch.nn.Sequential and put_back.attn is children["attn"]
    assert visual.transformer.resblocks[0] is swapped and swapped.ln_1.weight is children["ln_1"].weight


def test_the_torch_backend_fuses_with_its_kernels_only(fp8_on_cpu):
    for backend, kernels, fused in (("torch", "triton", True), ("torch", "torch", False), ("compile", "torch", False)):
        visual = make_tiny()[0].visual.to(torch.bfloat16)
        adapt_tower(visual, backend, torch.device("cpu"), torch.bfloat16, "fp8", kernels)
        kind = Float8Block if fused else Block
        assert all(type(b) is kind and isinstance(b.attn.in_proj, Float8Linear)
                   for b in visual.transformer.resblocks), (backend, kernels)
