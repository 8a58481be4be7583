"""moe_ops.fused_experts_ep: experts sharded over processes (gloo on the CPU, spawned ranks), outputs and
gradients against one process running moe_ops.fused_experts_ref over all the ranks' tokens with all the
experts; both dispatches, 2 and 4 ranks, skewed routing with idle experts (a rank that receives nothing),
capacity overflow, and one compiled graph (forward and backward) across routings and token counts."""

from __future__ import annotations

import math
import os
import re
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import assert_close_rel
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from torch.distributed.tensor import DTensor

from moe_ops.expert_parallel import DISPATCHES, fused_experts_ep
from moe_ops.fused_experts import fused_experts_ref

E, K, H, F = 8, 2, 16, 12


def _inputs(rank: int, num_tokens: int):
    """Rank ``rank``'s tokens, routing weights and ids (skewed: expert 0 is popular, experts E - 2 and E - 1
    idle, so that with 4 ranks the last rank receives no rows at all)."""
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(num_tokens, H, generator=g)
    scores = torch.rand(num_tokens, E, generator=g)
    scores[:, 0] += 0.5
    scores[:, E - 2:] = -1.0
    ids = scores.topk(K, dim=-1).indices.to(torch.int32)
    weights = torch.rand(num_tokens, K, generator=g).softmax(-1)
    grad_out = torch.randn(num_tokens, H, generator=g)
    return x, weights, ids, grad_out


def _weights():
    g = torch.Generator().manual_seed(0)
    return torch.randn(E, 2 * F, H, generator=g) / H**0.5, torch.randn(E, H, F, generator=g) / F**0.5


def _kept_by_capacity(ids, num_ranks, capacity):
    """Independent statement of the padded dispatch's capacity: per destination rank, the first
    ``capacity`` slots in slot order are kept; dropped slots become id E (routed to no expert)."""
    kept = ids.clone()
    sent = [0] * num_ranks
    for t in range(ids.shape[0]):
        for k in range(ids.shape[1]):
            rank = int(ids[t, k]) // (E // num_ranks)
            if sent[rank] >= capacity:
                kept[t, k] = E
            sent[rank] += 1
    return kept


def _destroy_process_group():
    """Destroy the gloo group, then release the GIL a moment before the worker process exits: gloo's worker
    threads drop a finished collective's tensors after its wait() returns, and a drop that needs the GIL
    while Python is finalizing aborts the process ("terminate called without an active exception",
    torch's gloo backend on 2.13; about 1 run in 10 of a 2-rank spawn without this pause)."""
    dist.destroy_process_group()
    time.sleep(0.1)


# NCCL settings the two-GPU host needs (no NVLink multicast), set in every rank before its group starts.
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _worker(rank, num_ranks, init_file, case):
    if case.get("device") == "cuda":
        os.environ.update(NCCL_ENV)
        torch.cuda.set_device(rank)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=num_ranks)
    try:
        _check(rank, num_ranks, **case)
    finally:
        _destroy_process_group()


def _check(rank, num_ranks, dispatch, capacity_factor, compiled, tokens, device="cpu", dtype=torch.float32,
           pipeline_chunks=1):
    """One rank's outputs and gradients against one process's reference. On the CPU in fp32 (gloo); on a
    GPU per rank (NCCL) in ``dtype``, the reference in fp32 and the comparison at ``dtype``'s tolerance."""
    torch.manual_seed(0)
    local = E // num_ranks
    w_gate_up, w_down = _weights()
    on = lambda t: t.to(f"cuda:{rank}" if device == "cuda" else "cpu")  # noqa: E731
    run = fused_experts_ep
    if compiled:
        torch._dynamo.reset()
        counters.clear()
        backend = CompileCounterWithBackend("inductor")
        run = torch.compile(fused_experts_ep, fullgraph=True, backend=backend)
    for routing in range(3 if compiled else 1):
        # Compiled, each routing has another T (marked dynamic, as a training loop's varying batch would be).
        num_tokens = tokens + 3 * routing
        token_counts = [num_tokens if dispatch == "padded" else num_tokens + 3 * r for r in range(num_ranks)]
        inputs = [_inputs(r + 10 * routing, n) for r, n in enumerate(token_counts)]
        x, weights, ids, grad_out = (on(t) for t in inputs[rank])
        leaves = [on(t).to(dtype).detach().clone().requires_grad_(True)
                  for t in (x, w_gate_up[rank * local:(rank + 1) * local], w_down[rank * local:(rank + 1) * local])]
        leaves.insert(1, weights.detach().clone().requires_grad_(True))  # routing weights stay fp32
        # The reference (on the CPU, in fp32) starts from the values the ranks use (rounded to dtype).
        inputs = [(x_r.to(dtype).float(), *rest) for x_r, *rest in inputs]
        full_weights = [w.to(dtype).float() for w in (w_gate_up, w_down)]
        if compiled:
            for tensor in (leaves[0], leaves[1], ids):
                torch._dynamo.mark_dynamic(tensor, 0)
        out, dropped = run(leaves[0], leaves[1], ids, leaves[2], leaves[3], dispatch=dispatch,
                           capacity_factor=capacity_factor, return_num_dropped=True, pipeline_chunks=pipeline_chunks)
        torch.autograd.backward(out, grad_out.to(dtype))

        # The reference: every rank's tokens through all experts in one process (the expert weights'
        # gradients collect every rank's tokens), the capacity's drops stated independently.
        full = [w.clone().requires_grad_(True) for w in full_weights]
        total, want_dropped = 0.0, 0
        for r, (x_r, weights_r, ids_r, grad_r) in enumerate(inputs):
            x_r, weights_r = x_r.clone().requires_grad_(True), weights_r.clone().requires_grad_(True)
            if capacity_factor is not None:
                kept = _kept_by_capacity(ids_r, num_ranks, math.ceil(capacity_factor * ids_r.numel() / num_ranks))
                want_dropped += int((kept == E).sum()) if r == rank else 0
                ids_r = kept
            out_r = fused_experts_ref(x_r, weights_r, ids_r, *full)
            total = total + (out_r * grad_r).sum()
            if r == rank:
                want_out, want_x, want_w = out_r, x_r, weights_r
        total.backward()
        got = [out, leaves[0].grad, leaves[1].grad, *(leaf.grad for leaf in leaves[2:])]
        want = [want_out.detach(), want_x.grad, want_w.grad,
                *(whole.grad[rank * local:(rank + 1) * local] for whole in full)]
        for what, actual, expected in zip(("out", "dx", "d weights", "d w_gate_up", "d w_down"), got, want,
                                          strict=True):
            if device == "cpu":
                torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=lambda m, w=what: f"{w}: {m}")
            else:
                assert_close_rel(actual, expected, dtype, what)
        assert int(dropped) == want_dropped, (int(dropped), want_dropped)
    if compiled:
        assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
        # The graph dynamo captured: the exchange is moe_ops' ops around the local experts' op; pipelined, every
        # chunk's dispatch first, then each chunk's experts followed by its return.
        moe_ops_calls = [str(node.target) for node in backend.graphs[0].graph.nodes
                         if node.op == "call_function" and str(node.target).startswith("moe_ops.")]
        if pipeline_chunks == 1:
            want_calls = ["moe_ops.ep_dispatch", "moe_ops.fused_experts", "moe_ops.ep_combine"]
        else:
            want_calls = (["moe_ops.ep_dispatch"] * pipeline_chunks
                          + ["moe_ops.fused_experts", "moe_ops.ep_return"] * pipeline_chunks)
        assert moe_ops_calls == want_calls, moe_ops_calls


def _spawn(num_ranks, **case):
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(num_ranks, os.path.join(folder, "init"), case), nprocs=num_ranks, join=True)


@pytest.mark.parametrize("num_ranks", [2, 4])
@pytest.mark.parametrize("dispatch", ["padded", "exact"])
def test_matches_one_process(dispatch, num_ranks):
    _spawn(num_ranks, dispatch=dispatch, capacity_factor=None, compiled=False, tokens=9)


def test_padded_capacity_drops_the_overflow_in_slot_order():
    # 12 tokens x 2 slots over 2 ranks: C = ceil(0.6 * 24 / 2) = 8 rows per rank, below the skewed load.
    _spawn(2, dispatch="padded", capacity_factor=0.6, compiled=False, tokens=12)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_pipelined_chunks_match_one_process(compiled):
    """pipeline_chunks=3 (each destination's rows in 3 chunks, 2 ranks): the same outputs and gradients
    (eager with capacity 0.7: C = ceil(0.7 * 26 / 2) = 10 rows, sent as 3 chunks of 4; the drops those of
    C = 10); compiled (dropless: C = 13 * 2, sent as 3 chunks of 9), one graph
    across routings holding every chunk's dispatch before the first chunk's experts, each chunk's return
    right after its experts."""
    _spawn(2, dispatch="padded", capacity_factor=0.7 if not compiled else None, compiled=compiled, tokens=13,
           pipeline_chunks=3)


@pytest.mark.parametrize("dispatch", ["padded", "exact"])
def test_compiled_is_one_graph_across_routings(dispatch):
    """One graph (forward and backward) for three routings and three token counts T (marked dynamic):
    padded: sizes from T alone; exact: the exchanged counts as unbacked sizes (one host sync, no recompile)."""
    _spawn(2, dispatch=dispatch, capacity_factor=None, compiled=True, tokens=8)


def _overlap_worker(rank, num_ranks, init_file):
    """Rank 0 records the wrapper code Inductor generates for a pipelined call with its overlap passes on."""
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    from moe_ops._compat.distributed import inductor_overlap_config

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=num_ranks)
    try:
        torch._dynamo.reset()
        w_gate_up, w_down = (w[rank * E // num_ranks:(rank + 1) * E // num_ranks] for w in _weights())
        x, weights, ids, _ = _inputs(rank, 13)
        with inductor_config.patch(force_disable_caches=True, **inductor_overlap_config()):
            step = torch.compile(lambda *args: fused_experts_ep(*args, pipeline_chunks=3), fullgraph=True)
            _, (code, *_) = run_and_get_code(step, x, weights, ids, w_gate_up, w_down)
        if rank == 0:
            with open(init_file + ".code", "w") as file:
                file.write(code[code.index("def call("):])
    finally:
        _destroy_process_group()


def test_pipelined_chunks_overlap_in_the_compiled_schedule():
    """With Inductor's overlap passes (reorder_for_compute_comm_overlap), the generated code of a call with 3
    chunks issues all three dispatches before the first chunk's experts, waits for chunk j's rows just
    before chunk j's experts, and waits for every return only after the last experts: chunk j + 1's dispatch
    and chunk j's return are in flight while experts run."""
    with tempfile.TemporaryDirectory() as folder:
        init_file = os.path.join(folder, "init")
        mp.spawn(_overlap_worker, args=(2, init_file), nprocs=2, join=True)
        code = open(init_file + ".code").read()
    events = []  # (kind, chunk) in the order the generated code runs them
    for line in code.splitlines():
        if line.strip().startswith("# Topologically Sorted Source Nodes:"):
            source = line
        elif "all_to_all_single.default(" in line or "wait_tensor.default(" in line or "fused_experts.default(" in line:
            names = [name.strip(" []") for name in source.split("Nodes:")[1].split("Original ATen")[0].split(",")]
            name = next(n for n in names if n.startswith(("ep_dispatch", "ep_return", "fused_experts")))
            kind = ("issue " if "all_to_all" in line else "wait " if "wait_tensor" in line else "") + name.rstrip(
                "_0123456789")
            events.append((kind, int(name.rsplit("_", 1)[1]) if name[-1].isdigit() else 0))
    experts = [i for i, (kind, _) in enumerate(events) if kind == "fused_experts"]
    assert [chunk for kind, chunk in events if kind == "fused_experts"] == [0, 1, 2], events
    issued = [i for i, (kind, _) in enumerate(events) if kind == "issue ep_dispatch"]
    assert len(issued) == 6 and max(issued) < experts[0], events  # rows and ids of each chunk
    for j, at in enumerate(experts):
        waits = [i for i, (kind, chunk) in enumerate(events) if kind == "wait ep_dispatch" and chunk == j]
        assert len(waits) == 2 and all((experts[j - 1] if j else -1) < i < at for i in waits), events
    return_waits = [i for i, (kind, _) in enumerate(events) if kind == "wait ep_return"]
    assert len(return_waits) == 3 and min(return_waits) > experts[-1], events


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


@pytest.mark.cuda
@two_gpus
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dispatch", ["padded", "exact"])
def test_cuda_two_gpus_match_one_process(dispatch, compiled):
    """Two GPUs over NCCL, bf16, the Triton kernels on each rank: outputs and gradients against one
    process's fp32 reference over both ranks' tokens; compiled, one graph across routings and T."""
    _spawn(2, dispatch=dispatch, capacity_factor=None, compiled=compiled, tokens=64, device="cuda",
           dtype=torch.bfloat16)


def _cuda_graph_worker(rank, num_ranks, init_file):
    os.environ.update(NCCL_ENV)
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=num_ranks)
    try:
        local = E // num_ranks
        w_gate_up, w_down = (w[rank * local:(rank + 1) * local].to(f"cuda:{rank}", torch.bfloat16)
                             for w in _weights())
        step = torch.compile(fused_experts_ep, mode="reduce-overhead", fullgraph=True)
        for routing in range(3):  # replays of one captured graph, new routings each time
            x, weights, ids, _ = (t.to(f"cuda:{rank}") for t in _inputs(rank + 10 * routing, 32))
            torch.compiler.cudagraph_mark_step_begin()
            out = step(x.to(torch.bfloat16), weights, ids, w_gate_up, w_down, dispatch="padded").clone()
            want = fused_experts_ep(x.to(torch.bfloat16), weights, ids, w_gate_up, w_down, dispatch="padded")
            assert_close_rel(out, want, torch.bfloat16, f"routing {routing}")
    finally:
        _destroy_process_group()


@pytest.mark.cuda
@two_gpus
def test_cuda_two_gpus_padded_dispatch_replays_as_a_cuda_graph():
    """The padded dispatch has no host synchronisation: compiled with mode="reduce-overhead" its forward is
    captured once and replayed for new routings, equal to the eager call."""
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_cuda_graph_worker, args=(2, os.path.join(folder, "init")), nprocs=2, join=True)


def _edge_worker(rank, num_ranks, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=num_ranks)
    try:
        w_gate_up, w_down = _weights()
        local = E // num_ranks
        mine = w_gate_up[rank * local:(rank + 1) * local], w_down[rank * local:(rank + 1) * local]
        # A rank with no tokens: (0, H) out, as fused_experts gives (its (0, K, H) slots made reshape fail).
        for dispatch, token_counts in (("exact", [0, 5]), ("padded", [0, 0])):
            x, weights, ids, _ = _inputs(rank, token_counts[rank])
            out = fused_experts_ep(x, weights, ids, *mine, dispatch=dispatch)
            torch.testing.assert_close(out, fused_experts_ref(x, weights, ids, w_gate_up, w_down), rtol=1e-5,
                                       atol=1e-5)
        # Ranks holding other numbers of experts send an id to another rank than the one holding it (silently
        # wrong before): "exact", which exchanges counts, refuses it on every rank.
        bounds = [(0, 3), (3, E)][rank]
        x, weights, ids, _ = _inputs(rank, 6)
        with pytest.raises(ValueError, match=r"w_gate_up: every rank holds E / R experts .* this rank holds [35]"):
            fused_experts_ep(x, weights, ids, w_gate_up[slice(*bounds)], w_down[slice(*bounds)], dispatch="exact")
    finally:
        _destroy_process_group()


def test_a_rank_without_tokens_and_uneven_shards():
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_edge_worker, args=(2, os.path.join(folder, "init")), nprocs=2, join=True)


def _float64_worker(rank, num_ranks, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=num_ranks)
    try:
        x, weights, ids, _ = _inputs(rank, 3)
        x, weights = x.double(), weights.double()
        w_gate_up, w_down = (w.double() for w in _weights())
        want = fused_experts_ref(x, weights, ids, w_gate_up, w_down)
        for dispatch in DISPATCHES:
            # fp64 sums as fused_experts makes them (the token sums ran in fp32: 4e-8 off, and gradcheck failed).
            out = fused_experts_ep(x, weights, ids, w_gate_up, w_down, dispatch=dispatch)
            torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
            assert torch.autograd.gradcheck(
                lambda x_, w_, dispatch=dispatch: fused_experts_ep(x_, w_, ids, w_gate_up, w_down, dispatch=dispatch),
                (x.clone().requires_grad_(True), weights.clone().requires_grad_(True)))
    finally:
        _destroy_process_group()


def test_float64_keeps_its_precision():
    """fused_experts_ep of fp64 tensors is fused_experts' fp64 computation (gradcheck passes), on one rank."""
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_float64_worker, args=(1, os.path.join(folder, "init")), nprocs=1, join=True)


def _repeated_ids_worker(rank, num_ranks, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=num_ranks)
    try:
        # The same tokens on both ranks (so each expert's gradient is twice one process's). K = 6 slots naming
        # few experts: 5 slots of expert 0 (rank 0 holds E_local = 4 experts), a token naming expert 7 six times;
        # a token of distinct ids with an inf weight (its other slots' weights stay as they are).
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4, H, generator=g)
        ids = torch.tensor([[0, 0, 0, 0, 0, 1], [7, 7, 7, 7, 7, 7], [2, 5, 2, 9, -1, 5], [3, 4, 6, 1, 0, 7]],
                           dtype=torch.int32)
        weights = torch.rand(4, 6, generator=g)
        weights[3, 5] = float("inf")
        grad_out = torch.randn(4, H, generator=g)
        local = slice(rank * E // num_ranks, (rank + 1) * E // num_ranks)
        full = [w.requires_grad_(True) for w in _weights()]
        want_leaves = [x.clone().requires_grad_(True), weights.clone().requires_grad_(True)]
        want = fused_experts_ref(*want_leaves[:1], want_leaves[1], ids, *full)
        want.backward(grad_out)
        for dispatch, chunks in (("padded", 1), ("padded", 2), ("exact", 1)):
            leaves = [x.clone().requires_grad_(True), weights.clone().requires_grad_(True),
                      *(w.detach()[local].clone().requires_grad_(True) for w in full)]
            out, dropped = fused_experts_ep(leaves[0], leaves[1], ids, leaves[2], leaves[3], dispatch=dispatch,
                                            pipeline_chunks=chunks, return_num_dropped=True)
            out.backward(grad_out)
            assert int(dropped) == 0, (dispatch, int(dropped))
            got = [out, *(leaf.grad for leaf in leaves)]
            expected = [want, want_leaves[0].grad, want_leaves[1].grad, *(2 * w.grad[local] for w in full)]
            for what, actual, wanted in zip(("out", "dx", "d weights", "d w_gate_up", "d w_down"), got, expected,
                                            strict=True):
                torch.testing.assert_close(actual, wanted, rtol=1e-5, atol=1e-5, equal_nan=True,
                                           msg=lambda m, w=what, d=dispatch: f"{d} {w}: {m}")
        with pytest.raises(ValueError, match=re.escape("topk_ids: expected 1 <= K <= E=8 choices per token")):
            fused_experts_ep(x, torch.rand(4, 9), torch.zeros(4, 9, dtype=torch.int32), full[0].detach()[local],
                             full[1].detach()[local])
    finally:
        _destroy_process_group()


def test_a_token_naming_an_expert_in_several_slots_drops_nothing():
    """Padded dispatch's dropless block, T * min(K, E_local) rows, holds a token whose slots name one expert
    several times (as fused_experts allows): those slots go as one row weighted by their weights' sum, so
    output and gradients equal one process's, as with exact dispatch; and K > E is refused as fused_experts
    refuses it."""
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_repeated_ids_worker, args=(2, os.path.join(folder, "init")), nprocs=2, join=True)


def test_errors_name_the_argument():
    x, weights, ids, _ = _inputs(0, 4)
    w_gate_up, w_down = _weights()
    with pytest.raises(ValueError, match="dispatch: expected one of"):
        fused_experts_ep(x, weights, ids, w_gate_up, w_down, dispatch="dense")
    with pytest.raises(TypeError, match="return_num_dropped: expected True or False, got 1"):
        fused_experts_ep(x, weights, ids, w_gate_up, w_down, return_num_dropped=1)
    with pytest.raises(ValueError, match="pipeline_chunks: a positive int, above 1 only with dispatch='padded'"):
        fused_experts_ep(x, weights, ids, w_gate_up, w_down, dispatch="exact", pipeline_chunks=2)
    with pytest.raises(ValueError, match="capacity_factor: a finite positive number with dispatch='padded'"):
        fused_experts_ep(x, weights, ids, w_gate_up, w_down, dispatch="exact", capacity_factor=1.0)
    with pytest.raises(ValueError, match="capacity_factor: expected a finite number, got inf"):
        fused_experts_ep(x, weights, ids, w_gate_up, w_down, capacity_factor=math.inf)
    with pytest.raises(ValueError, match="drop_policy: fused_experts_ep's capacity .* takes no drop_policy"):
        fused_experts_ep(x, weights, ids, w_gate_up, w_down, capacity_factor=None, drop_policy="score")
    with pytest.raises(TypeError, match="capacity_factor: expected a number, got '1.0'"):
        fused_experts_ep(x, weights, ids, w_gate_up, w_down, capacity_factor="1.0")
    with pytest.raises(TypeError, match="group: expected a torch.distributed ProcessGroup .* got str"):
        fused_experts_ep(x, weights, ids, w_gate_up, w_down, group="world")


# ---- A transformers model's MoE block, sharded by moe_ops.parallelize_experts ---------------------


def _hf_block(family="qwen3_moe"):
    """transformers' own MoE block: Qwen3-MoE's, or GPT-OSS's (transposed, interleaved gate/up weights
    with biases, clamped SwiGLU)."""
    if family.startswith("torchtitan"):
        torch.manual_seed(0)
        return TorchtitanMoE(layout=family.split("_")[1])
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    torch.manual_seed(0)
    if family == "gpt_oss":
        block = GptOssMLP(transformers.GptOssConfig(
            hidden_size=H, intermediate_size=F, num_local_experts=E, num_experts_per_tok=K))
    else:
        block = Qwen3MoeSparseMoeBlock(transformers.Qwen3MoeConfig(
            hidden_size=H, moe_intermediate_size=F, num_experts=E, num_experts_per_tok=K, norm_topk_prob=True))
    block.experts.config._experts_implementation = "grouped_mm"
    for parameter in block.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    return block


class GroupedExperts(torch.nn.Module):
    """torchtitan's grouped experts as its releases write them: stacked w1, w2, w3 and a forward over rows
    grouped by expert (here its reference loop over the experts). ``layout`` "EFH": w1 (E, F, H), as
    torchtitan today; "EHF": w1 (E, H, F), as its earlier releases; ``activation`` other than SiLU: a
    module parallelize_experts must refuse."""

    def __init__(self, layout="EFH", activation=torch.nn.functional.silu):
        super().__init__()
        shapes = {"EFH": ((E, F, H), (E, H, F)), "EHF": ((E, H, F), (E, F, H))}[layout]
        self.layout, self.activation = layout, activation
        self.w1, self.w3 = (torch.nn.Parameter(torch.randn(*shapes[0]) / H**0.5) for _ in range(2))
        self.w2 = torch.nn.Parameter(torch.randn(*shapes[1]) / F**0.5)

    def forward(self, x_RH, num_tokens_per_expert_E):
        outputs, start = [], 0
        for e, count in enumerate(num_tokens_per_expert_E.tolist()):
            rows = x_RH[start:start + int(count)]
            start += int(count)
            w1, w2, w3 = (w[e] if self.layout == "EHF" else w[e].t() for w in (self.w1, self.w2, self.w3))
            outputs.append((self.activation(rows @ w1) * (rows @ w3)) @ w2)
        return torch.cat(outputs)


class TorchtitanMoE(torch.nn.Module):
    """torchtitan's MoE block around its grouped experts: a top-K softmax router, the slots sorted by expert
    (stable), the counts per expert, the routing scores applied after the experts, a scatter-add back."""

    def __init__(self, layout="EFH"):
        super().__init__()
        self.gate = torch.nn.Linear(H, E, bias=False)
        self.experts = GroupedExperts(layout)

    def forward(self, x):
        x_TH = x.reshape(-1, H)
        scores_TK, ids_TK = torch.topk(self.gate(x_TH).softmax(-1), K, dim=-1)
        order_S = torch.argsort(ids_TK.reshape(-1), stable=True)
        counts_E = torch.nn.functional.one_hot(ids_TK.reshape(-1), E).sum(0)
        rows_SH = self.experts(x_TH[order_S // K], counts_E)
        rows_SH = rows_SH * scores_TK.reshape(-1)[order_S, None]
        return torch.zeros_like(x_TH).index_add(0, order_S // K, rows_SH).view_as(x)


def _block_worker(rank, num_ranks, init_file, case):
    import copy

    from torch.distributed.device_mesh import init_device_mesh

    import moe_ops

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=num_ranks)
    try:
        reference = _hf_block(case["family"])
        block = copy.deepcopy(reference)
        if hasattr(reference.experts, "config"):  # a transformers block: the two share one config object,
            block.experts.config = reference.experts.config  # as two models built from one config do
        block = moe_ops.parallelize_experts(block, init_device_mesh("cpu", (num_ranks,)),
                                            dispatch=case["dispatch"], pipeline_chunks=case.get("chunks", 1))
        if hasattr(reference.experts, "config"):  # the reference keeps its implementation (it runs below)
            assert reference.experts.config._experts_implementation == "grouped_mm"
        assert all(p.to_local().shape[0] == E // num_ranks for p in block.experts.parameters())
        run = torch.compile(block, fullgraph=True) if case["compiled"] else block
        local = slice(rank * E // num_ranks, (rank + 1) * E // num_ranks)
        inputs = [torch.randn(1, 7, H, generator=torch.Generator().manual_seed(r)) for r in range(num_ranks)]
        x = inputs[rank].clone().requires_grad_(True)
        out = run(x)
        out = out[0] if isinstance(out, tuple) else out
        out.sum().backward()
        # The reference block over every rank's tokens: its expert gradients collect them all.
        total = 0.0
        for r, x_r in enumerate(inputs):
            x_r = x_r.clone().requires_grad_(True)
            out_r = reference(x_r)
            out_r = out_r[0] if isinstance(out_r, tuple) else out_r
            total = total + out_r.sum()
            if r == rank:
                want, want_x = out_r, x_r
        total.backward()
        torch.testing.assert_close(out, want.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad, want_x.grad, rtol=1e-5, atol=1e-5)
        names = [name for name, _ in reference.experts.named_parameters()]
        assert len(names) == {"gpt_oss": 4, "qwen3_moe": 2}.get(case["family"], 3), names
        for name in names:
            got = getattr(block.experts, name).grad.to_local()
            torch.testing.assert_close(got, getattr(reference.experts, name).grad[local], rtol=1e-5, atol=1e-5)
        if case["family"] == "qwen3_moe":  # sharded experts run in the activations' dtype: not quantised
            with pytest.raises(ValueError, match=r"Qwen3MoeExperts.gate_up_proj is sharded \(parallelize_experts\)"):
                moe_ops.quantise_experts(block)
        # A deep copy (an EMA model, AveragedModel) shares the plan's group and computes the same (a ProcessGroup
        # cannot be copied: deepcopy raised).
        copied = copy.deepcopy(block)
        again = copied(inputs[rank])
        torch.testing.assert_close(again[0] if isinstance(again, tuple) else again, out.detach())
        # Gradient clipping over the mix of DTensor (experts) and plain (router) gradients, once the plain ones
        # are summed over the ranks as a data-parallel wrapper would: the reference's norm and clipped gradients.
        for parameter in block.parameters():
            if not isinstance(parameter.grad, DTensor):
                dist.all_reduce(parameter.grad)
        want_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), float("inf"))
        norm = moe_ops.clip_grad_norm_(block.parameters(), want_norm / 2)
        torch.nn.utils.clip_grad_norm_(reference.parameters(), want_norm / 2)
        torch.testing.assert_close(norm, want_norm, rtol=1e-5, atol=0)
        for name, parameter in block.named_parameters():
            want = reference.get_parameter(name).grad
            got = parameter.grad.to_local() if isinstance(parameter.grad, DTensor) else parameter.grad
            torch.testing.assert_close(got, want[local] if isinstance(parameter.grad, DTensor) else want,
                                       rtol=1e-5, atol=1e-6)
    finally:
        _destroy_process_group()


@pytest.mark.parametrize("family,compiled,dispatch,chunks", [
    ("qwen3_moe", False, "padded", 1), ("qwen3_moe", True, "padded", 2), ("gpt_oss", False, "padded", 1),
    ("torchtitan_EFH", True, "padded", 1), ("torchtitan_EHF", False, "exact", 1)],
    ids=["qwen3_moe", "qwen3_moe_compiled_pipelined", "gpt_oss", "torchtitan_compiled",
         "torchtitan_earlier_layout_exact"])
def test_parallelize_experts_shards_a_block(family, compiled, dispatch, chunks):
    """transformers' MoE blocks and a torchtitan-style block, their experts sharded over 2 ranks (DTensor
    Shard(0)) by moe_ops.parallelize_experts: each rank's output and input gradient are the unsharded
    block's on its tokens, and each rank's expert-weight gradient is its shard of the gradient over all
    ranks' tokens (GPT-OSS: the biases too; torchtitan: w1, w2, w3 in either orientation; Qwen3 compiled:
    in 2 pipelined chunks)."""
    case = dict(dispatch=dispatch, compiled=compiled, family=family, chunks=chunks)
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_block_worker, args=(2, os.path.join(folder, "init"), case), nprocs=2, join=True)


def test_parallelize_experts_refuses_what_it_cannot_shard():
    import moe_ops

    class _OneRankMesh:
        ndim = 2

    with pytest.raises(ValueError, match="ep_mesh: expected a 1-D DeviceMesh"):
        moe_ops.parallelize_experts(_hf_block(), _OneRankMesh())

    class _TwoRankMesh:
        ndim = 1

        def get_group(self):
            return None

        def size(self):
            return 2

    class _ThreeRankMesh(_TwoRankMesh):
        def size(self):
            return 3

    # A model whose second experts module cannot be sharded (8 experts over 3 ranks) keeps its first as it was.
    model = torch.nn.Sequential(_hf_block(), _hf_block())
    with pytest.raises(ValueError, match="ep_mesh: Qwen3MoeExperts has 8 experts, not a multiple of the mesh's 3"):
        moe_ops.parallelize_experts(model, _ThreeRankMesh())
    assert not any(isinstance(p.data, torch.distributed.tensor.DTensor) for p in model.parameters())
    assert model[0].experts.config._experts_implementation == "grouped_mm"

    block = TorchtitanMoE()
    block.experts.activation = torch.nn.functional.gelu
    with pytest.raises(ValueError, match=r"GroupedExperts's forward is not silu\(x w1\) \* \(x w3\)"):
        moe_ops.parallelize_experts(block, _TwoRankMesh())
    assert not isinstance(block.experts.w1.data, torch.distributed.tensor.DTensor)  # nothing sharded
    with pytest.raises(ValueError, match="model: no experts module found"):
        moe_ops.parallelize_experts(torch.nn.Linear(H, H), _TwoRankMesh())
    # Quantised experts do not run sharded: refused before anything is sharded (they were sharded, and the
    # first forward refused them).
    torchao = pytest.importorskip("torchao.quantization")
    quantised = _hf_block().to(torch.bfloat16)
    torchao.quantize_(quantised, moe_ops.experts_quantization_config(torchao.Float8WeightOnlyConfig()),
                      filter_fn=None)
    with pytest.raises(ValueError, match=r"Qwen3MoeExperts's expert weights are quantised \(gate_up_proj: a "
                                         r"Float8Tensor\), and quantised experts do not run sharded"):
        moe_ops.parallelize_experts(quantised, _TwoRankMesh())
    assert not isinstance(quantised.experts.gate_up_proj.data, torch.distributed.tensor.DTensor)
    with pytest.raises(TypeError, match="capacity_factor: expected a number, got '1'"):
        moe_ops.parallelize_experts(_hf_block(), _TwoRankMesh(), capacity_factor="1")


def _clip_worker(rank, num_ranks, init_file):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import moe_ops

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=num_ranks)
    try:
        mesh = init_device_mesh("cpu", (num_ranks,))
        generator = torch.Generator().manual_seed(0)  # the same full gradients on every rank
        # an expert weight, a tensor of one expert (rank 1's shard is empty) and a plain gradient; fp16 values whose
        # shard norms square past fp16's largest value (65504) while the whole norm does not
        fulls = [torch.randn(4, 3, generator=generator) * 150, torch.randn(1, 3, generator=generator),
                 torch.randn(5, generator=generator)]
        fulls[1][0, 1] = 0.0  # a zero for the 0-"norm" (the count of non-zero values) to see
        for norm_type in (2.0, 1.0, 0.5, 0.0, math.inf, -math.inf):
            for dtype, foreach in ((torch.float32, None), (torch.float32, False), (torch.float16, True)):
                parameters = []
                for i, full in enumerate(fulls):
                    grad = full.to(dtype, copy=True)
                    if i < 2:
                        grad = distribute_tensor(grad, mesh, [Shard(0)])
                    parameters.append(torch.nn.Parameter(torch.zeros_like(grad)))
                    parameters[-1].grad = grad
                plain = [torch.nn.Parameter(torch.zeros_like(full)) for full in fulls]
                for parameter, full in zip(plain, fulls, strict=True):
                    parameter.grad = full.to(dtype).to(torch.float32, copy=True)  # fp32: no overflow
                want_norm = torch.nn.utils.clip_grad_norm_(plain, 1.0, norm_type)
                norm = moe_ops.clip_grad_norm_(iter(parameters), 1.0, norm_type, foreach=foreach)
                case = f"norm_type={norm_type} {dtype} foreach={foreach}"
                assert norm.dtype == torch.float32, case
                torch.testing.assert_close(norm, want_norm, rtol=1e-5, atol=0, msg=lambda m, case=case: f"{case}: {m}")
                tolerance = {"rtol": 1e-3, "atol": 1e-5} if dtype == torch.float16 else {"rtol": 1e-5, "atol": 1e-7}
                for parameter, reference in zip(parameters, plain, strict=True):
                    got = parameter.grad.full_tensor() if isinstance(parameter.grad, DTensor) else parameter.grad
                    torch.testing.assert_close(got.float(), reference.grad, **tolerance,
                                               msg=lambda m, case=case: f"{case}: {m}")
        nan_on_rank_1 = distribute_tensor(torch.tensor([1.0, math.nan]), mesh, [Shard(0)])
        nonfinite = torch.nn.Parameter(torch.zeros_like(nan_on_rank_1))
        nonfinite.grad = nan_on_rank_1
        with pytest.raises(RuntimeError, match="The total norm of order 2.0 for gradients from `parameters` is "
                                               "non-finite"):  # on every rank: the verdict follows the collective
            moe_ops.clip_grad_norm_([nonfinite], 1.0, error_if_nonfinite=True)
        assert float(moe_ops.clip_grad_norm_([torch.nn.Parameter(torch.ones(2))], 1.0)) == 0.0  # no gradients
    finally:
        _destroy_process_group()


def test_clip_grad_norm_matches_torch():
    """moe_ops.clip_grad_norm_ over DTensor shards (one of them empty on a rank) and a plain gradient: the norm and
    the clipped gradients of torch's clip over the whole tensors, for every norm order, with and without foreach;
    fp16 gradients whose shards' squares overflow fp16 are summed in fp32; a NaN on one rank raises on both."""
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_clip_worker, args=(2, os.path.join(folder, "init")), nprocs=2, join=True)


def _fsdp_worker(rank, num_ranks, init_file, case):
    import copy

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import moe_ops

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=num_ranks)
    try:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
        reference = _hf_block()
        block = moe_ops.parallelize_experts(copy.deepcopy(reference), mesh["ep"])
        # The experts are sharded over "ep" and, by FSDP, over "dp"; the rest of the block over all four
        # data-parallel ranks. FSDP averages each gradient over its own mesh: the rest's over the 4
        # ranks, the experts' over "dp" (2), after the expert-parallel exchange summed "ep"'s tokens
        # (set_gradient_divide_factor(4) on the experts evens that on NCCL; gloo lacks its PREMUL_SUM).
        fully_shard(block.experts, mesh=mesh["dp"])
        fully_shard(block, mesh=init_device_mesh("cpu", (num_ranks,)))
        inputs = [torch.randn(1, 7, H, generator=torch.Generator().manual_seed(r)) for r in range(num_ranks)]
        out = block(inputs[rank])
        out = out[0] if isinstance(out, tuple) else out
        out.sum().backward()
        total = 0.0
        for r, x_r in enumerate(inputs):
            out_r = reference(x_r)
            out_r = out_r[0] if isinstance(out_r, tuple) else out_r
            total = total + out_r.sum() / num_ranks  # the mean over the data-parallel ranks' losses
            if r == rank:
                want = out_r
        total.backward()
        torch.testing.assert_close(out, want.detach(), rtol=1e-5, atol=1e-5)
        for name, parameter in reference.named_parameters():
            got = dict(block.named_parameters())[name].grad.full_tensor()
            scale = mesh["ep"].size() if name.startswith("experts.") else 1
            torch.testing.assert_close(got, scale * parameter.grad, rtol=1e-5, atol=1e-6, msg=name)
        # Clipping over gradients on two meshes (the experts' dp x ep, the rest's 4 ranks): the norm of them all.
        want_grads = {name: (mesh["ep"].size() if name.startswith("experts.") else 1) * parameter.grad
                      for name, parameter in reference.named_parameters()}
        want_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in want_grads.values()]))
        norm = moe_ops.clip_grad_norm_(block.parameters(), want_norm / 2)
        torch.testing.assert_close(norm, want_norm, rtol=1e-5, atol=0)
        for name, parameter in block.named_parameters():
            torch.testing.assert_close(parameter.grad.full_tensor(), want_grads[name] / 2, rtol=1e-4, atol=1e-6,
                                       msg=name)
    finally:
        _destroy_process_group()


def test_parallelize_experts_composes_with_fsdp2():
    """A 2 x 2 (data-parallel x expert-parallel) mesh of 4 ranks: the experts sharded over "ep" by
    parallelize_experts and over "dp" by FSDP2 (fully_shard), the rest of the block by FSDP2 over all 4.
    Each rank's output is the unsharded block's on its tokens; every parameter's gradient (gathered) is
    the gradient of the mean loss over the 4 ranks' batches, the experts' times the expert-parallel
    degree (FSDP averages them over "dp" only); moe_ops.clip_grad_norm_ clips them all by their total norm."""
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_fsdp_worker, args=(4, os.path.join(folder, "init"), {}), nprocs=4, join=True)
