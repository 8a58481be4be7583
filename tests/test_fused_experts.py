"""moe_ops::fused_experts: layouts, activations, capacity, edge shapes, opcheck, gradcheck, CUDA graphs."""

from __future__ import annotations

import functools
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import TRITON_DEVICE, assert_close_rel, zipf_ids

import moe_ops
from moe_ops.fused_experts import QUANTISATION_ARGS, fused_experts, fused_experts_ref, fused_experts_triton
from moe_ops.quantised import dequantise, quantise_per_row, quantise_weight, sqnr_db
from moe_ops.routing_triton import route_triton
from moe_ops.tiles import choose_block_m

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _layer(T, K, E, H, Fi, dtype, device, *, ids=None, biases=False):
    """HF-layout expert weights (gate_up (E, 2F, H), down (E, H, F)) and a routed batch."""
    x = torch.randn(T, H, dtype=dtype, device=device)
    w_gate_up = torch.randn(E, 2 * Fi, H, dtype=dtype, device=device) / H**0.5
    w_down = torch.randn(E, H, Fi, dtype=dtype, device=device) / Fi**0.5
    if ids is None:
        ids = torch.rand(T, E).argsort(-1)[:, :K]
    weights = torch.rand(T, K).softmax(-1)
    layer = dict(x=x, topk_weights=weights.to(device), topk_ids=ids.to(device), w_gate_up=w_gate_up, w_down=w_down)
    if biases:
        layer["b_gate_up"] = torch.randn(E, 2 * Fi, device=device)
        layer["b_down"] = torch.randn(E, H, device=device)
    return layer


def _args(layer, **options):
    """The op's full positional argument list from a layer dict and options."""
    o = dict(w_up=None, b_gate_up=None, b_up=None, b_down=None, layout="EFH", interleaved=False,
             activation="silu", gated=True, alpha=1.702, limit=7.0, capacity_factor=0.0, drop_policy="position")
    o.update({k: v for k, v in layer.items() if k in o})
    o.update(options)
    return (layer["x"], layer["topk_weights"], layer["topk_ids"], layer["w_gate_up"], layer["w_down"],
            o["w_up"], o["b_gate_up"], o["b_up"], o["b_down"], o["layout"], o["interleaved"], o["activation"],
            o["gated"], o["alpha"], o["limit"], o["capacity_factor"], o["drop_policy"])


def _gpt_fast_formulation(x, weights, ids, w_gate_up, w_down):
    """An independent statement of the same layer (gpt-fast's per-token weight gather)."""
    Fi = w_down.shape[2]
    w1, w3 = w_gate_up[:, :Fi].float(), w_gate_up[:, Fi:].float()
    x1 = F.silu(torch.einsum("ti,taoi->tao", x.float(), w1[ids]))
    x3 = torch.einsum("ti,taoi->tao", x.float(), w3[ids])
    y = torch.einsum("tao,taio->tai", x1 * x3, w_down.float()[ids])
    return torch.einsum("tai,ta->ti", y, weights.float())


@pytest.mark.parametrize("activation,gated", [("clamped_swiglu", True), ("clamped_silu", True), ("relu", False),
                                              ("relu2", False)])
def test_a_nan_row_stays_nan(activation, gated):
    """A token whose row holds a NaN gets NaN outputs, as from the reference (torch's clamp and relu keep a NaN):
    the kernels' clamps and ReLU propagate it (min / max on the GPU return the other operand unless told not to,
    which would make that token's output finite; the interpreter's numpy keeps NaN either way)."""
    Fi = 16
    layer = _layer(8, 2, 4, 32, Fi, torch.float32, TRITON_DEVICE)
    if not gated:
        layer["w_gate_up"] = layer["w_gate_up"][:, :Fi].contiguous()
    layer["x"][3, 5] = math.nan
    args = _args(layer, activation=activation, gated=gated)
    (got, _), want = fused_experts_triton(*args), fused_experts_ref(*args)
    assert torch.isnan(want[3]).all() and torch.isnan(got[3]).all()
    others = [t for t in range(8) if t != 3]
    assert_close_rel(got[others], want[others], torch.float32)


def test_reference_matches_independent_formulation():
    layer = _layer(20, 2, 6, 32, 48, torch.float32, "cpu")
    out, dropped = fused_experts_ref(*_args(layer), return_num_dropped=True)
    want = _gpt_fast_formulation(layer["x"], layer["topk_weights"], layer["topk_ids"], layer["w_gate_up"],
                                 layer["w_down"])
    assert_close_rel(out, want, torch.float32, "reference")
    assert int(dropped) == 0


SHAPES = [
    # (T, K, E, H, F)
    pytest.param(1, 2, 4, 32, 48, id="T=1"),
    pytest.param(9, 2, 4, 32, 48, id="T<block_m"),
    pytest.param(11, 3, 5, 40, 24, id="non-pow2-H-and-F"),
    pytest.param(8, 4, 4, 32, 16, id="k=E"),
    pytest.param(70, 2, 8, 32, 32, id="block_m=32"),
    pytest.param(3, 8, 256, 32, 16, id="E=256"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,K,E,H,Fi", SHAPES)
def test_triton_matches_reference(T, K, E, H, Fi, dtype):
    layer = _layer(T, K, E, H, Fi, dtype, TRITON_DEVICE)
    got, _ = fused_experts_triton(*_args(layer))
    want, _ = fused_experts_ref(*_args(layer), return_num_dropped=True)
    assert_close_rel(got, want, dtype, "fused_experts")


def test_routing_edges():
    T, K, E = 24, 2, 6
    ids = torch.rand(T, E).argsort(-1)[:, :K]
    ids[ids == 1] = 0  # an expert with no tokens (and duplicate choices of expert 0 in a row are fine)
    ids[3, 1] = E  # expert-parallel sentinel: contributes zero
    for case, routed in {"edges": ids, "one expert": torch.full((T, 1), 4),
                         "zipf": zipf_ids(T, K, E)}.items():
        layer = _layer(T, routed.shape[1], E, 32, 32, torch.float32, TRITON_DEVICE, ids=routed)
        got, _ = fused_experts_triton(*_args(layer))
        want, _ = fused_experts_ref(*_args(layer), return_num_dropped=True)
        assert_close_rel(got, want, torch.float32, case)


OUTSIDE_IDS = [-1, -2, -5, -(2**31), 4, 7]  # E = 4


@pytest.mark.parametrize("device", [TRITON_DEVICE, "cpu"] if TRITON_DEVICE == "cuda" else ["cpu"])
@pytest.mark.parametrize("path", ["reference", "triton", "op", "compiled"])
def test_ids_outside_range_route_to_no_expert(path, device):
    """An id outside [0, E), negative or not, is a slot routed to no expert on every path: the output is
    that of the same layer with the slot's weight zeroed."""
    T, K, E = 16, 2, 4
    layer = _layer(T, K, E, 32, 16, torch.float32, device)
    ids = layer["topk_ids"].to(torch.int32)
    ids[3::4, 1] = torch.tensor(OUTSIDE_IDS[: len(ids[3::4, 1])], dtype=torch.int32, device=device)
    ids[5, :] = torch.tensor([-1, E], dtype=torch.int32, device=device)  # a token routed nowhere
    outside = (ids < 0) | (ids >= E)
    zeroed = dict(layer, topk_ids=torch.where(outside, 0, ids), topk_weights=layer["topk_weights"] * ~outside)
    want = fused_experts_ref(**zeroed)
    run = {
        "reference": lambda lay: fused_experts_ref(**lay),
        "triton": lambda lay: fused_experts_triton(*_args(lay))[0],
        "op": lambda lay: fused_experts(**lay),
        "compiled": lambda lay: torch.compile(fused_experts, fullgraph=True)(**lay),
    }[path]
    if path == "triton" and device == "cpu" and TRITON_DEVICE == "cuda":
        pytest.skip("the Triton path runs on the GPU here")
    got = run(dict(layer, topk_ids=ids))
    assert_close_rel(got, want, torch.float32, path)
    assert (got[5] == 0).all()


@pytest.mark.parametrize("capacity_factor", [0.0, 100.0])  # dropless, and a capacity no expert reaches
def test_int64_ids_int32_cannot_hold_route_to_no_expert(capacity_factor):
    """int64 ids outside int32's range (2**32 would wrap to expert 0) are slots routed to no expert, with a
    capacity (whose kept ids are int32) as without, eager and compiled."""
    T, K, E = 8, 2, 4
    layer = _layer(T, K, E, 32, 16, torch.float32, TRITON_DEVICE)
    ids = layer["topk_ids"].long()
    ids[::2, 1] = torch.tensor([2**32, 2**32 + 1, -(2**32), 2**40], device=ids.device)
    outside = (ids < 0) | (ids >= E)
    want = fused_experts_ref(**dict(layer, topk_ids=torch.where(outside, 0, ids),
                                    topk_weights=layer["topk_weights"] * ~outside))
    for name, run in (("eager", fused_experts), ("compiled", torch.compile(fused_experts, fullgraph=True))):
        got = run(**dict(layer, topk_ids=ids), capacity_factor=capacity_factor)
        assert_close_rel(got, want, torch.float32, f"{name}, capacity_factor={capacity_factor}")


@pytest.mark.parametrize("block_m", [16, 32, 64, 128])
def test_packed_schedule_serves_every_block_size(block_m, monkeypatch):
    """One packed schedule, any block size: each program finds its expert and rows from the expert
    offsets (an empty expert, one spanning several blocks, partial blocks, a sentinel slot)."""
    T, K, E = 150, 2, 6
    ids = zipf_ids(T, K, E)
    ids[ids == 2] = 1  # expert 2 gets nothing
    ids[5, 0] = E
    monkeypatch.setattr(sys.modules["moe_ops.fused_experts"], "choose_block_m", lambda num_slots, num_experts: block_m)
    layer = _layer(T, K, E, 32, 24, torch.float32, TRITON_DEVICE, ids=ids)
    got, _ = fused_experts_triton(*_args(layer))
    want, _ = fused_experts_ref(*_args(layer), return_num_dropped=True)
    assert_close_rel(got, want, torch.float32, f"block_m={block_m}")


@pytest.mark.parametrize("unrouted", [True, False], ids=["some_unrouted", "all_routed"])
def test_unrouted_slots_are_written_as_zeros(monkeypatch, unrouted):
    """The down GEMM's slot-order output is not zero-filled first: its extra programs write the rows of
    slots routed to no expert, and find nothing to do when every slot is routed. Uninitialised memory is
    NaN here, so a row left unwritten would show."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    T, K, E = 40, 2, 4
    ids = torch.rand(T, E).argsort(-1)[:, :K]
    if unrouted:
        ids[::3, 1] = E  # every third token sends its second slot nowhere
    layer = _layer(T, K, E, 32, 24, torch.float32, TRITON_DEVICE, ids=ids)
    monkeypatch.setattr(torch, "empty", nan_empty)
    got, _ = fused_experts_triton(*_args(layer))
    monkeypatch.undo()
    want, _ = fused_experts_ref(*_args(layer), return_num_dropped=True)
    assert_close_rel(got, want, torch.float32, "unrouted slots")


def test_zero_tokens():
    layer = _layer(0, 2, 4, 32, 16, torch.float32, TRITON_DEVICE)
    got, dropped = fused_experts_triton(*_args(layer))
    assert got.shape == (0, 32) and int(dropped) == 0
    assert fused_experts(**{k: v for k, v in _layer(0, 2, 4, 32, 16, torch.float32, "cpu").items()}).shape == (0, 32)


def _layouts(layer):
    """The same experts in every supported storage: (name, options) pairs for fused_experts."""
    Fi = layer["w_down"].shape[2]
    gu, down = layer["w_gate_up"], layer["w_down"]
    interleaved = torch.stack([gu[:, :Fi], gu[:, Fi:]], dim=2).reshape(gu.shape)  # g0 u0 g1 u1 ...
    return {
        "EFH fused (HF)": dict(w_gate_up=gu, w_down=down),
        "EFH w1/w3 (gpt-fast)": dict(w_gate_up=gu[:, :Fi].contiguous(), w_up=gu[:, Fi:].contiguous(), w_down=down),
        "EHF w1/w3 (torchtitan)": dict(w_gate_up=gu[:, :Fi].transpose(1, 2).contiguous(),
                                       w_up=gu[:, Fi:].transpose(1, 2).contiguous(),
                                       w_down=down.transpose(1, 2).contiguous(), layout="EHF"),
        "EHF interleaved (GPT-OSS)": dict(w_gate_up=interleaved.transpose(1, 2).contiguous(),
                                          w_down=down.transpose(1, 2).contiguous(), layout="EHF",
                                          interleaved=True),
    }


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_layouts_agree(impl):
    layer = _layer(10, 2, 4, 32, 24, torch.float32, TRITON_DEVICE)
    run = fused_experts_triton if impl == "triton" else functools.partial(fused_experts_ref, return_num_dropped=True)
    base = {k: layer[k] for k in ("x", "topk_weights", "topk_ids")}
    outs = {}
    for name, opts in _layouts(layer).items():
        options = {k: v for k, v in opts.items() if k not in ("w_gate_up", "w_down")}
        outs[name] = run(*_args(dict(base, **opts), **options))[0]
    first = outs.pop("EFH fused (HF)")
    for name, out in outs.items():
        assert_close_rel(out, first, torch.float32, name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gpt_oss_form(dtype):
    # Interleaved gate/up in (E, H, 2F), biases on both projections, clamped SwiGLU.
    layer = _layer(13, 4, 8, 32, 24, dtype, TRITON_DEVICE, biases=True)
    layer["x"] = layer["x"] * 3  # reach the clamp
    Fi = 24
    layer["w_gate_up"] = layer["w_gate_up"].transpose(1, 2).contiguous()
    layer["w_down"] = layer["w_down"].transpose(1, 2).contiguous()
    args = _args(layer, layout="EHF", interleaved=True, activation="clamped_swiglu")
    got, _ = fused_experts_triton(*args)
    want, _ = fused_experts_ref(*args, return_num_dropped=True)
    assert_close_rel(got, want, dtype, "gpt-oss")
    assert layer["b_gate_up"].shape == (8, 2 * Fi)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "relu2"])
def test_plain_mlp_with_bias(activation):
    # Megablocks / nanoMoE: act(x W1 + b1) W2 + b2, no gate.
    layer = _layer(12, 2, 4, 32, 24, torch.float16, TRITON_DEVICE)
    layer["w_gate_up"] = layer["w_gate_up"][:, :24].contiguous()
    args = _args(layer, gated=False, activation=activation,
                 b_gate_up=torch.randn(4, 24, device=TRITON_DEVICE), b_down=torch.randn(4, 32, device=TRITON_DEVICE))
    got, _ = fused_experts_triton(*args)
    want, _ = fused_experts_ref(*args, return_num_dropped=True)
    assert_close_rel(got, want, torch.float16, activation)


@pytest.mark.parametrize("policy", ["position", "gshard", "score"])
def test_capacity(policy):
    T, K, E = 32, 2, 4
    skewed = torch.multinomial(torch.tensor([8.0, 1.0, 1.0, 1.0]).expand(T, E), K)
    layer = _layer(T, K, E, 32, 16, torch.float32, TRITON_DEVICE, ids=skewed)
    args = _args(layer, capacity_factor=1.0, drop_policy=policy)
    got, got_dropped = fused_experts_triton(*args)
    want, want_dropped = fused_experts_ref(*args, return_num_dropped=True)
    assert int(got_dropped) == int(want_dropped) > 0
    assert_close_rel(got, want, torch.float32, "capacity")
    dropless, none_dropped = fused_experts_ref(*_args(layer), return_num_dropped=True)
    assert int(none_dropped) == 0 and not torch.allclose(dropless, want)


def test_public_api_opcheck_and_noncontiguous_input():
    layer = _layer(6, 2, 4, 16, 8, torch.float32, "cpu", biases=True)
    torch.library.opcheck(torch.ops.moe_ops.fused_experts.default, _args(layer))
    torch.library.opcheck(torch.ops.moe_ops.fused_experts.default, _args(layer, capacity_factor=1.0))
    # The training variant (what training graphs call): schema, fake kernel and autograd alike.
    torch.library.opcheck(torch.ops.moe_ops.fused_experts_training.default, _args(layer))
    x_wide = torch.randn(6, 32)
    strided = dict(layer, x=x_wide[:, ::2])  # a non-contiguous view of the activations
    out = fused_experts(**strided)
    assert_close_rel(out, fused_experts(**dict(layer, x=x_wide[:, ::2].contiguous())), torch.float32, "strided")
    out, dropped = fused_experts(**layer, capacity_factor=0.5, return_num_dropped=True)
    assert out.shape == (6, 16) and dropped.dtype == torch.int32


def test_triton_path_takes_strided_inputs():
    # Views straight from a model: a column slice of a wider activation, weights and ids transposed
    # from (K, T) storage. The kernels read through strides; nothing needs to be made contiguous.
    layer = _layer(10, 2, 4, 32, 24, torch.float32, TRITON_DEVICE)
    strided = dict(
        layer,
        x=torch.randn(10, 64, device=TRITON_DEVICE)[:, 16:48],
        topk_weights=layer["topk_weights"].T.contiguous().T,
        topk_ids=layer["topk_ids"].T.contiguous().T,
    )
    assert not strided["x"].is_contiguous() and not strided["topk_ids"].is_contiguous()
    got, _ = fused_experts_triton(*_args(strided))
    want = fused_experts_ref(*_args(dict(strided, x=strided["x"].contiguous())))
    assert_close_rel(got, want, torch.float32, "strided")


def test_gradcheck_float64():
    layer = _layer(5, 2, 3, 6, 4, torch.float64, "cpu", biases=True)
    names = ("x", "topk_weights", "w_gate_up", "w_down", "b_gate_up", "b_down")
    leaves = tuple(layer[n].double().detach().requires_grad_(True) for n in names)

    def f(*tensors):
        return fused_experts(**dict(layer, **dict(zip(names, tensors, strict=True))))

    assert torch.autograd.gradcheck(f, leaves)

    def training_variant(*tensors):  # what training graphs call: its output, through its own autograd
        args = _args(dict(layer, **dict(zip(names, tensors, strict=True))))
        return torch.ops.moe_ops.fused_experts_training(*args)[0]

    assert torch.autograd.gradcheck(training_variant, leaves)


def test_forward_mode_ad_is_refused():
    """torch.func.jvp / forward_ad through fused_experts: no forward formula, and torch gave a zero tangent
    (silently) rather than raising; autograd's reverse mode is unaffected."""
    import torch.autograd.forward_ad as forward_ad

    layer = _layer(5, 2, 3, 6, 4, torch.float64, "cpu")
    with pytest.raises(NotImplementedError, match="fused_experts: forward-mode AD"):
        torch.func.jvp(lambda x: fused_experts(**dict(layer, x=x)), (layer["x"],), (torch.ones_like(layer["x"]),))
    with forward_ad.dual_level(), pytest.raises(NotImplementedError, match="fused_experts: forward-mode AD"):
        fused_experts(**dict(layer, w_down=forward_ad.make_dual(layer["w_down"], torch.ones_like(layer["w_down"]))))
    x = layer["x"].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fused_experts(**dict(layer, x=x)).sum(), x)
    assert grad.abs().sum() > 0
    # Compiled, dual inputs cannot be told apart: any call inside a dual level is refused (the tangent came back
    # None), and none outside one.
    compiled = torch.compile(lambda x: fused_experts(**dict(layer, x=x)), backend="aot_eager")
    with forward_ad.dual_level(), pytest.raises(NotImplementedError, match="fused_experts: forward-mode AD"):
        compiled(forward_ad.make_dual(layer["x"], torch.ones_like(layer["x"])))
    torch.testing.assert_close(compiled(layer["x"]), fused_experts(**layer))


def test_torch_func_reverse_mode_is_refused_by_name():
    """torch.func.grad / vjp through fused_experts: torch cannot run a custom op's autograd formula there and said
    so about an autograd.Function's setup_context, naming nothing the user wrote; the op now names itself and the
    reference to use. vmap (no gradient) and the reference under grad still work."""
    layer = _layer(5, 2, 3, 6, 4, torch.float64, "cpu")
    for transform in (torch.func.grad, lambda f: (lambda x: torch.func.vjp(f, x)[1](torch.ones(()))[0])):
        with pytest.raises(NotImplementedError, match="fused_experts: torch.func's reverse mode .* moe_ops.fused_exp"):
            transform(lambda x: fused_experts(**dict(layer, x=x)).sum())(layer["x"])
    want = torch.func.grad(lambda x: fused_experts_ref(**dict(layer, x=x)).sum())(layer["x"])
    x = layer["x"].clone().requires_grad_(True)
    (got,) = torch.autograd.grad(fused_experts(**dict(layer, x=x)).sum(), x)
    torch.testing.assert_close(got, want)
    batched = torch.func.vmap(lambda x: fused_experts(**dict(layer, x=x)))(layer["x"][None].expand(2, -1, -1))
    torch.testing.assert_close(batched[1], fused_experts(**layer))


def test_a_backward_after_an_input_changed_in_place_is_refused():
    """A weight or input changed in place between forward and backward (an optimizer step, a residual add
    into x) makes the gradients those of other values: refused, as torch's own ops refuse it."""
    layer = _layer(5, 2, 4, 6, 4, torch.float32, "cpu")
    for name in ("x", "w_down"):
        leaf = layer[name].clone().requires_grad_(True)
        inputs = dict(layer, **{name: leaf * 1.0})  # a non-leaf may be changed in place
        out = fused_experts(**inputs)
        with torch.no_grad():
            inputs[name].mul_(2.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()
    args = _args(dict(layer, w_gate_up=layer["w_gate_up"].clone().requires_grad_(True)))
    out = torch.ops.moe_ops.fused_experts_training(*args)[0]  # what training graphs call, eager
    with torch.no_grad():
        args[3].add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_errors_name_the_argument():
    layer = _layer(4, 2, 4, 16, 8, torch.float32, "cpu")
    # Flags are True or False: "no" would be read as true (a tuple returned), 1 / 0 pass as flags by accident.
    with pytest.raises(TypeError, match=r"return_num_dropped: expected True or False, got 'no'"):
        fused_experts(**layer, return_num_dropped="no")
    with pytest.raises(TypeError, match=r"interleaved: expected True or False, got 1"):
        fused_experts(**layer, interleaved=1)
    with pytest.raises(TypeError, match=r"gated: expected True or False, got 0"):
        fused_experts(**layer, gated=0)
    with pytest.raises(ValueError, match=r"w_gate_up: expected shape \(E, 2F, H=32\)"):
        fused_experts(**dict(layer, x=torch.randn(4, 32)))
    with pytest.raises(ValueError, match=r"topk_ids: expected 1 <= K <= E=4"):
        fused_experts(**dict(layer, topk_ids=torch.zeros(4, 5, dtype=torch.int64), topk_weights=torch.rand(4, 5)))
    with pytest.raises(TypeError, match=r"w_down: expected dtype in \(float32\)"):
        fused_experts(**dict(layer, w_down=layer["w_down"].half()))
    with pytest.raises(ValueError, match="topk_weights: expected shape"):
        fused_experts(**dict(layer, topk_weights=torch.rand(4, 3)))
    with pytest.raises(ValueError, match="layout: expected one of"):
        fused_experts(**layer, layout="HFE")
    for name in ("layout", "activation", "drop_policy", "input_quantisation"):  # not the schema's type error
        with pytest.raises(ValueError, match=f"{name}: expected one of .*, got None"):
            fused_experts(**layer, **{name: None})
    for capacity_factor in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="capacity_factor: expected a finite number >= 0"):
            fused_experts(**layer, capacity_factor=capacity_factor)
    with pytest.raises(TypeError, match="capacity_factor: expected a number, got True"):
        fused_experts(**layer, capacity_factor=True)
    # A NaN alpha or limit made every output NaN; a negative limit is an empty clamp range. The reference, which
    # "takes the same arguments", refuses them too.
    for op in (fused_experts, fused_experts_ref):
        for alpha in (math.nan, math.inf):
            with pytest.raises(ValueError, match=f"alpha: expected a finite number, got {alpha}"):
                op(**layer, activation="clamped_swiglu", alpha=alpha)
        for limit in (math.nan, -1.0):
            with pytest.raises(ValueError, match=rf"limit: expected a number >= 0 \(inf: no clamp\), got {limit}"):
                op(**layer, activation="clamped_silu", limit=limit)
    # An infinite limit clamps nothing (Step-3.7's layers without one): taken, and it is plain SiLU.
    torch.testing.assert_close(fused_experts(**layer, activation="clamped_silu", limit=math.inf),
                               fused_experts(**layer, activation="silu"))
    # A constant the activation does not read would change nothing the caller expects it to change.
    for activation, constants in (("silu", dict(alpha=1.0)), ("silu", dict(limit=3.0)),
                                  ("clamped_silu", dict(alpha=2.0)), ("gelu", dict(limit=math.inf))):
        name = next(iter(constants))
        with pytest.raises(ValueError, match=rf"{name}: read only by activation 'clamped_swiglu'.* "
                                             rf"activation='{activation}' ignores it"):
            fused_experts(**layer, activation=activation, **constants)
    torch.testing.assert_close(fused_experts(**layer, activation="clamped_swiglu", alpha=1.0, limit=3.0),
                               fused_experts_ref(**layer, activation="clamped_swiglu", alpha=1.0, limit=3.0))


QUANTISED = ["int8", "fp8"]  # per output row


def _quantised_layer(layer, quantised, form):
    """The layer's expert weights in the form ``quantised`` names (moe_ops.quantised.quantise_weight: per output
    row "int8" / "fp8", in groups of 16 "int8_g16" / "int4_g16", fp8 in 16 x 16 tiles "fp8_b16"), as options of
    fused_experts: gate_up as one weight ("halves"), gate and up interleaved (GPT-OSS's order), or w1 and w3
    apart ("w_up")."""
    Fi = layer["w_down"].shape[2]
    if form == "w_up":
        weights = dict(w_gate_up=layer["w_gate_up"][:, :Fi], w_up=layer["w_gate_up"][:, Fi:], w_down=layer["w_down"])
    else:
        weights = dict(w_gate_up=layer["w_gate_up"], w_down=layer["w_down"])
    options = dict(interleaved=form == "interleaved")
    for name, weight in weights.items():
        options[name], options[f"{name}_scale"], zero = quantise_weight(weight, quantised)
        if zero is not None:
            options[f"{name}_zero"] = zero
    dequantised = {name: dequantise(options[name], options[f"{name}_scale"], options.get(f"{name}_zero"))
                   for name in weights}
    return options, dict(weights, interleaved=form == "interleaved"), dequantised


@pytest.mark.parametrize("quantised", [*QUANTISED, "int8_g16", "int4_g16", "fp8_b16"])
@pytest.mark.parametrize("form", ["halves", "interleaved", "w_up"])
def test_quantised_experts_match_the_reference(quantised, form):
    """Quantised expert weights: int8 / fp8 with a scale per output feature (torchao's per-row weight-only
    layout), int8 with scales per group of 16 reduction features, int4 in groups with zero points, packed
    two per byte; fp8 with a scale per 16 x 16 tile (not for interleaved gate and up rows, which split
    tiles). The Triton path reads them as they are and gives the reference's result; the reference is
    the layer of the dequantised weights; and the quantised layer stays within the scheme's error of the
    bf16 one."""
    dtype = torch.bfloat16
    layer = _layer(13, 2, 4, 32, 48, dtype, TRITON_DEVICE)
    options, exact, dequantised = _quantised_layer(layer, quantised, form)
    routed = (layer["x"], layer["topk_weights"], layer["topk_ids"])
    if quantised == "fp8_b16" and form == "interleaved":
        with pytest.raises(ValueError, match="w_gate_up_scale: scales of blocks of 16 rows cannot be split"):
            fused_experts_ref(*routed, **options)
        return
    quantisation = [options.get(name) for name in QUANTISATION_ARGS]
    got, _ = fused_experts_triton(*_args(dict(layer, **options)), *quantisation)  # the kernels (interpreted on CPU)
    want = fused_experts_ref(*routed, **options)
    float_x = layer["x"].float()
    plain = dict(options, **dequantised, **dict.fromkeys(QUANTISATION_ARGS))
    want_dequantised = fused_experts_ref(float_x, *routed[1:], **plain)
    # Each bf16 result against the fp32 layer of the dequantised weights: two bf16 computations (the host's bf16
    # matmuls in the reference) can differ from each other by more than either differs from fp32.
    assert_close_rel(got, want_dequantised, dtype, "quantised")
    assert_close_rel(want, want_dequantised, dtype, "the dequantised weights' layer")
    unquantised = fused_experts(*routed, **exact)
    # Three quantised projections: fp8 per row ~28 dB, int8 ~35, int4 in groups of 16 ~17
    floor = {"fp8": 25.0, "fp8_b16": 25.0, "int4_g16": 15.0}.get(quantised, 30.0)
    assert sqnr_db(unquantised, got) >= floor


@pytest.mark.parametrize("inputs", ["fp8_rowwise", "fp8_groupwise"])
@pytest.mark.parametrize("form", ["halves", "w_up"])
def test_fp8_inputs_match_the_reference(form, inputs):
    """w8a8: x's rows and each slot's activation quantised to fp8 on the fly, against fp8 weights scaled per
    row ("fp8_rowwise": one scale per input row) or per 16 x 16 tile ("fp8_groupwise": one per input row and
    group of 16). The Triton path (fp8 dots, both scales on the accumulator, per K step in groups) gives the
    reference's result; the reference is the layer of the dequantised weights over the dequantised inputs,
    written out here; the layer stays within fp8's error of bf16."""
    dtype = torch.bfloat16
    layer = _layer(13, 2, 4, 32, 48, dtype, TRITON_DEVICE)
    options, exact, dequantised = _quantised_layer(
        layer, "fp8" if inputs == "fp8_rowwise" else "fp8_b16", form)
    options["input_quantisation"] = inputs
    routed = (layer["x"], layer["topk_weights"], layer["topk_ids"])
    quantisation = [options.get(name) for name in QUANTISATION_ARGS]
    got, _ = fused_experts_triton(*_args(dict(layer, **options)), *quantisation, inputs)
    want = fused_experts_ref(*routed, **options)
    # The kernels' activation and the reference's differ by bf16 rounding (their sums run in other orders),
    # and where that moves an element across an fp8 rounding boundary it differs by a step of fp8 (1/8 of
    # it): close, not equal, in the worst element; tens of dB closer than fp8's own error on the whole.
    assert ((got.float() - want.float()).abs().max() / want.float().abs().max()).item() <= 6e-2
    assert sqnr_db(want, got) >= 30.0
    # Written out: each GEMM over dequantised rows of its input.
    gate_up = dequantised["w_gate_up"] if form == "halves" else torch.cat([dequantised["w_gate_up"],
                                                                           dequantised["w_up"]], 1)
    def fp8_inputs(rows):
        if inputs == "fp8_rowwise":
            return dequantise(*quantise_per_row(rows, torch.float8_e4m3fn))
        grouped = rows.float().unflatten(-1, (-1, 16))
        scale = grouped.abs().amax(-1, keepdim=True) / 448
        return ((grouped / scale).to(torch.float8_e4m3fn).float() * scale).flatten(-2)

    x_rows = fp8_inputs(layer["x"])
    out = torch.zeros_like(x_rows)
    for t in range(x_rows.shape[0]):
        for j, e in enumerate(layer["topk_ids"][t].tolist()):
            gate, up = (gate_up[e] @ x_rows[t]).to(dtype).float().chunk(2)  # pre-activations in x's dtype
            h = (torch.nn.functional.silu(gate) * up).to(dtype)
            h = fp8_inputs(h[None])[0]
            out[t] += ((dequantised["w_down"][e] @ h) * layer["topk_weights"][t, j].float()).to(dtype).float()
    assert_close_rel(want, out.to(dtype), dtype, "written out")
    assert sqnr_db(fused_experts(*routed, **exact), got) >= 22.0  # fp8 weights and inputs: ~25 dB


def test_fp8_inputs_need_fp8_weights_scaled_per_row():
    layer = _layer(5, 2, 4, 32, 48, torch.bfloat16, "cpu")
    routed = (layer["x"], layer["topk_weights"], layer["topk_ids"])
    with pytest.raises(ValueError, match="input_quantisation: expected one of"):
        fused_experts_ref(*routed, layer["w_gate_up"], layer["w_down"], input_quantisation="fp8")
    for weights in ({}, _quantised_layer(layer, "int8", "halves")[0], _quantised_layer(layer, "int8_g16", "halves")[0]):
        with pytest.raises(ValueError, match="input_quantisation: 'fp8_rowwise' .* needs fp8 e4m3 weights"):
            fused_experts_ref(*routed, **dict(dict(w_gate_up=layer["w_gate_up"], w_down=layer["w_down"]), **weights),
                              input_quantisation="fp8_rowwise")
    fp8_rows = _quantised_layer(layer, "fp8", "halves")[0]
    with pytest.raises(ValueError, match=r"input_quantisation: 'fp8_groupwise' .* needs fp8 e4m3 weights with block"):
        fused_experts_ref(*routed, **fp8_rows, input_quantisation="fp8_groupwise")
    fp8_blocks = _quantised_layer(layer, "fp8_b16", "halves")[0]
    with pytest.raises(ValueError, match=r"input_quantisation: 'fp8_rowwise' .* needs fp8 e4m3 weights with per-row"):
        fused_experts_ref(*routed, **fp8_blocks, input_quantisation="fp8_rowwise")
    fused_experts_ref(*routed, **fp8_blocks, input_quantisation="fp8_groupwise")


def test_quantised_experts_compile_and_give_the_input_its_gradient():
    """Compiled, the op with quantised weights keeps them as they are (a constant of the graph) and gives the
    eager result; its input's gradient is the dequantised weights' one."""
    layer = _layer(9, 2, 4, 32, 48, torch.float32, "cpu")
    options, _, dequantised = _quantised_layer(layer, "int8", "halves")
    x = layer["x"].clone().requires_grad_(True)
    routed = (layer["topk_weights"], layer["topk_ids"])
    compiled = torch.compile(lambda x: fused_experts(x, *routed, **options), fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, fused_experts(layer["x"], *routed, **options))
    out.sum().backward()
    x_ref = layer["x"].clone().requires_grad_(True)
    fused_experts(x_ref, *routed, **dequantised).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_quantised_expert_errors_name_the_argument():
    layer = _layer(5, 2, 4, 32, 48, torch.bfloat16, "cpu")
    options, _, _ = _quantised_layer(layer, "int8", "halves")
    routed = (layer["x"], layer["topk_weights"], layer["topk_ids"])
    fused_experts_ref(*routed, **options)
    with pytest.raises(ValueError, match="w_down_scale: quantised expert weights need the scales"):
        fused_experts_ref(*routed, **dict(options, w_down_scale=None))
    with pytest.raises(ValueError, match=r"w_gate_up_scale: torch.int8 weights are quantised values, which need "
                                         r"their scales"):
        fused_experts_ref(*routed, **dict(options, w_gate_up_scale=None, w_down_scale=None))
    with pytest.raises(ValueError, match=r"w_down_scale: torch.int8 weights are quantised values"):
        fused_experts_ref(*routed, w_gate_up=layer["w_gate_up"], w_down=options["w_down"])
    with pytest.raises(ValueError, match="w_gate_up_scale: expected shape"):
        fused_experts_ref(*routed, **dict(options, w_gate_up_scale=options["w_gate_up_scale"][:, :-1]))
    with pytest.raises(ValueError, match="w_up_scale: given without w_up"):
        fused_experts_ref(*routed, **dict(options, w_up_scale=options["w_down_scale"]))
    # Zero points without their scales are named as such, on float weights too (a missing w_down_zero was blamed).
    zero = torch.zeros_like(options["w_gate_up_scale"])
    with pytest.raises(ValueError, match="w_gate_up_zero: zero points given without w_gate_up_scale"):
        fused_experts_ref(*routed, w_gate_up=layer["w_gate_up"], w_down=layer["w_down"], w_gate_up_zero=zero)
    with pytest.raises(ValueError, match="w_up_zero: given without w_up"):
        fused_experts_ref(*routed, **dict(options, w_up_zero=zero))
    with pytest.raises(ValueError, match="w_down_zero: zero points given without w_down_scale"):
        fused_experts_ref(*routed, **dict(options, w_down_scale=None, w_down_zero=options["w_down_scale"]))
    with pytest.raises(ValueError, match="w_gate_up_scale: quantised weights are stored by output feature"):
        fused_experts_ref(*routed, **dict(options, layout="EHF", w_gate_up=options["w_gate_up"].transpose(1, 2),
                                          w_down=options["w_down"].transpose(1, 2)))
    with pytest.raises(TypeError, match="w_down: expected dtype"):
        fused_experts_ref(*routed, **dict(options, w_down=layer["w_down"]))
    # Each projection is its own GEMM: int8 gate_up with an fp8 down is one call.
    fused_experts_ref(*routed, **dict(options, w_down=options["w_down"].to(torch.float8_e4m3fn)))


@pytest.mark.cuda
@pytest.mark.parametrize("quantised", [*QUANTISED, "int8_g128", "int4_g128"])
def test_cuda_quantised_experts_make_no_dequantised_copy(quantised):
    """Real shapes (Qwen3-30B-A3B's experts, decode and prefill): the quantised layer (per row, or in groups
    of 128) gives the reference's result, and no call holds more memory than a small share of the bf16
    weights (a dequantised copy of them would need all of it)."""
    E, H, Fi = 128, 2048, 768
    torch.manual_seed(0)
    w_gate_up = torch.randn(E, 2 * Fi, H, device="cuda", dtype=torch.bfloat16) / H**0.5
    w_down = torch.randn(E, H, Fi, device="cuda", dtype=torch.bfloat16) / Fi**0.5
    bf16_bytes = (w_gate_up.numel() + w_down.numel()) * 2
    options = {}
    for name, weight in dict(w_gate_up=w_gate_up, w_down=w_down).items():
        options[name], options[f"{name}_scale"], zero = quantise_weight(weight, quantised)
        if zero is not None:
            options[f"{name}_zero"] = zero
    del w_gate_up, w_down
    for T in (1, 2048):
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        ids = torch.rand(T, E, device="cuda").argsort(-1)[:, :8]
        weights = torch.rand(T, 8, device="cuda").softmax(-1)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fused_experts(x, weights, ids, **options)
        torch.cuda.synchronize()
        assert torch.cuda.max_memory_allocated() - before < bf16_bytes / 8
        want = fused_experts_ref(x, weights, ids, **options)
        assert_close_rel(out, want, torch.bfloat16, f"T={T}")


def test_triton_path_refuses_float64():
    """The kernels would compute float64 in fp32: the Triton path refuses it, naming the reference."""
    layer = _layer(4, 2, 4, 16, 8, torch.float64, TRITON_DEVICE)
    with pytest.raises(TypeError, match=r"x: float64 is computed by the plain-PyTorch reference only"):
        fused_experts_triton(*_args(layer))


# ---- CUDA only ----

REAL_SHAPES = [
    # (name, E, K, H, F, T)
    ("mixtral", 8, 2, 4096, 14336, 128),
    ("qwen3-30b-a3b", 128, 8, 2048, 768, 512),
    pytest.param("deepseek-v3", 256, 8, 7168, 2048, 64, marks=pytest.mark.whole_gpu),  # 21 GiB of bf16 weights
]


@pytest.mark.cuda
@pytest.mark.parametrize("name,E,K,H,Fi,T", REAL_SHAPES)
def test_cuda_real_shapes(name, E, K, H, Fi, T):
    layer = _layer(T, K, E, H, Fi, torch.bfloat16, "cuda")
    got = fused_experts(**layer)
    want, _ = fused_experts_ref(*_args(layer), return_num_dropped=True)
    assert_close_rel(got, want, torch.bfloat16, name)


@pytest.mark.cuda
def test_cuda_weights_on_another_device():
    layer = _layer(4, 2, 4, 16, 8, torch.float32, "cuda")
    with pytest.raises(ValueError, match="w_down: expected a tensor on cuda"):
        fused_experts(**dict(layer, w_down=layer["w_down"].cpu()))


@pytest.mark.cuda
@pytest.mark.parametrize("capacity_factor", [0.0, 1.25])
def test_cuda_graph_capture(capacity_factor):
    # Routing + the whole fused-experts call in one CUDA graph: proof that nothing syncs the host.
    from moe_ops import route

    T, K, E, H, Fi = 256, 8, 64, 512, 256
    layer = _layer(T, K, E, H, Fi, torch.bfloat16, "cuda")
    logits = torch.randn(T, E, device="cuda")

    def step():
        w, ids = route(logits, K, renormalize=True)
        return fused_experts(layer["x"], w, ids, layer["w_gate_up"], layer["w_down"],
                             capacity_factor=capacity_factor, return_num_dropped=True)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, dropped = step()
    for _ in range(2):
        logits.copy_(torch.randn(T, E, device="cuda"))
        layer["x"].copy_(torch.randn(T, H, device="cuda"))
        graph.replay()
        w, ids = route(logits, K, renormalize=True)
        want, want_dropped = fused_experts_ref(*_args(dict(layer, topk_weights=w, topk_ids=ids),
                                                      capacity_factor=capacity_factor), return_num_dropped=True)
        assert_close_rel(out, want, torch.bfloat16, "graph replay")
        assert int(dropped) == int(want_dropped)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_block_m_buckets(dtype):
    # Every token bucket's tile config, in every dtype (fp32 must still fit in shared memory).
    E, K, H, Fi = 8, 2, 1024, 1536
    for T in (1, 20, 100, 180, 2000):
        layer = _layer(T, K, E, H, Fi, dtype, "cuda")
        got = fused_experts(**layer)
        want, _ = fused_experts_ref(*_args(layer), return_num_dropped=True)
        assert_close_rel(got, want, dtype, f"T={T} block_m={choose_block_m(T * K, E)}")



@pytest.mark.parametrize("capacity_factor", [0.0, 1.25])
def test_compiles_with_dynamic_true(capacity_factor):
    """fused_experts inside torch.compile(dynamic=True, fullgraph=True), dropless and with capacity: its
    float arguments are SymFloats there."""
    layer = _layer(9, 2, 4, 16, 12, torch.float32, "cpu")

    def experts(x, weights, ids):
        return fused_experts(x, weights, ids, layer["w_gate_up"], layer["w_down"], capacity_factor=capacity_factor)

    torch._dynamo.reset()
    got = torch.compile(experts, dynamic=True, fullgraph=True)(layer["x"], layer["topk_weights"], layer["topk_ids"])
    want = experts(layer["x"], layer["topk_weights"], layer["topk_ids"])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("mode", ["eager", "compiled_dynamic", "compiled_static"])
def test_batch_invariant_mode(mode, monkeypatch):
    """moe_ops.config.batch_invariant: each token's output (routing and experts) is bitwise the same
    whichever other tokens share its batch: alone, in a small batch, in a batch that the default tiles
    would give TMA tiles and 128-row blocks. The same kernels on one device each time, so the host's
    BLAS (the interpreter's dots) rounds the same tile shapes alike."""
    if mode != "eager" and TRITON_DEVICE != "cuda":
        pytest.skip("compiled graphs of CPU tensors run the references, not the Triton kernels")
    monkeypatch.setattr(moe_ops.config, "batch_invariant", True)
    torch.manual_seed(0)
    if TRITON_DEVICE == "cuda":
        T, K, E, H, Fi, batches = 4096, 8, 64, 1024, 512, [(0, 1), (5, 8), (0, 100), (1000, 2000), (0, 4096)]
    else:
        T, K, E, H, Fi, batches = 80, 2, 8, 32, 32, [(0, 1), (5, 8), (37, 38), (0, 80)]
    layer = _layer(T, K, E, H, Fi, torch.bfloat16, TRITON_DEVICE)
    logits = torch.randn(T, E, device=TRITON_DEVICE).bfloat16()

    def moe_layer(x, logits, w_gate_up, w_down):
        if TRITON_DEVICE == "cpu":  # the kernels under the interpreter (CPU tensors take the references)
            weights, ids = route_triton(logits, K, "softmax", False, False, 0.0, None, 1, 1, 1.0)
            return fused_experts_triton(*_args(dict(layer, x=x, topk_weights=weights, topk_ids=ids)))[0]
        weights, ids = moe_ops.route(logits, K)
        return moe_ops.fused_experts(x, weights, ids, w_gate_up, w_down)

    if mode != "eager":
        torch._dynamo.reset()
        moe_layer = torch.compile(moe_layer, dynamic=mode == "compiled_dynamic", fullgraph=True)
    x, w_gate_up, w_down = layer["x"], layer["w_gate_up"], layer["w_down"]
    full = moe_layer(x, logits, w_gate_up, w_down)
    for start, end in batches:
        part = moe_layer(x[start:end], logits[start:end], w_gate_up, w_down)
        assert torch.equal(part, full[start:end]), f"tokens {start}:{end} alone differ from the full batch"
