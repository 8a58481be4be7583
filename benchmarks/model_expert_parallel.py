"""A written model of expert parallelism's cost for one MoE layer (forward + backward), on paper: the
all-to-all bytes each rank moves and the time they take against the experts' compute, for EP = 2, 8, 64,
at Mixtral-8x7B and Qwen3-30B-A3B shapes. Writes ``results/expert_parallel_model.md``; the measured
counterpart is benchmarks/bench_expert_parallel.py (run on two GPUs under the two-GPU issue).

    python benchmarks/model_expert_parallel.py [--out DIR]

The model, per rank and layer, T tokens per rank, bf16 (2 bytes):
- bytes each all-to-all moves off the rank: T K H 2 (1 - 1/EP) (exact dispatch: each routed row once;
  a row for an expert on the own rank stays); four of them per step: dispatch and combine forward, and
  their gradients backward. Padded dispatch sends EP C rows instead of the routed T K (dropless
  C = T min(K, E_local)): EP min(K, E_local) / K times as many bytes.
- links: within a node of 8 GPUs the traffic goes over NVLink; past 8 ranks a share 1 - 8/EP of it
  crosses the network, at the network's rate, concurrently with the NVLink share (time = the slower).
- compute: 18 T K H F FLOP (three GEMMs of a gated MLP, forward and backward) at the rate the H200
  reached for that layer in benchmarks/results/training_nvidia-h200.md (the faster peer's).
- per-GPU throughput of EP = N against EP = 1 at the same T per rank: compute / (compute + comm) with no
  overlap, compute / max(compute, comm) with full overlap (the two bounds).
"""

from __future__ import annotations

import argparse
from pathlib import Path

BYTES = 2  # bf16
GPUS_PER_NODE = 8
# Link rates, one direction, per GPU (GB/s): stated ones and measured ones, each with its source.
LINKS = {
    "NVLink 4 (H200 spec: 900 GB/s both ways)": 450.0,  # NVIDIA H200 datasheet
    "NVLink as DeepEP measured it (H800, EP8)": 153.0,  # deepseek-ai/DeepEP README, normal kernels
}
NETWORK = {
    "InfiniBand NDR (400 Gb/s per GPU, spec)": 50.0,  # NVIDIA ConnectX-7 NDR
    "RDMA as DeepEP measured it (CX7)": 43.0,  # deepseek-ai/DeepEP README, internode, lower end
}
# (E, K, H, F, the measured fwd+bwd TFLOP/s of the faster peer on the H200 at T = 32768, T per rank)
SHAPES = {
    "mixtral-8x7b": (8, 2, 4096, 14336, 601.3),
    "qwen3-30b-a3b": (128, 8, 2048, 768, 422.6),
}
TOKENS = (8192, 32768)
EP_SIZES = (2, 8, 64)


def comm_seconds(tokens, top_k, hidden, ep, nvlink, network, padded=False, num_experts=None) -> float:
    """Seconds of the four all-to-alls of one step on one rank."""
    rows = tokens * top_k
    if padded:
        rows = ep * tokens * min(top_k, num_experts // ep)
    off_rank = 4 * rows * hidden * BYTES * (1 - 1 / ep)
    if ep <= GPUS_PER_NODE:
        return off_rank / (nvlink * 1e9)
    across = 1 - GPUS_PER_NODE / ep
    return max(off_rank * across / (network * 1e9), off_rank * (1 - across) / (nvlink * 1e9))


def report() -> str:
    model = __doc__[__doc__.index("The model, per rank and layer,"):].strip()
    lines = ["# Expert parallelism on paper: all-to-all bytes and time per layer", "",
             "Written by benchmarks/model_expert_parallel.py (arithmetic, no measurement of its own).", "",
             model, "", "EP = 64 needs E >= 64: Mixtral-8x7B (E = 8) has no such row.", ""]
    for name, (E, K, H, F, tflops) in SHAPES.items():
        lines += [f"## {name} (E={E}, K={K}, H={H}, F={F}; compute at {tflops} TFLOP/s)", "",
                  "| T per rank | EP | all-to-all MB per step | compute ms | links (NVLink / network) | comm ms"
                  " (exact) | EP/1 no overlap | EP/1 full overlap | comm ms (padded) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for tokens in TOKENS:
            compute = 18 * tokens * K * H * F / (tflops * 1e12)
            for ep in EP_SIZES:
                if E % ep:
                    continue
                megabytes = 4 * tokens * K * H * BYTES * (1 - 1 / ep) / 1e6
                for nvlink, network in zip(LINKS.values(), NETWORK.values(), strict=True):
                    comm = comm_seconds(tokens, K, H, ep, nvlink, network)
                    padded = comm_seconds(tokens, K, H, ep, nvlink, network, padded=True, num_experts=E)
                    links = f"{nvlink:.0f} / {network:.0f} GB/s" if ep > GPUS_PER_NODE else f"{nvlink:.0f} GB/s"
                    lines.append(
                        f"| {tokens} | {ep} | {megabytes:.0f} | {compute * 1e3:.2f} | {links} | {comm * 1e3:.2f} | "
                        f"{compute / (compute + comm):.2f} | {compute / max(compute, comm):.2f} | {padded * 1e3:.2f} |")
        lines.append("")
    lines += ["Links: " + "; ".join(f"{name}: {rate:.0f} GB/s" for name, rate in {**LINKS, **NETWORK}.items()),
              "(the first of each pair a stated peak, the second a measured all-to-all rate; rows pair them).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    out_dir = parser.parse_args().out
    out_dir.mkdir(parents=True, exist_ok=True)
    text = report()
    (out_dir / "expert_parallel_model.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
