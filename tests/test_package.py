"""The installed package: one import name, and a settings object that refuses what it does not know."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import moe_ops

ROOT = Path(__file__).resolve().parents[1]


def test_config_refuses_typos_and_non_bools():
    saved = moe_ops.config.training_rewrites
    with pytest.raises(AttributeError, match=r"no setting 'training_rewrite': did you mean 'training_rewrites'\?"):
        moe_ops.config.training_rewrite = True
    with pytest.raises(AttributeError, match=r"no setting 'speed': the settings are rewrites, "):
        moe_ops.config.speed = True
    with pytest.raises(TypeError, match=r"moe_ops.config.rewrites: expected True or False, got 1"):
        moe_ops.config.rewrites = 1
    with pytest.raises(AttributeError, match=r"moe_ops.config.rewrites cannot be deleted"):
        del moe_ops.config.rewrites
    assert moe_ops.config.training_rewrites is saved and not hasattr(moe_ops.config, "speed")
    moe_ops.config.training_rewrites = not saved
    moe_ops.config.training_rewrites = saved


STALE_SWITCHES = """
import warnings, torch, moe_ops
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as before:
    moe_ops.disable()
    moe_ops.enable()
torch.compile(lambda x: x + 1)(torch.ones(2))
with warnings.catch_warnings(record=True) as after:
    with moe_ops.rewrites_disabled():
        moe_ops.disable()
    moe_ops.enable()
    moe_ops.config.batch_invariant = True
    moe_ops.config.batch_invariant = False
with warnings.catch_warnings(record=True) as after_reset:
    torch.compiler.reset()  # nothing compiled any more: nothing to keep old graphs
    moe_ops.config.stack_expert_weights = True
    moe_ops.config.stack_expert_weights = False
print(len(before) + len(after_reset))
print([str(w.message).split(":")[0] for w in after])
print({w.filename for w in after})
"""


def test_a_change_after_a_compile_warns_once_per_switch():
    """A switch changed after something was compiled does not reach the functions compiled before: the first
    change of each switch says so, pointing at the user's line (not moe_ops' or contextlib's); none before a
    compile or after torch.compiler.reset()."""
    before, after, files = _fresh(STALE_SWITCHES).splitlines()[-3:]
    assert before == "0"
    assert after == ("['moe_ops.config.rewrites changed after torch.compile compiled code in this process', "
                     "'moe_ops.config.batch_invariant changed after torch.compile compiled code in this process']")
    assert files == "{'<string>'}"


def test_one_import_name(tmp_path):
    """A built wheel holds moe_ops (with the lowering/ folder as moe_ops.lowering) and nothing else at its
    top level, so a user's own lowering.py cannot shadow part of the library."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("moe_ops-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"moe_ops", wheel.name.split("-py3")[0] + ".dist-info"}
    assert {"moe_ops/lowering/__init__.py", "moe_ops/lowering/passes.py", "moe_ops/lowering/graph/route_rewrite.py",
            "moe_ops/lowering/inductor/kernel_calls.py"} <= set(names)
    # Every module of the tree is in the wheel (a package folder left out of pyproject's list is not).
    tree = {f"{prefix}/{path.relative_to(ROOT / folder)}"
            for folder, prefix in (("moe_ops", "moe_ops"), ("lowering", "moe_ops/lowering"))
            for path in (ROOT / folder).rglob("*.py")}
    assert tree - set(names) == set()
    assert {name for name in names if name.endswith(".py")} == tree


def test_a_users_lowering_module_does_not_shadow_the_library(tmp_path):
    (tmp_path / "lowering.py").write_text("raise ImportError('the user module was imported')\n")
    result = subprocess.run([sys.executable, "-c", "import moe_ops; print(moe_ops.config.rewrites)"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr[-2000:]


def _module_imports() -> dict[str, set[str]]:
    """Every moe_ops module (the lowering/ folder as moe_ops.lowering) and the moe_ops modules it imports,
    at module level or inside functions alike (an import inside a function still ties the two)."""
    import ast

    modules = {}
    for folder, package in (("moe_ops", "moe_ops"), ("lowering", "moe_ops.lowering")):
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [package, *path.relative_to(ROOT / folder).with_suffix("").parts]
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    imports = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            imports[name].update(t for t in targets if t in modules and t != name)
    return imports


def test_import_graph_has_no_cycles():
    """Dependencies run one way: ops -> kernels -> shared types and heuristics; moe_ops.lowering -> ops.
    A cycle (an op module and its kernel module importing each other, say) fails with its members."""
    imports = _module_imports()
    assert len(imports) > 30 and {"moe_ops.lowering.passes", "moe_ops.lowering.graph.route_rewrite"} <= set(imports)
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(imports[module]):
            if state.get(target) == "open":
                cycle = path[path.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(imports):
        if module not in state:
            visit(module, [module])



def test_architecture_map_names_every_module():
    """docs/architecture.md stays the map: every module of the package appears in it by file name."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    missing = [str(path.relative_to(ROOT)) for folder in ("moe_ops", "lowering")
               for path in sorted((ROOT / folder).rglob("*.py")) if path.name not in text]
    assert not missing, f"docs/architecture.md does not name {missing}"


def _fresh(script: str) -> str:
    """stdout of ``script`` in a fresh interpreter, with Inductor's caches off (a cache hit skips the passes)."""
    env = dict(os.environ, TORCHINDUCTOR_FX_GRAPH_CACHE="0", TORCHINDUCTOR_AUTOGRAD_CACHE="0")
    result = subprocess.run([sys.executable, "-P", "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_import_is_light():
    """``import moe_ops`` imports neither Inductor (nor so dynamo) nor transformers, and takes under a
    second beyond ``import torch`` (median of three fresh interpreters)."""
    script = ("import sys, time, torch; t = time.perf_counter(); import moe_ops; print(time.perf_counter() - t); "
              "print(sorted(m for m in ('torch._inductor', 'torch._dynamo', 'transformers') if m in sys.modules))")
    runs = [_fresh(script).split("\n", 1) for _ in range(3)]
    assert all(loaded.strip() == "[]" for _, loaded in runs), runs
    seconds = sorted(float(elapsed) for elapsed, _ in runs)[1]
    assert seconds < 1.0, f"import moe_ops took {seconds:.2f} s beyond torch"


def test_names_loaded_when_asked_are_listed():
    """dir(moe_ops) lists the functions loaded when first asked for (parallelize_experts, clip_grad_norm_,
    quantise_experts, experts_quantization_config) though ``import moe_ops`` does not import their modules or
    torchao."""
    script = ("import sys, moe_ops; "
              "names = ('parallelize_experts', 'clip_grad_norm_', 'quantise_experts', 'experts_quantization_config'); "
              "print([n for n in names if n in dir(moe_ops)]); "
              "print([m for m in ('moe_ops.lowering.parallelize', 'torchao') if m in sys.modules]); "
              "print(callable(moe_ops.quantise_experts))")
    listed, loaded, found = _fresh(script).splitlines()[-3:]
    assert listed == "['parallelize_experts', 'clip_grad_norm_', 'quantise_experts', 'experts_quantization_config']"
    assert loaded == "[]" and found == "True"
    with pytest.raises(AttributeError, match="module 'moe_ops' has no attribute 'quantize_experts'"):
        moe_ops.quantize_experts  # noqa: B018


ROUTER = """
import torch, torch.nn.functional as F
from torch._dynamo.utils import counters
def router(x):
    w, i = torch.topk(F.softmax(x, dim=1, dtype=torch.float), 2, dim=-1)
    return w / w.sum(-1, keepdim=True), i
torch.compile(router)(torch.randn(6, 8))
print(counters["moe_ops"]["route_rewrite"])
"""


@pytest.mark.parametrize("order", ["moe_ops_first", "inductor_first"])
def test_passes_installed_whichever_is_imported_first(order):
    first = "import moe_ops; import torch._inductor.config" if order == "moe_ops_first" else \
        "import torch._inductor.config; import moe_ops"
    assert _fresh(first + "\n" + ROUTER).split()[-1] == "1"


@pytest.mark.parametrize("order", ["moe_ops_first", "transformers_first", "quantise_experts_first"])
def test_transformers_experts_registered_whichever_is_imported_first(order):
    """Registered whether transformers comes in after moe_ops, before it, or through moe_ops' own module that
    imports it (its import hook then finds hf_experts half-run)."""
    first = {"moe_ops_first": "import moe_ops; import transformers",
             "transformers_first": "import transformers; import moe_ops",
             "quantise_experts_first": "import moe_ops; from moe_ops import quantise_experts"}[order]
    script = first + """
from transformers.integrations import moe
print("moe_ops" in moe.ALL_EXPERTS_FUNCTIONS, "eager" in moe.ALL_EXPERTS_FUNCTIONS)
"""
    assert _fresh(script).split() == ["True", "True"]
