"""A training loop with every training knob moe_ops has: a small MoE language model written with the
library's functions, compiled, trained on synthetic data; router jitter, capacity with a drop policy,
the load-balancing loss and the router z-loss, or auxiliary-loss-free balancing (an expert bias updated
from the step's counts in an optimizer pre-hook); it prints each layer's load per expert and the slots
dropped, all counted on the device (no host sync inside the step).

Knobs (names users know them by): ``AUX_COEF`` (transformers' ``router_aux_loss_coef``, Megatron's
``moe_aux_loss_coeff``), ``Z_COEF`` (``router_z_loss_coef``), ``JITTER_EPS`` (Megablocks'
``moe_jitter_eps``), ``CAPACITY_FACTOR``/``DROP_POLICY`` (Megatron's ``moe_expert_capacity_factor``,
``moe_token_drop_policy``), ``BIAS_COEFF`` (torchtitan's ``load_balance_coeff``; 0 = off).
Plain MoE code that calls no moe_ops function gets the kernels from ``torch.compile`` alone (see
docs/index.md, "torch.compile rewrites"); this example calls them to reach the options plain code lacks.
"""

import torch
import torch.nn.functional as F
from torch import nn

import moe_ops

VOCAB, HIDDEN, FFN, E, K, LAYERS = 64, 32, 32, 8, 2, 2
AUX_COEF, Z_COEF, JITTER_EPS = 0.05, 1e-3, 0.01
CAPACITY_FACTOR, DROP_POLICY = 1.5, "gshard"  # 0.0: dropless
BIAS_COEFF = 1e-3  # auxiliary-loss-free balancing on top (DeepSeek-V3 uses it instead of AUX_COEF)


class MoELayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm(HIDDEN)
        self.gate = nn.Linear(HIDDEN, E, bias=False)
        self.w_gate_up = nn.Parameter(torch.randn(E, 2 * FFN, HIDDEN) / HIDDEN**0.5)  # (E, 2F, H)
        self.w_down = nn.Parameter(torch.randn(E, HIDDEN, FFN) / FFN**0.5)  # (E, H, F)
        self.register_buffer("expert_bias", torch.zeros(E))  # steers the selection only, no gradient
        self.register_buffer("tokens_per_expert", torch.zeros(E))  # since the last bias update
        self.register_buffer("dropped", torch.zeros((), dtype=torch.int64))  # slots over capacity, this run

    def forward(self, x_BLH):
        x_TH = self.norm(x_BLH).flatten(0, 1)
        router_input = moe_ops.router_jitter(x_TH, JITTER_EPS) if self.training else x_TH
        logits_TE = self.gate(router_input)
        weights_TK, ids_TK = moe_ops.route(logits_TE, K, renormalize=True, correction_bias=self.expert_bias)
        out_TH, num_dropped = moe_ops.fused_experts(
            x_TH, weights_TK, ids_TK, self.w_gate_up, self.w_down,
            capacity_factor=CAPACITY_FACTOR, drop_policy=DROP_POLICY, return_num_dropped=True,
        )
        if self.training:
            self.tokens_per_expert += moe_ops.expert_counts(ids_TK, E)
            self.dropped += num_dropped
        return x_BLH + out_TH.view_as(x_BLH), logits_TE, ids_TK


class TinyMoELM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(MoELayer() for _ in range(LAYERS))
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        logits, ids = [], []
        for layer in self.layers:
            h, layer_logits, layer_ids = layer(h)
            logits.append(layer_logits)
            ids.append(layer_ids)
        lm_loss = F.cross_entropy(self.head(h)[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
        aux = moe_ops.load_balancing_loss(logits, ids)
        z = sum(moe_ops.router_z_loss(layer_logits) for layer_logits in logits) / len(logits)
        return lm_loss + AUX_COEF * aux + Z_COEF * z, lm_loss


def batches(steps, batch=16, length=16):
    """Sequences that count from a random start in a random stride (mod VOCAB): learnable."""
    g = torch.Generator().manual_seed(1)
    start = torch.randint(0, VOCAB, (steps, batch, 1), generator=g)
    stride = torch.randint(1, 4, (steps, batch, 1), generator=g)
    return (start + stride * torch.arange(length)) % VOCAB


torch.manual_seed(0)
model = TinyMoELM()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
if BIAS_COEFF:
    def update_biases(*_):
        for layer in model.layers:
            moe_ops.update_expert_bias(layer.expert_bias, layer.tokens_per_expert, BIAS_COEFF)
    optimizer.register_step_pre_hook(update_biases)

step = torch.compile(model)
lm_losses = []
for input_ids in batches(150):
    loss, lm_loss = step(input_ids)
    loss.backward()
    optimizer.step()  # the pre-hook updates each layer's expert bias from this step's counts first
    optimizer.zero_grad()
    lm_losses.append(lm_loss.detach())

lm_losses = torch.stack(lm_losses)
print(f"language-model loss: {lm_losses[:5].mean():.3f} (first steps) -> {lm_losses[-5:].mean():.3f} (last steps)")
assert lm_losses[-5:].mean() < 0.5 * lm_losses[:5].mean(), "the model did not learn"
model.eval()
with torch.no_grad():
    for layer in model.layers:
        layer.tokens_per_expert.zero_()
    held_out = batches(1, batch=64)[0]
    h = model.embed(held_out)
    for i, layer in enumerate(model.layers):
        h, _, ids_TK = layer(h)
        load = moe_ops.expert_counts(ids_TK, E)
        print(f"layer {i}: slots per expert {load.int().tolist()} (mean {load.mean():.0f}), "
              f"bias {[round(b, 4) for b in layer.expert_bias.tolist()]}, "
              f"dropped in training {int(layer.dropped)}")
