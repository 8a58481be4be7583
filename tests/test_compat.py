"""The compat layer (moe_ops/_compat/): every private torch or Triton name moe_ops uses is reached through
one of its area modules, each entry exists in this torch, and what the version-dependent helpers return
is what their callers rely on. A torch release that moves an internal fails here, by name."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch
import torch._inductor.config  # noqa: F401  (the Inductor areas are imported after it, as moe_ops does)
import triton
import triton.language as tl
from conftest import TRITON_DEVICE

from moe_ops._compat.triton_interpreter import fix_interpreter_bf16

AREAS = ["dispatch", "inductor_hooks", "inductor", "dynamo", "imports", "triton_interpreter", "distributed", "matmul",
         "tracing", "modules"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("area", AREAS)
def test_every_entry_exists(area):
    module = importlib.import_module(f"moe_ops._compat.{area}")
    assert module.__all__, area
    missing = [name for name in module.__all__ if getattr(module, name, None) is None]
    assert not missing, f"moe_ops._compat.{area} lacks {missing} on torch {torch.__version__}"


def test_no_private_torch_import_outside_the_compat_layer():
    """``from torch._x import`` / ``import torch._x`` only in moe_ops/_compat/ (install.py's hook names the
    module it waits for as a string, which is no import)."""
    pattern = re.compile(r"^\s*(from torch\._|import torch\._)", re.MULTILINE)
    offenders = [str(path.relative_to(ROOT)) for folder in ("moe_ops", "lowering")
                 for path in sorted((ROOT / folder).rglob("*.py"))
                 if "_compat" not in path.parts and pattern.search(path.read_text())]
    assert not offenders, offenders


def test_inductor_overlap_passes_exist():
    """Each overlap pass named in moe_ops._compat.distributed is a function of torch._inductor.comms, and the
    config fields it sets exist."""
    import torch._inductor.comms as comms

    from moe_ops._compat.distributed import INDUCTOR_OVERLAP_PASSES, inductor_overlap_config

    assert all(callable(getattr(comms, name, None)) for name in INDUCTOR_OVERLAP_PASSES), INDUCTOR_OVERLAP_PASSES
    with torch._inductor.config.patch(**inductor_overlap_config()):
        assert torch._inductor.config.reorder_for_compute_comm_overlap


def test_custom_op_kernel_finds_the_cuda_registration():
    """The registered CUDA kernel (torch wraps it) of an op that has one; None for a CPU-only op or none."""
    from moe_ops._compat.dispatch import custom_op_kernel

    assert callable(custom_op_kernel("moe_ops::fused_experts", "cuda"))
    assert custom_op_kernel("moe_ops::fused_experts", "cpu") is None
    assert custom_op_kernel("moe_ops::no_such_op", "cuda") is None
    assert custom_op_kernel("moe_ops::no_such_op", "cuda") is None


def test_custom_passes_in_reads_every_hook_form():
    from moe_ops._compat.inductor_hooks import custom_passes_in

    def a(graph):
        return None

    assert custom_passes_in(None) == () and custom_passes_in(a) == (a,) and custom_passes_in([a, a]) == (a, a)


def test_modes_are_seen():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from moe_ops._compat.dispatch import no_tracing_or_modes_active

    assert no_tracing_or_modes_active()
    with FakeTensorMode():
        assert not no_tracing_or_modes_active()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_grouped_mm_groups_along_the_inner_dimension(dtype):
    """grouped_mm(a (M, P), b (P, N), ends) is each group's a[:, rows] @ b[rows] (what the weight
    gradients rely on), an empty group giving zeros, ``a`` read transposed (column-major)."""
    from moe_ops._compat.matmul import grouped_mm

    a_PM, b_PN = torch.randn(48, 8, dtype=dtype), torch.randn(48, 16, dtype=dtype)
    ends = torch.tensor([16, 16, 32, 48], dtype=torch.int32)
    got = grouped_mm(a_PM.t(), b_PN, ends)
    starts = [0, 16, 16, 32]
    want = torch.stack([a_PM[s:e].t().double() @ b_PN[s:e].double()
                        for s, e in zip(starts, ends.tolist(), strict=True)])
    assert got.shape == (4, 8, 16) and got.dtype == dtype
    assert (got[1] == 0).all()
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_sym_min_and_check_value_trace_in_one_graph():
    """Both compile without a graph break (torch 2.11 broke at torch.sym_min of two ints and at a message
    function), sym_min gives the smaller value for ints and SymInts, and check_value fails eager with its
    message and compiled with the graph's assertion."""
    from moe_ops._compat.tracing import check_value, sym_min

    def fn(x, limit: int):
        check_value((x > 100).sum().item() == 0, "x: expected no value above 100")
        return x[: sym_min(limit, 4)] * sym_min(x.shape[0], limit)

    x = torch.arange(6.0)
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        for dynamic in (False, True):
            torch._dynamo.reset()
            compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic)
            torch.testing.assert_close(compiled(x, 3), x[:3] * 3)
            torch.testing.assert_close(compiled(x[:2], 5), x[:2] * 2)
            with pytest.raises(RuntimeError):
                compiled(x + 200, 3)
    with pytest.raises(ValueError, match="no value above 100"):
        fn(x + 200, 3)


def test_compiled_since_reset():
    """Whether a graph was compiled since torch.compiler.reset() (the config's warning asks it)."""
    from moe_ops._compat.dynamo import compiled_since_reset

    torch._dynamo.reset()
    assert not compiled_since_reset()
    torch.compile(lambda x: x * 3)(torch.ones(2))
    assert compiled_since_reset()
    torch._dynamo.reset()
    assert not compiled_since_reset()


def test_check_value_without_a_traced_message(monkeypatch):
    """The form of torch versions that cannot trace a message function (2.11): compiled, the graph's own
    assertion; eager, the message."""
    from moe_ops._compat import tracing

    monkeypatch.setattr(tracing, "_MESSAGE_FUNCTIONS_TRACE", False)

    def fn(x):
        tracing.check_value((x > 100).sum().item() == 0, "x: expected no value above 100")
        return x * 2

    x = torch.arange(6.0)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        compiled = torch.compile(fn, fullgraph=True)
        torch.testing.assert_close(compiled(x), x * 2)
        with pytest.raises(RuntimeError, match="u0"):  # the graph's assertion names the unbacked value
            compiled(x + 200)
    with pytest.raises(ValueError, match="no value above 100"):
        fn(x + 200)


def test_functorch_transform_active_is_read_when_dynamo_traces():
    """dispatch.functorch_transform_active runs at trace time (a traced call would be a graph value, truthy): False
    under torch.compile alone, True while dynamo traces torch.compile(torch.func.grad(f)), as eagerly."""
    from moe_ops._compat.dispatch import functorch_transform_active

    def scaled(x):
        return (x * (3.0 if functorch_transform_active() else 2.0)).sum()

    x = torch.ones(2)
    assert float(torch.compile(scaled, fullgraph=True)(x)) == 4.0
    torch.testing.assert_close(torch.func.grad(scaled)(x), torch.full((2,), 3.0))
    torch.testing.assert_close(torch.compile(torch.func.grad(scaled), fullgraph=True)(x), torch.full((2,), 3.0))


def test_passes_reach_compiles_in_other_threads():
    """torch 2.13 keeps Inductor settings per thread: the moe_ops passes are in every thread's hooks all the same
    (one pass object, not a copy), and a routing block compiled in a worker thread is rewritten. In a process of its
    own: Inductor's C++ kernels compiled and run in a thread left the torch 2.11 process to crash later (a pytest
    worker segfaulted in another test's kernel)."""
    import subprocess
    import sys

    script = """
import threading
import torch
import torch._inductor.config as inductor_config
from torch._dynamo.utils import counters
import moe_ops

inductor_config.fx_graph_cache = False  # a cache hit would skip the passes
logits = torch.randn(6, 8)

def route(x):
    weights_TK, ids_TK = torch.topk(torch.softmax(x, dim=-1), 2, dim=-1)
    return weights_TK / weights_TK.sum(dim=-1, keepdim=True), ids_TK

seen = {}
def worker():
    inductor_config.fx_graph_cache = False  # this thread's own setting on torch 2.13
    seen["hooks"] = (inductor_config.post_grad_custom_post_pass, inductor_config.joint_custom_post_pass,
                     inductor_config.pre_grad_custom_pass)
    seen["compiled"] = torch.compile(route, fullgraph=True)(logits)

thread = threading.Thread(target=worker)
thread.start()
thread.join()
assert seen["hooks"] == (inductor_config.post_grad_custom_post_pass, inductor_config.joint_custom_post_pass,
                         inductor_config.pre_grad_custom_pass)
assert [type(hook).__name__ for hook in seen["hooks"]] == ["MoeOpsPostGradPass", "MoeOpsJointPass", "MoeOpsPreGradPass"]
assert moe_ops.config.rewrites
torch.testing.assert_close(seen["compiled"], route(logits))
print("route rewrites", counters["moe_ops"]["route_rewrite"])
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "route rewrites 1" in result.stdout


@triton.jit
def _casts_to_bf16(x_ptr, cast_ptr, stored_ptr, N: tl.constexpr):
    values = tl.load(x_ptr + tl.arange(0, N))
    tl.store(cast_ptr + tl.arange(0, N), values.to(tl.bfloat16))
    tl.store(stored_ptr + tl.arange(0, N), values)  # fp32 values into a bf16 tensor: the store casts


def test_kernel_casts_to_bf16_round_to_nearest_even():
    """A kernel's fp32 -> bf16 casts round as torch's do (to nearest, ties to even; NaN stays NaN, past bf16's
    largest value is inf), on the GPU and under the interpreter, whose own casts truncate (fix_interpreter_bf16
    mends them: 1.5937 came out 1.5859 instead of 1.5938)."""
    fix_interpreter_bf16()
    x = torch.tensor([1.5937, -1.5937, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-10, -(1 + 2**-8 + 2**-10), 3.4e38,
                      float("inf"), float("nan"), 1e-40, 0.0, -0.0, 7.005, 2**-133, 65504.0, 0.1],
                     dtype=torch.float32, device=TRITON_DEVICE)
    cast, stored = torch.empty_like(x, dtype=torch.bfloat16), torch.empty_like(x, dtype=torch.bfloat16)
    _casts_to_bf16[(1,)](x, cast, stored, N=x.numel())
    want = x.to(torch.bfloat16)
    for name, got in (("cast", cast), ("store", stored)):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=name)
        numbers = ~torch.isnan(want)  # a NaN's sign is no one's contract (torch's CPU cast sets it here)
        assert torch.equal(torch.signbit(got[numbers]), torch.signbit(want[numbers])), name


@pytest.mark.parametrize("registration", ["forward", "forward_pre", "full_backward", "full_backward_pre"])
@pytest.mark.parametrize("scope", ["own", "global"])
def test_hooks_a_call_runs_finds_each_registry(registration, scope):
    """modules.hooks_a_call_runs reads each registry a module call runs hooks from (this torch's private names):
    the module's own and the one for every module, for each kind of hook; none once the hook is removed."""
    from moe_ops._compat.modules import hooks_a_call_runs

    module = torch.nn.Linear(2, 2)
    assert hooks_a_call_runs(module) is None
    if scope == "own":
        handle = getattr(module, f"register_{registration}_hook")(lambda *args: None)
    else:
        handle = getattr(torch.nn.modules.module, f"register_module_{registration}_hook")(lambda *args: None)
    try:
        kind = registration.replace("full_", "").replace("_", " ")
        assert hooks_a_call_runs(module) == ("global " if scope == "global" else "") + f"{kind} hooks"
    finally:
        handle.remove()
    assert hooks_a_call_runs(module) is None
