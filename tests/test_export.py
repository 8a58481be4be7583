"""Deployment: models using moe_ops through ``torch.export`` and AOTInductor, on the CPU and (CUDA-marked)
on the GPU.

- A module that calls the public ops exports with a dynamic token count (the fake kernels hold for a
  symbolic T), the exported program keeps ``moe_ops.route`` / ``moe_ops.fused_experts`` nodes and
  survives ``torch.export.save``/``load``, and ``aoti_compile_and_package`` packages it.
- transformers' own MoE block (plain aten ops when exported) is rewritten by the moe_ops graph passes
  while AOTInductor compiles it, so the package calls the moe_ops ops.
- Loading a package in a fresh process: AOTInductor runs a ``torch.library.custom_op`` through its
  proxy executor, which looks the op up in the dispatcher when the package is loaded. The ops of
  moe_ops are registered from Python, so the loading process must ``import moe_ops`` first (no tracing
  or compiling happens there); without it, loading fails with "Could not find schema for moe_ops::...".
  A package compiled under ``moe_ops.rewrites_disabled()`` from a model that does not call moe_ops
  holds no moe_ops op and loads without it.

AOTInductor compiles C++ (seconds each), so each package is built once per module.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch
import torch._inductor.config as inductor_config
from conftest import assert_close_rel
from torch._dynamo.utils import counters

import moe_ops
from moe_ops.tiles import block_m_ranges

# On torch 2.11 (the H100 box), loading any AOTInductor package segfaults inside torch's loader
# (torch/export/pt2_archive/_package.py, _load_aoti, seen with faulthandler in a fresh process): one
# that calls moe_ops' ops, CPU or CUDA, and as well a CPU package of torch.sin(x) * 2 with no custom op
# at all (a probe on the H100, 2026-11-24). 2.13 loads and runs CPU packages, and so does 2.11's CPU build
# (the plain package, 2026-12-07). Nothing on moe_ops' side changes it: the loads are skipped below 2.12.
loads_packages = pytest.mark.skipif(
    torch.torch_version.TorchVersion(torch.__version__) < (2, 12),
    reason="torch 2.11's AOTInductor loader segfaults here",
)

transformers = pytest.importorskip("transformers")
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    # torch 2.13's AOTInductor pickles pytree specs through a deprecated path (harmless).
    "ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning"
)

H, F, E, K = 64, 32, 8, 2  # hidden, expert intermediate, experts, experts per token
TOKEN_COUNTS = (3, 37)  # neither is the token count the programs were exported with


@contextlib.contextmanager
def fresh_compile_state():
    """As compile_harness's fixture, for module-scoped packages: no FX-graph cache hit skips the
    moe_ops pass, the counters count this compile only, the rewrites are on as ``import moe_ops`` left
    them."""
    saved_rewrites = moe_ops.config.rewrites
    moe_ops.config.rewrites = True
    torch._dynamo.reset()
    counters.clear()
    try:
        with inductor_config.patch(fx_graph_cache=False):
            yield
    finally:
        torch._dynamo.reset()
        moe_ops.config.rewrites = saved_rewrites


def package_contents(path) -> tuple[list[str], str]:
    """(targets of the ops the package runs through AOTInductor's proxy executor, its wrapper C++)."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        extern_json = [n for n in names if n.endswith(".wrapper.json")]  # absent when there is no such op
        (wrapper_cpp,) = [n for n in names if n.endswith(".wrapper.cpp")]
        extern_nodes = json.loads(archive.read(extern_json[0]))["nodes"] if extern_json else []
        return [node["node"]["target"] for node in extern_nodes], archive.read(wrapper_cpp).decode()


def output(result) -> torch.Tensor:
    return result[0] if isinstance(result, (tuple, list)) else result


# ---- 1. A module that calls the ops -----------------------------------------------------------------


class OpsMoE(torch.nn.Module):
    """Router linear, ``moe_ops.route``, ``moe_ops.fused_experts`` (README's example as a module)."""

    def __init__(self):
        super().__init__()
        self.w_router = torch.nn.Parameter(0.1 * torch.randn(E, H))
        self.w_gate_up = torch.nn.Parameter(0.1 * torch.randn(E, 2 * F, H))
        self.w_down = torch.nn.Parameter(0.1 * torch.randn(E, H, F))

    def forward(self, x):
        topk_weights, topk_ids = moe_ops.route(x @ self.w_router.T, K, renormalize=True)
        return moe_ops.fused_experts(x, topk_weights, topk_ids, self.w_gate_up, self.w_down)


def ops_tokens(num_tokens: int) -> torch.Tensor:
    return torch.randn(num_tokens, H, generator=torch.Generator().manual_seed(num_tokens))


@pytest.fixture(scope="module")
def ops_model():
    torch.manual_seed(0)
    model = OpsMoE().eval().requires_grad_(False)
    tokens = torch.export.Dim("tokens", min=2)
    program = torch.export.export(model, (ops_tokens(16),), dynamic_shapes=({0: tokens},))
    return model, program


@pytest.fixture(scope="module")
def ops_package(ops_model, tmp_path_factory):
    _, program = ops_model
    with fresh_compile_state():
        return torch._inductor.aoti_compile_and_package(
            program, package_path=str(tmp_path_factory.mktemp("ops") / "ops_moe.pt2")
        )


def test_export_keeps_the_ops(ops_model, tmp_path):
    model, program = ops_model
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.moe_ops.route.default) == 1
    assert targets.count(torch.ops.moe_ops.fused_experts.default) == 1
    (constraint,) = program.range_constraints.values()  # the token count stayed symbolic
    assert constraint.lower == 2 and constraint.upper > max(TOKEN_COUNTS)

    torch.export.save(program, tmp_path / "ops_moe.pt2")  # the op nodes serialise and deserialise
    reloaded = torch.export.load(tmp_path / "ops_moe.pt2")
    assert [n.target for n in reloaded.graph.nodes if n.op == "call_function"] == targets

    for num_tokens in TOKEN_COUNTS:
        x = ops_tokens(num_tokens)
        expected = model(x)
        assert_close_rel(program.module()(x), expected, torch.float32, f"exported, T={num_tokens}")
        assert_close_rel(reloaded.module()(x), expected, torch.float32, f"saved and loaded, T={num_tokens}")


class StatsAndCapacity(torch.nn.Module):
    """The public helpers a training program returns or computes from T: RouterStats, capacity_from_factor."""

    def forward(self, logits):
        weights, ids, stats = moe_ops.route(logits, K, renormalize=True, return_stats=True)
        capacity = moe_ops.capacity_from_factor(1.1, logits.shape[0], K, E)
        kept, dropped = moe_ops.apply_capacity(ids, weights, E, capacity, "position")
        return stats, kept, dropped


def test_saved_program_returns_router_stats_and_a_capacity_of_t(tmp_path):
    """A program returning RouterStats, with a capacity computed from a symbolic T, saves and loads (torch.export
    cannot save a NamedTuple without a registered name, nor math.ceil of a symbolic size)."""
    model = StatsAndCapacity()
    tokens = torch.export.Dim("tokens", min=2)
    program = torch.export.export(model, (torch.randn(16, E),), dynamic_shapes=({0: tokens},))
    torch.export.save(program, tmp_path / "stats.pt2")
    reloaded = torch.export.load(tmp_path / "stats.pt2")
    for num_tokens in (9, 200):  # 1.1 x 200 x 2 / 8 is 55.00000000000001 in floats: capacity 55, not 56
        logits = torch.randn(num_tokens, E, generator=torch.Generator().manual_seed(num_tokens))
        (stats, kept, dropped), (want_stats, want_kept, want_dropped) = reloaded.module()(logits), model(logits)
        assert type(stats).__name__ == "RouterStats" and stats.num_tokens == num_tokens
        torch.testing.assert_close(stats.router_prob_sum, want_stats.router_prob_sum)
        assert torch.equal(stats.tokens_per_expert, want_stats.tokens_per_expert)
        assert torch.equal(kept, want_kept) and torch.equal(dropped, want_dropped)
    assert moe_ops.capacity_from_factor(1.1, 200, K, E) == 55


@loads_packages
def test_aoti_package_runs_the_ops(ops_model, ops_package):
    model, _ = ops_model
    extern_ops, wrapper = package_contents(ops_package)
    # The custom ops are not inlined or dropped: the C++ wrapper calls each through the proxy executor.
    assert extern_ops == ["moe_ops::route", "moe_ops::fused_experts"]
    assert wrapper.count("aoti_torch_proxy_executor_call_function(") == 2

    compiled = torch._inductor.aoti_load_package(ops_package)
    for num_tokens in TOKEN_COUNTS:
        x = ops_tokens(num_tokens)
        assert_close_rel(compiled(x), model(x), torch.float32, f"AOTInductor, T={num_tokens}")


# ---- 2. transformers' MoE block, rewritten while AOTInductor compiles it ---------------------------


def qwen3_block(experts_implementation: str = "grouped_mm") -> torch.nn.Module:
    """As tests/test_passes_hf_grouped_mm.py builds it: bf16, transformers' default experts ("grouped_mm")."""
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        hidden_size=H, moe_intermediate_size=F, num_experts=E, num_experts_per_tok=K, norm_topk_prob=True
    )
    block = Qwen3MoeSparseMoeBlock(config)
    block.experts.config._experts_implementation = experts_implementation
    for param in block.parameters():
        torch.nn.init.normal_(param, std=0.1)
    return block.to(torch.bfloat16).eval().requires_grad_(False)


def hf_tokens(num_tokens: int) -> torch.Tensor:
    return torch.randn(1, num_tokens, H, generator=torch.Generator().manual_seed(num_tokens)).to(torch.bfloat16)


def export_block(block: torch.nn.Module) -> torch.export.ExportedProgram:
    return torch.export.export(block, (hf_tokens(10),), dynamic_shapes=({1: torch.export.Dim("tokens", min=2)},))


@pytest.fixture(scope="module")
def hf_block():
    return qwen3_block()


@pytest.fixture(scope="module")
def hf_package(hf_block, tmp_path_factory):
    """(the package, the export's call_function targets, the moe_ops counters of the AOTI compile)."""
    program = export_block(hf_block)
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    with fresh_compile_state():
        path = torch._inductor.aoti_compile_and_package(
            program, package_path=str(tmp_path_factory.mktemp("hf") / "qwen3_moe_block.pt2")
        )
        rewrites = dict(counters["moe_ops"])
    return path, targets, rewrites


@pytest.fixture(scope="module")
def hf_package_without_rewrites(hf_block, tmp_path_factory):
    """The same block compiled with the moe_ops passes off: a package that holds no moe_ops op."""
    program = export_block(hf_block)
    with fresh_compile_state(), moe_ops.rewrites_disabled():
        path = torch._inductor.aoti_compile_and_package(
            program, package_path=str(tmp_path_factory.mktemp("hf_plain") / "qwen3_moe_block.pt2")
        )
        assert not counters["moe_ops"]
    return path


@loads_packages
def test_aoti_rewrites_the_exported_block(hf_block, hf_package):
    path, exported_targets, rewrites = hf_package
    # The exported program is transformers' plain code ...
    assert "aten._grouped_mm.default" in exported_targets and "aten.topk.default" in exported_targets
    assert not any("moe_ops" in target for target in exported_targets)
    # ... which the moe_ops passes rewrote while AOTInductor compiled it.
    assert rewrites.get("route_rewrite") == 1 and rewrites.get("experts_rewrite_hf_grouped_mm") == 1
    extern_ops, wrapper = package_contents(path)
    assert extern_ops == ["moe_ops::route", "moe_ops::fused_experts"]
    assert "aoti_torch_cpu__grouped_mm" not in wrapper and "aoti_torch_cpu_topk" not in wrapper

    compiled = torch._inductor.aoti_load_package(path)
    for num_tokens in TOKEN_COUNTS:
        x = hf_tokens(num_tokens)
        assert_close_rel(output(compiled(x)), output(hf_block(x)), torch.bfloat16, f"AOTInductor, T={num_tokens}")


def test_export_of_eager_experts_calls_the_op():
    """experts_implementation="eager": moe_ops's experts implementation puts ``fused_experts`` in the
    exported program itself (the per-expert loop, with its data-dependent shapes, is not traced)."""
    block = qwen3_block("eager")
    counters.clear()
    program = export_block(block)
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert torch.ops.moe_ops.fused_experts.default in targets and torch.ops.aten.nonzero.default not in targets
    assert counters["moe_ops"]["hf_experts"] == 1
    for num_tokens in TOKEN_COUNTS:
        x = hf_tokens(num_tokens)  # eager: transformers' own loop
        assert_close_rel(output(program.module()(x)), output(block(x)), torch.bfloat16, f"exported, T={num_tokens}")


# ---- 3. Loading a package in a fresh process ---------------------------------------------------------


def load_in_subprocess(package, inputs_path, outputs_path, import_moe_ops: bool) -> subprocess.CompletedProcess:
    """A new Python process loads the package and runs it on the saved inputs; nothing is traced or compiled."""
    script = textwrap.dedent(f"""
        import sys
        import torch
        {"import moe_ops" if import_moe_ops else ""}
        assert ("moe_ops" in sys.modules) == {import_moe_ops}
        compiled = torch._inductor.aoti_load_package({str(package)!r})
        outputs = [compiled(x) for x in torch.load({str(inputs_path)!r})]
        torch.save([o[0] if isinstance(o, (tuple, list)) else o for o in outputs], {str(outputs_path)!r})
    """)
    return subprocess.run([sys.executable, "-P", "-c", script], capture_output=True, text=True, timeout=300)


@pytest.fixture
def saved_inputs(tmp_path):
    inputs = [hf_tokens(n) for n in TOKEN_COUNTS]
    torch.save(inputs, tmp_path / "inputs.pt")
    return inputs, tmp_path / "inputs.pt", tmp_path / "outputs.pt"


def check_outputs(outputs_path, inputs, block):
    outputs = torch.load(outputs_path)
    assert len(outputs) == len(inputs)
    for x, got in zip(inputs, outputs, strict=True):
        assert_close_rel(got, output(block(x)), torch.bfloat16, f"fresh process, T={x.shape[1]}")


class _PlainOps(torch.nn.Module):
    def forward(self, x):
        return torch.sin(x) * 2


def test_loader_control_a_package_without_moe_ops(tmp_path):
    """The control behind ``loads_packages``: a package of plain torch ops, loaded and run in a fresh
    process that never imports moe_ops. torch 2.12+ runs it; torch 2.11 (the GPU box's CUDA build) dies of
    a segfault inside _load_aoti, as with moe_ops' packages, so that crash is torch's. torch 2.11's CPU
    build loads it; either way nothing else may happen (another failure, a wrong result)."""
    x = torch.randn(4, 8)
    path = torch._inductor.aoti_compile_and_package(
        torch.export.export(_PlainOps(), (x,)), package_path=str(tmp_path / "plain.pt2"))
    torch.save([x], tmp_path / "inputs.pt")
    result = load_in_subprocess(path, tmp_path / "inputs.pt", tmp_path / "outputs.pt", import_moe_ops=False)
    if torch.torch_version.TorchVersion(torch.__version__) < (2, 12) and result.returncode == -signal.SIGSEGV:
        return  # torch's crash, the reason loads_packages skips on this version
    assert result.returncode == 0, result.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "outputs.pt")[0], torch.sin(x) * 2)


@loads_packages
def test_fresh_process_that_imports_moe_ops_runs_the_package(hf_block, hf_package, saved_inputs):
    inputs, inputs_path, outputs_path = saved_inputs
    result = load_in_subprocess(hf_package[0], inputs_path, outputs_path, import_moe_ops=True)
    assert result.returncode == 0, result.stderr
    check_outputs(outputs_path, inputs, hf_block)


@loads_packages
def test_fresh_process_without_moe_ops_cannot_load_the_package(hf_package, saved_inputs):
    """The proxy executor finds a custom op's schema in the dispatcher when the package is loaded, and
    a ``torch.library.custom_op`` is only there once the Python module that defines it is imported."""
    _, inputs_path, outputs_path = saved_inputs
    result = load_in_subprocess(hf_package[0], inputs_path, outputs_path, import_moe_ops=False)
    assert result.returncode != 0
    assert "in aoti_load_package" in result.stderr, result.stderr  # it fails when loading, not when running
    assert "RuntimeError: Could not find schema for moe_ops::route" in result.stderr, result.stderr
    assert "torch.library.custom_op cannot be run via AOTI without Python environment" in result.stderr
    assert not outputs_path.exists()


@loads_packages
def test_package_compiled_without_rewrites_loads_without_moe_ops(hf_block, hf_package_without_rewrites, saved_inputs):
    extern_ops, wrapper = package_contents(hf_package_without_rewrites)
    assert extern_ops == [] and "moe_ops" not in wrapper and "aoti_torch_cpu__grouped_mm" in wrapper
    inputs, inputs_path, outputs_path = saved_inputs
    result = load_in_subprocess(hf_package_without_rewrites, inputs_path, outputs_path, import_moe_ops=False)
    assert result.returncode == 0, result.stderr
    check_outputs(outputs_path, inputs, hf_block)


# ---- 4. On the GPU ------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[False, True], ids=["static_T", "dynamic_T"])
def cuda_package(request, tmp_path_factory):
    """(the block on CUDA, its package, whether T is dynamic)."""
    dynamic = request.param
    block = qwen3_block().cuda()
    shapes = ({1: torch.export.Dim("tokens", min=2)},) if dynamic else None
    program = torch.export.export(block, (hf_tokens(10).cuda(),), dynamic_shapes=shapes)
    with fresh_compile_state():
        path = torch._inductor.aoti_compile_and_package(
            program, package_path=str(tmp_path_factory.mktemp("cuda") / "block.pt2")
        )
        assert counters["moe_ops"]["experts_rewrite_hf_grouped_mm"] == 1
    return block, path, dynamic


@pytest.mark.cuda
def test_cuda_aoti_package_contents(cuda_package):
    """transformers' block on CUDA through export and AOTInductor (torch 2.11 cannot package the plain
    block for CUDA: its C shim has no _grouped_mm). The package holds the expert GEMMs as Triton
    template kernels compiled into it, launched from the C++ wrapper, with the routing and schedule
    ops called through the proxy executor: one gate/up and down pair for a static token count, one
    pair per block size for a dynamic one (each launched with an empty grid outside its range)."""
    _, path, dynamic = cuda_package
    extern_ops, wrapper = package_contents(path)
    assert "_grouped_mm" not in wrapper and "topk" not in wrapper
    assert extern_ops == ["moe_ops::route", "moe_ops::block_schedule"]
    kernels = set(re.findall(r"triton_tem_\w+", wrapper))
    # H and F here are not multiples of the TMA tiles' columns: the two 128-row ranges are one pair.
    pairs = len(block_m_ranges(E)) - 1 if dynamic else 1
    assert len(kernels) >= 2 * pairs, kernels


@pytest.mark.cuda
@loads_packages
def test_cuda_aoti_package_runs(cuda_package, tmp_path):
    """A fresh process that imports moe_ops loads the CUDA package and runs it (in a subprocess: torch
    2.11's loader segfaults on every package, inside _load_aoti)."""
    block, path, dynamic = cuda_package
    inputs = [hf_tokens(n).cuda() for n in (TOKEN_COUNTS if dynamic else (10,))]
    torch.save(inputs, tmp_path / "inputs.pt")
    result = load_in_subprocess(path, tmp_path / "inputs.pt", tmp_path / "outputs.pt", import_moe_ops=True)
    assert result.returncode == 0, result.stderr[-4000:]
    check_outputs(tmp_path / "outputs.pt", inputs, block)
