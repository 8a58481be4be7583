"""The same experts stored the ways different codebases store them give the same output.

    EFH, fused       HF transformers:  w_gate_up (E, 2F, H) = [gate; up],  w_down (E, H, F)
    EFH, separate    Mixtral / gpt-fast w1, w3: w_gate_up = w1 (E, F, H), w_up = w3 (E, F, H)
    EHF, fused       torchtitan:       w_gate_up (E, H, 2F),               w_down (E, F, H)
    EHF, separate    w1 (E, H, F), w_up = w3 (E, H, F)
    EFH, interleaved gate and up rows alternate: gate_0, up_0, gate_1, up_1, ...
    EHF, interleaved GPT-OSS:          w_gate_up (E, H, 2F), gate/up alternating along 2F

Every other layout is built from the EFH tensors by chunk / stack / transpose, so all describe one
set of experts.
"""

import torch

import moe_ops

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
tolerance = {torch.bfloat16: 2e-2, torch.float32: 2e-3}[dtype]
T, H, F, E, K = 48, 128, 192, 8, 2

torch.manual_seed(0)
x = torch.randn(T, H, device=device, dtype=dtype)
topk_weights, topk_ids = moe_ops.route(torch.randn(T, E, device=device), K, renormalize=True)
w_gate_up = 0.02 * torch.randn(E, 2 * F, H, device=device, dtype=dtype)
w_down = 0.02 * torch.randn(E, H, F, device=device, dtype=dtype)

w1, w3 = w_gate_up.chunk(2, dim=1)  # gate (E, F, H), up (E, F, H)
w_gate_up_interleaved = torch.stack([w1, w3], dim=2).reshape(E, 2 * F, H)


def ehf(w):
    return w.transpose(1, 2).contiguous()


layouts = {
    "EFH fused": dict(w_gate_up=w_gate_up, w_down=w_down),
    "EFH separate w1/w3": dict(w_gate_up=w1, w_up=w3, w_down=w_down),
    "EHF fused": dict(w_gate_up=ehf(w_gate_up), w_down=ehf(w_down), layout="EHF"),
    "EHF separate w1/w3": dict(w_gate_up=ehf(w1), w_up=ehf(w3), w_down=ehf(w_down), layout="EHF"),
    "EFH interleaved": dict(w_gate_up=w_gate_up_interleaved, w_down=w_down, interleaved=True),
    "EHF interleaved": dict(
        w_gate_up=ehf(w_gate_up_interleaved), w_down=ehf(w_down), layout="EHF", interleaved=True
    ),
}

expected = moe_ops.fused_experts(x, topk_weights, topk_ids, **layouts["EFH fused"]).float()
for name, weights in layouts.items():
    out = moe_ops.fused_experts(x, topk_weights, topk_ids, **weights)
    rel_err = ((out.float() - expected).abs().max() / expected.abs().max()).item()
    print(f"{name:<20} relative difference from EFH fused: {rel_err:.1e}")
    assert out.shape == (T, H) and rel_err <= tolerance, (name, rel_err)
