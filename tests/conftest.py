"""Test setup: Triton kernels run on the GPU when there is one, else under Triton's interpreter.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` function is created, so it is set here,
before the tests import the kernel modules.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Device on which the Triton kernels run in this session: the GPU, or the CPU under the interpreter.
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"

# Tolerance of a result against its reference, relative to max|reference| (scale-free):
# bf16 keeps 8 mantissa bits, fp16 11; fp32 dots may use tf32 on the GPU.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 2e-3, torch.float64: 1e-10}


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "",
                     tolerance: dict | None = None) -> None:
    """max |actual - expected| <= tol(dtype) * max |expected|, with NaN/inf never passing; ``tolerance``
    replaces TOLERANCE's table."""
    tolerance = tolerance or TOLERANCE
    actual = actual.double().cpu()
    expected = expected.double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values in the result"
    if expected.numel() == 0:
        return
    scale = expected.abs().max().clamp_min(1e-6)
    err = (actual - expected).abs().max() / scale
    assert err <= tolerance[dtype], f"{what}: relative error {err:.3e} > {tolerance[dtype]:.1e} ({dtype})"


def eager_and_captured(step):
    """(step() run eagerly, step() captured in a CUDA graph and replayed): a step with a host sync fails to
    capture. The eager run (the warm-up) is on a side stream, as torch's CUDA-graph examples and NVIDIA's
    capture checklist ask of autograd work before a capture: autograd keeps streams of the warm-up's graph
    (pytorch/pytorch#164302), and a captured backward that touches the legacy default stream fails."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    return eager, captured


def zipf_ids(tokens: int, k: int, num_experts: int, device="cpu", alpha: float = 1.2) -> torch.Tensor:
    """Skewed routing: expert e drawn with probability ~ 1/(e+1)^alpha, k distinct experts a token (int32)."""
    if tokens == 0:
        return torch.empty((0, k), dtype=torch.int32, device=device)
    probs = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** alpha
    return torch.multinomial(probs.expand(tokens, -1), k, replacement=False).to(device=device, dtype=torch.int32)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


# A device call ends at its time limit, before pytest's closing summary: MOE_OPS_FAILURE_LOG names a file to which
# each failure's traceback is appended as it is reported; pytest-xdist's workers send their reports to the controller,
# which writes them (a worker writing too would log each failure twice).
FAILURE_LOG = os.environ.get("MOE_OPS_FAILURE_LOG")


def pytest_runtest_logreport(report):
    if FAILURE_LOG and report.failed and "PYTEST_XDIST_WORKER" not in os.environ:
        with open(FAILURE_LOG, "a") as log:
            log.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")


@pytest.fixture(autouse=True)
def _release_cuda_memory():
    """Parallel test workers share the GPU: a test's blocks left in its worker's caching allocator (a CUDA-marked
    test's, or one that ran on TRITON_DEVICE) would leave the other workers' next tests out of memory."""
    yield
    if HAS_CUDA and torch.cuda.memory_reserved() > 0:
        gc.collect()
        torch.cuda.empty_cache()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
