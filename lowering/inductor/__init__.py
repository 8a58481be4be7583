"""Inductor lowerings of the moe_ops ops: Triton templates (expert_gemm_lowering.py), the fused experts as
Inductor nodes (fused_experts_lowering.py), kernels launched by the graph (kernel_calls.py) and extern
calls (direct_calls.py). Imports nothing itself; moe_ops.lowering.passes registers them."""
