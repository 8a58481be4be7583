"""vLLM's Triton fused-MoE kernel as a benchmark peer, compiled from a vLLM source file that stays outside this
repository.

The peer is vLLM's public ``fused_moe_kernel`` (``vllm/model_executor/layers/fused_moe/fused_moe.py``). The caller
names that file (``--vllm-source``; beside it, a ``configs/`` folder holding vLLM's tuned JSON configs). Every
``@triton.jit`` function of the file is compiled from the file's text in a temporary module; none of vLLM's code is
kept here. The kernel is launched with keyword arguments (vLLM's own names), so a vLLM version whose kernel takes
other arguments is refused by name rather than run wrongly.

What vLLM runs around the kernel (CUDA ops of its own) is done here by the closest equivalent, one launch each
where vLLM's is one:

    vLLM                          here
    moe_align_block_size          moe_ops.block_schedule (the same layout: each expert's slots padded to
                                  BLOCK_SIZE_M with the sentinel T*K, an expert per block, -1 past the end,
                                  the padded row count on the device)
    silu_and_mul                  a compiled torch function (SiLU(gate) * up of the two halves)
    scaled_fp8_quant, per token   a compiled torch function (fp8 w8a8 only)
    moe_sum                       torch.sum over the K slots of a token

The kernel's tile config is vLLM's: its tuned file for (E, N = F, the GPU's name[, dtype=fp8_w8a8]) and that
file's row for the batch size nearest T, as vLLM picks it; without a file, the default vLLM's code falls back on
(``DEFAULT_CONFIG``), and the report says which (``config_source``).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import moe_ops
from moe_ops.quantised import quantise_per_row

KERNEL_NAME = "fused_moe_kernel"
# The arguments this driver passes to vLLM's kernel (its signature in vLLM's 2025 releases); a kernel that takes
# others is refused (VllmKernelError) instead of being run with arguments it does not expect.
KERNEL_ARGUMENTS = (
    "a_ptr", "b_ptr", "c_ptr", "a_scale_ptr", "b_scale_ptr", "topk_weights_ptr", "sorted_token_ids_ptr",
    "expert_ids_ptr", "num_tokens_post_padded_ptr", "N", "K", "EM", "num_valid_tokens", "stride_am", "stride_ak",
    "stride_be", "stride_bk", "stride_bn", "stride_cm", "stride_cn", "stride_asm", "stride_ask", "stride_bse",
    "stride_bsk", "stride_bsn", "group_n", "group_k", "BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K",
    "GROUP_SIZE_M", "MUL_ROUTED_WEIGHT", "top_k", "compute_type", "use_fp8_w8a8", "use_int8_w8a8",
    "use_int8_w8a16", "per_channel_quant",
)  # fmt: skip
# The config vLLM's get_default_config gives a bf16 or per-row fp8 layer without a tuned file (its 2025 code): one
# for batches of at most E tokens, one for larger.
DEFAULT_CONFIG = {
    "small": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1},
    "large": {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 8},
}
# Config keys that are launch options, not the kernel's arguments.
LAUNCH_OPTIONS = ("num_warps", "num_stages")


class VllmKernelError(RuntimeError):
    """The vLLM source given is not one whose kernel this driver knows how to launch."""


def load_kernel(source: Path) -> triton.runtime.JITFunction:
    """vLLM's ``fused_moe_kernel``, compiled from ``source`` (with every other ``@triton.jit`` function of the file,
    which it may call)."""
    source = Path(source)
    if not source.is_file():
        raise VllmKernelError(f"--vllm-source: {source} is no file (expected vLLM's fused_moe.py)")
    text = source.read_text()
    lines = text.splitlines()
    jitted = []
    for node in ast.parse(text).body:
        if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
            first = min(d.lineno for d in node.decorator_list)
            jitted.append((node.name, "\n".join(lines[first - 1:node.end_lineno])))
    if KERNEL_NAME not in dict(jitted):
        raise VllmKernelError(f"--vllm-source: {source} defines no @triton.jit {KERNEL_NAME}")
    # Triton reads a jitted function's source from its file: the functions go into a module file of their own.
    module_text = "import triton\nimport triton.language as tl\n\n\n" + "\n\n\n".join(body for _, body in jitted)
    module_file = Path(tempfile.mkdtemp(prefix="peer_vllm_")) / "vllm_fused_moe_kernels.py"
    module_file.write_text(module_text + "\n")
    spec = importlib.util.spec_from_file_location("vllm_fused_moe_kernels", module_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    kernel = getattr(module, KERNEL_NAME)
    if tuple(kernel.arg_names) != KERNEL_ARGUMENTS:
        missing = [a for a in kernel.arg_names if a not in KERNEL_ARGUMENTS]
        extra = [a for a in KERNEL_ARGUMENTS if a not in kernel.arg_names]
        raise VllmKernelError(
            f"--vllm-source: its {KERNEL_NAME} takes other arguments than this driver passes (it also takes "
            f"{missing}, not {extra}): a vLLM version this driver does not know"
        )
    return kernel


def config_file(configs: Path, num_experts: int, intermediate: int, device_name: str, fp8: bool) -> Path:
    """Where vLLM keeps the tuned configs of a layer (its file-name scheme)."""
    dtype = ",dtype=fp8_w8a8" if fp8 else ""
    return Path(configs) / f"E={num_experts},N={intermediate},device_name={device_name.replace(' ', '_')}{dtype}.json"


def kernel_config(tuned: dict[int, dict] | None, num_tokens: int, num_experts: int) -> dict:
    """The tile config vLLM launches for a batch of ``num_tokens``: the tuned row of the nearest batch size, or
    its default."""
    if tuned:
        return dict(tuned[min(tuned, key=lambda batch: abs(batch - num_tokens))])
    return dict(DEFAULT_CONFIG["small" if num_tokens <= num_experts else "large"])


def _silu_and_mul(gate_up_SN: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up_SN.chunk(2, dim=-1)
    return F.silu(gate.float()).mul(up.float()).to(gate_up_SN.dtype)


def _fp8_per_token(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values, scale = quantise_per_row(a, torch.float8_e4m3fn)
    return values, scale.unsqueeze(-1)


# On the GPU each is one fused kernel, as vLLM's CUDA op is; the CPU (tests, under Triton's interpreter) runs them
# as they are, with no C++ compile.
_ON_GPU = {fn: torch.compile(fn, dynamic=True) for fn in (_silu_and_mul, _fp8_per_token)}


def _run(fn, tensor: torch.Tensor):
    return (_ON_GPU[fn] if tensor.is_cuda else fn)(tensor)


class VllmFusedMoE:
    """The routed experts of one layer through vLLM's kernel: ``(x_TH, weights_TK, ids_TK) -> out_TH``, bf16,
    weights as moe_ops takes them (``w_gate_up`` (E, 2F, H), gate rows then up rows; ``w_down`` (E, H, F)).
    ``fp8``: the weights as fp8 e4m3 with a scale per expert and output row, the GEMMs' inputs quantised to fp8 per
    token on the fly (vLLM's per-channel fp8 w8a8)."""

    def __init__(self, kernel, w_gate_up: torch.Tensor, w_down: torch.Tensor, *, fp8: bool = False,
                 configs: Path | None = None, device_name: str = ""):
        self.kernel, self.fp8 = kernel, fp8
        self.num_experts, self.intermediate = w_gate_up.shape[0], w_down.shape[2]
        if fp8:
            (self.w1, self.w1_scale), (self.w2, self.w2_scale) = (
                quantise_per_row(w, torch.float8_e4m3fn) for w in (w_gate_up, w_down))
        else:
            self.w1, self.w2, self.w1_scale, self.w2_scale = w_gate_up, w_down, None, None
        path = config_file(configs, self.num_experts, self.intermediate, device_name, fp8) if configs else None
        self.tuned = None
        self.config_source = "vLLM's default config (no tuned file)"
        if path is not None and path.is_file():
            self.tuned = {int(batch): row for batch, row in json.loads(path.read_text()).items()}
            self.config_source = f"vLLM's tuned {path.name}"

    def _gemm(self, a: torch.Tensor, w: torch.Tensor, w_scale, out: torch.Tensor, schedule, routing, top_k: int,
              config: dict) -> None:
        a_scale = None
        if self.fp8:
            a, a_scale = _run(_fp8_per_token, a)
        options = {name: config.pop(name) for name in LAUNCH_OPTIONS if name in config}
        num_blocks = schedule.sorted_slots.numel()
        grid = (triton.cdiv(num_blocks, config["BLOCK_SIZE_M"]) * triton.cdiv(w.shape[1], config["BLOCK_SIZE_N"]),)
        self.kernel[grid](
            a_ptr=a, b_ptr=w, c_ptr=out, a_scale_ptr=a_scale, b_scale_ptr=w_scale,
            topk_weights_ptr=routing, sorted_token_ids_ptr=schedule.sorted_slots,
            expert_ids_ptr=schedule.block_expert, num_tokens_post_padded_ptr=schedule.num_padded,
            N=w.shape[1], K=w.shape[2], EM=num_blocks, num_valid_tokens=out.shape[0],
            stride_am=a.stride(0), stride_ak=a.stride(1),
            stride_be=w.stride(0), stride_bk=w.stride(2), stride_bn=w.stride(1),
            stride_cm=out.stride(0), stride_cn=out.stride(1),
            stride_asm=a_scale.stride(0) if a_scale is not None else 0,
            stride_ask=a_scale.stride(1) if a_scale is not None else 0,
            stride_bse=w_scale.stride(0) if w_scale is not None else 0, stride_bsk=0,
            stride_bsn=w_scale.stride(1) if w_scale is not None else 0,
            group_n=0, group_k=0, MUL_ROUTED_WEIGHT=routing is not None, top_k=top_k, compute_type=tl.bfloat16,
            use_fp8_w8a8=self.fp8, use_int8_w8a8=False, use_int8_w8a16=False, per_channel_quant=self.fp8,
            **config, **options,
        )

    def __call__(self, x_TH: torch.Tensor, weights_TK: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
        if x_TH.dtype != torch.bfloat16:
            raise TypeError(f"x_TH: expected torch.bfloat16, got {x_TH.dtype}")
        num_tokens, top_k = ids_TK.shape
        num_slots = num_tokens * top_k
        config = kernel_config(self.tuned, num_tokens, self.num_experts)
        schedule = moe_ops.block_schedule(ids_TK, self.num_experts, config["BLOCK_SIZE_M"])
        gate_up_SN = x_TH.new_empty(num_slots, self.w1.shape[1])
        self._gemm(x_TH, self.w1, self.w1_scale, gate_up_SN, schedule, None, top_k, dict(config))
        hidden_SF = _run(_silu_and_mul, gate_up_SN)
        out_SH = x_TH.new_empty(num_slots, self.w2.shape[1])
        routing_S = weights_TK.to(torch.float32).contiguous()
        self._gemm(hidden_SF, self.w2, self.w2_scale, out_SH, schedule, routing_S, 1, dict(config))
        return out_SH.view(num_tokens, top_k, -1).sum(1)
