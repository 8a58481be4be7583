"""Every Triton kernel that moe_ops' eager paths launch, compiled for sm90 as the GPU compiles it.

The CPU tests run the kernels under Triton's interpreter, which executes their Python: it cannot tell
whether the compiler accepts them (dtype rules, constexpr-only branches, layouts). Here the eager paths run
once under the interpreter with every launch recorded (the kernel, its arguments' types, its compile-time
values), then a process without the interpreter compiles each recorded launch for sm90 with Triton's
frontend and its bundled ptxas: no GPU needed. The templates Inductor generates are compiled the same way
in tests/test_lowering.py.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

import moe_ops
from moe_ops.expert_gemm_triton import expert_gemm_triton
from moe_ops.fused_experts import fused_experts_triton
from moe_ops.fused_experts_backward_triton import fused_experts_backward_triton
from moe_ops.layout import PackedSchedule
from moe_ops.quantised import (
    quantise_blocks,
    quantise_fp8_groups,
    quantise_groups,
    quantise_per_row,
    quantise_weight,
)
from moe_ops.routing_triton import route_triton
from moe_ops.schedule_triton import block_schedule_triton
from moe_ops.tiles import TMA_BLOCK_M

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("records launches under Triton's interpreter (the CPU test setup)", allow_module_level=True)

_POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32",
                  torch.int64: "*i64", torch.int8: "*i8", torch.uint8: "*u8", torch.float8_e4m3fn: "*fp8e4nv"}


def _argument_type(value) -> str | None:
    """The signature type of a runtime argument, or None for a compile-time one."""
    if isinstance(value, torch.Tensor):
        return _POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i64" if abs(value) >= 2**31 else "i32"
    if isinstance(value, float):
        return "fp32"
    return None


def _record(launches: list):
    """An InterpretedFunction.run that notes each launch (as _COMPILE takes it) before running it, specialised
    as Triton's GPU launcher specialises it: integers equal to 1 are constants, and tensors (whose memory a
    GPU allocator aligns to 16 bytes) and integers divisible by 16 are marked so, which decides how wide the
    compiled loads are and whether the pipeliner copies them asynchronously."""
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        names = self.arg_names
        values = dict(zip(names, args, strict=False)) | {k: v for k, v in kwargs.items() if k in names}
        constexprs = {name for name, param in inspect.signature(self.fn).parameters.items()
                      if "constexpr" in str(param.annotation)}
        signature, compile_time, divisible = {}, {}, []
        for name, value in values.items():
            kind = None if name in constexprs else _argument_type(value)
            if kind in ("i32", "i64") and value == 1:
                signature[name], compile_time[name] = "constexpr", 1
            elif kind is None:
                compile_time[name] = value
            else:
                signature[name] = kind
                if isinstance(value, torch.Tensor) or (kind in ("i32", "i64") and value % 16 == 0):
                    divisible.append(names.index(name))
        options = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages")}
        launches.append(dict(module=self.fn.__module__, name=self.fn.__name__, signature=signature,
                             constexprs=compile_time, options=options, divisible=divisible))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    return recording_run


# Compiles each launch of the JSON file argv[1] for sm90; with argv[2] == "registers", also assembles it with
# ptxas -v and prints the bytes of registers it spills and the number of its int-to-float conversions (I2F, but
# not I2F*.RP: the reciprocal of an integer division's divisor) in the machine code.
_COMPILE = """
import importlib, json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ptxas, cuobjdump = (os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
                    for tool in ("ptxas", "cuobjdump"))
failed = 0
for launch in json.load(open(sys.argv[1])):
    kernel = getattr(importlib.import_module(launch["module"]), launch["name"])
    attrs = {(index,): [["tt.divisibility", 16]] for index in launch["divisible"]}
    try:
        compiled = triton.compile(ASTSource(fn=kernel, signature=launch["signature"],
                                            constexprs=launch["constexprs"], attrs=attrs),
                                  target=GPUTarget("cuda", 90, 32), options=launch["options"])
        print("compiled", launch["name"])
    except Exception as error:
        failed += 1
        print("FAILED", launch["name"], launch["constexprs"], type(error).__name__, str(error)[:2000], file=sys.stderr)
        continue
    if sys.argv[2:] == ["registers"]:
        with tempfile.TemporaryDirectory() as folder:
            ptx = os.path.join(folder, "kernel.ptx")
            open(ptx, "w").write(compiled.asm["ptx"])
            cubin = os.path.join(folder, "kernel.cubin")
            report = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx, "-o", cubin], capture_output=True,
                                    text=True).stderr
            sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
        spilled = re.search(r"(\\d+) bytes spill stores", report)
        conversions = sum(not op.endswith(".RP") for op in re.findall(r"\\bI2F[.\\w]*", sass))
        print("spilled", spilled.group(1) if spilled else "unknown", conversions, json.dumps(launch["label"]))
sys.exit(failed)
"""


def test_every_launched_kernel_compiles_for_hopper(tmp_path, monkeypatch):
    """Routing, schedule, capacity, the expert GEMMs (bf16 through pointer loads and TMA tiles; int8, fp8
    and int4 quantised weights; fp8 inputs) and the backward's kernels, each launch as the eager paths make it, compiled
    for sm90."""
    launches: list = []
    monkeypatch.setattr(InterpretedFunction, "run", _record(launches))
    torch.manual_seed(0)
    T, K, E, H, F = 40, 2, 4, 64, 32
    x = torch.randn(T, H).bfloat16()
    w_gate_up = (torch.randn(E, 2 * F, H) / H**0.5).bfloat16()
    w_down = (torch.randn(E, H, F) / F**0.5).bfloat16()
    weights, ids = moe_ops.route(torch.randn(T, E), K, renormalize=True)  # the CPU route op: the reference
    route_triton(torch.randn(T, E), K, "softmax", False, True, 0.0, None, 1, 1, 1.0)
    # DeepSeek-V3's router: sigmoid scores, a selection bias, group-limited selection, statistics kept.
    route_triton(torch.randn(T, 8), K, "sigmoid", False, True, 1e-20, torch.randn(8), 4, 2, 2.5, with_stats=True)
    route_triton(torch.randn(T, E).bfloat16(), K, "softmax", True, False, 0.0, None, 1, 1, 1.0, any_count=True)
    plain = (x, weights, ids, w_gate_up, w_down, None, None, None, None, "EFH", False, "silu", True, 1.702, 7.0)
    fused_experts_triton(*plain, 0.0, "position")
    fused_experts_triton(*plain, 0.5, "position")  # capacity: the position policy's kernel
    # fp32 (IEEE dots on the FMA units unless tf32 is allowed) and fp16; GPT-OSS's interleaved, biased,
    # clamped form in EHF layout.
    for dtype in (torch.float32, torch.float16):
        fused_experts_triton(x.to(dtype), weights, ids, w_gate_up.to(dtype), w_down.to(dtype), *plain[5:], 0.0,
                             "position")
    fused_experts_triton(x, weights, ids, w_gate_up.transpose(1, 2), w_down.transpose(1, 2), None,
                         torch.randn(E, 2 * F), None, torch.randn(E, H), "EHF", True, "clamped_swiglu", True, 1.702,
                         7.0, 0.0, "position")
    (q_gate_up, s_gate_up), (q_down, s_down) = (quantise_per_row(w, torch.int8) for w in (w_gate_up, w_down))
    fused_experts_triton(x, weights, ids, q_gate_up, q_down, *plain[5:], 0.0, "position", s_gate_up, None, s_down)
    (f_gate_up, t_gate_up), (f_down, t_down) = (quantise_per_row(w, torch.float8_e4m3fn) for w in (w_gate_up, w_down))
    fused_experts_triton(x, weights, ids, f_gate_up, f_down, *plain[5:], 0.0, "position", t_gate_up, None, t_down)
    # fp8 weights in tiles, against bf16 and fp8 inputs; tiles of 16 inputs: K steps shallower than fp8 dots
    # reduce (bf16 dots there).
    for block in (32, 16):
        (b_gate_up, c_gate_up), (b_down, c_down) = (quantise_blocks(w.contiguous(), block) for w in (w_gate_up, w_down))
        for inputs in ("none", "fp8_groupwise"):
            fused_experts_triton(x, weights, ids, b_gate_up, b_down, *plain[5:], 0.0, "position", c_gate_up, None,
                                 c_down, None, None, None, inputs)
    # w8a8: fp8 inputs against fp8 weights (fp8 dots)
    fused_experts_triton(x, weights, ids, f_gate_up, f_down, *plain[5:], 0.0, "position", t_gate_up, None, t_down,
                         None, None, None, "fp8_rowwise")
    # int4 in groups; of 16 inputs, a K step shallower than its joined unpacking.
    for group in (32, 16):
        (i_gate_up, i_s_gate_up, i_z_gate_up), (i_down, i_s_down, i_z_down) = (quantise_groups(w, group, bits=4)
                                                                               for w in (w_gate_up, w_down))
        fused_experts_triton(x, weights, ids, i_gate_up, i_down, *plain[5:], 0.0, "position", i_s_gate_up, None,
                             i_s_down, i_z_gate_up, None, i_z_down)
    for dtype in (torch.bfloat16, torch.float32):
        grads = [torch.randn(T, H).to(dtype), torch.empty(0)]
        fused_experts_backward_triton(x.to(dtype), weights, ids, w_gate_up.to(dtype), w_down.to(dtype), *plain[5:],
                                      0.0, "position", grads)
    # TMA tiles (descriptors, a persistent grid), which the fused op takes on a Hopper GPU from enough rows
    # per expert on: gate and up as one paired descriptor, fp16 (the interpreter's descriptors take no bf16).
    H, F = 256, 128  # multiples of the TMA tiles' columns (128 gated, 256 down)
    w_gate_up, w_down = (torch.randn(E, 2 * F, H) / H**0.5).half(), (torch.randn(E, H, F) / F**0.5).half()
    sorted_slots, _, _, _, offsets = block_schedule_triton(ids.int(), E, 1)
    schedule = PackedSchedule(sorted_slots, offsets)
    rows = torch.randn(T * K, H).half()
    h = expert_gemm_triton(rows, w_gate_up[:, :F], schedule, T * K, TMA_BLOCK_M, w_up=w_gate_up[:, F:],
                           activation="silu", tma=True)
    expert_gemm_triton(h, w_down, schedule, T * K, TMA_BLOCK_M, slot_weights=weights.reshape(-1).float(),
                       scatter=True, slot_ids=ids.reshape(-1), tma=True)
    monkeypatch.undo()

    unique = {json.dumps(launch, sort_keys=True, default=str) for launch in launches}
    names = {json.loads(launch)["name"] for launch in unique}
    assert names >= {"_route_kernel", "_schedule_scatter_kernel", "_capacity_position_kernel", "_expert_gemm_kernel",
                     "_activation_grad_kernel", "_expert_weight_grad_kernel"}, names
    assert any(json.loads(launch)["constexprs"].get("TMA") for launch in unique), "no TMA launch recorded"
    for flag in ("A_SCALED", "A_GROUPED", "W_INT4"):
        assert any(json.loads(launch)["constexprs"].get(flag) for launch in unique), f"no {flag} launch recorded"
    assert {json.loads(launch)["signature"].get("w_ptr") for launch in unique} >= {"*bf16", "*i8", "*fp8e4nv", "*u8"}
    path = tmp_path / "launches.json"
    path.write_text("[" + ",".join(sorted(unique)) + "]")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    result = subprocess.run([sys.executable, "-P", "-c", _COMPILE, str(path)], env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("compiled") == len(unique), result.stdout


def test_expert_gemm_tiles_spill_no_registers(tmp_path, monkeypatch):
    """The expert GEMM's decode and prefill tiles (16- and 128-row blocks, the configs gemm_config picks) over each
    quantised weight form, gated and not, compiled for sm90 and assembled: ptxas spills no register. A spilling
    tile is slow beyond any tuning: fp8 weights in 128 x 128 blocks ran at 0.16x bf16's speed at Mixtral T = 8192
    on the H100 with the tile that spilled 1.2 KB (benchmarks/results/h100-2026-12-05/quantised.md). int4's tiles,
    and the decode tiles of int8 in groups, convert no integer to float (I2F, an eighth of the fp32 rate)."""
    launches: list = []
    monkeypatch.setattr(InterpretedFunction, "run", _record(launches))
    torch.manual_seed(0)
    T, K, E, H, F = 160, 2, 2, 256, 128  # H and F: whole 128 x 128 blocks
    ids = torch.randint(0, E, (T, K)).int()
    sorted_slots, _, _, _, offsets = block_schedule_triton(ids, E, 1)
    schedule = PackedSchedule(sorted_slots, offsets)
    rows = torch.randn(T * K, H).bfloat16()
    w = (torch.randn(E, F, H) / H**0.5).bfloat16()
    fp8_rows = {"fp8_rowwise": quantise_per_row(rows, torch.float8_e4m3fn),
                "fp8_groupwise": quantise_fp8_groups(rows, 128)}
    labels = [None] * len(launches)  # the schedule's
    for block_m in (16, 128):
        for scheme, inputs in (("int8", None), ("int8_g128", None), ("int4_g128", None), ("fp8", "fp8_rowwise"),
                               ("fp8_b128", "fp8_groupwise")):
            values, scale, zero = quantise_weight(w, scheme)
            a, a_scale = fp8_rows[inputs] if inputs else (rows, None)
            for gated in (True, False):
                up = dict(w_up=values, w_up_scale=scale, w_up_zero=zero, activation="silu") if gated else {}
                count = len(launches)
                expert_gemm_triton(a, values, schedule, T * K, block_m, w_scale=scale, w_zero=zero, a_scale=a_scale,
                                   out_dtype=torch.bfloat16, **up)
                labels += [f"{scheme} inputs={inputs} gated={gated} block_m={block_m}"] * (len(launches) - count)
    monkeypatch.undo()

    gemms = [dict(launch, label=label) for launch, label in zip(launches, labels, strict=True)
             if launch["name"] == "_expert_gemm_kernel"]
    assert len(gemms) == 20
    assert all(launch["constexprs"]["BLOCK_M"] == int(launch["label"].rsplit("=", 1)[1]) for launch in gemms)
    path = tmp_path / "launches.json"
    path.write_text(json.dumps(gemms, default=str))
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    result = subprocess.run([sys.executable, "-P", "-c", _COMPILE, str(path), "registers"], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    spills = [line.split(" ", 3)[1:] for line in result.stdout.splitlines() if line.startswith("spilled")]
    assert len(spills) == len(gemms), result.stdout
    assert all(spilled == "0" for spilled, _, _ in spills), spills
    # int4's nibbles become bf16 through the bits of 2^7 at decode (scaled_group_product) and fp32 through those of
    # 2^23 at prefill (int4_as_float32); int8 in groups at decode goes to bf16 without fp32 in between (the
    # group's scale comes after the dot), which Triton does with packed bf16 adds.
    converting = [label for _, conversions, label in spills
                  if conversions != "0" and ("int4" in label or ("int8_g128" in label and "block_m=16" in label))]
    assert not converting, spills
