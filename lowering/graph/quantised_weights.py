"""Quantised expert weights into ``moe_ops.fused_experts`` as they are stored: int8 / fp8 values and scales.

torchao's per-row weight-only tensors (``Float8WeightOnlyConfig``, ``Int8WeightOnlyConfig``; quantised with
``moe_ops.experts_quantization_config``) hold an expert weight as int8 or fp8 e4m3 values ``Q`` (E, N, K) and
an fp32 scale per expert and output row ``S`` (E, N, 1). Traced, their ``_grouped_mm`` dequantises the whole
weight first, so the graph the experts rewrite leaves reads a dequantised copy::

    W = convert(mul(convert(Q', float32), S'), x.dtype)         Q', S' = Q, S (layout "EFH")
                                                                      or their (0, 2, 1) permutes ("EHF")
    fused_experts(x, ..., W_gate_up, W_down, ..., layout)

which Inductor materialises on every call: E x N x K elements in x's dtype per projection, the bytes that
quantising saved. This pass hands the op ``Q`` and ``S`` instead (layout "EFH": a stored row is an output
feature, the one a per-row scale multiplies) and the dequantisation dies with its last reader: the kernels
read the low-precision values and scale each accumulated column (moe_ops.expert_gemm's docstring).

**What is the same.** Per output column n, ``sum_k x[k] (Q[n, k] S[n])`` and ``S[n] sum_k x[k] Q[n, k]`` are
one value up to rounding: the graph rounds each dequantised weight to x's dtype before the GEMM, the kernel
accumulates the exact products in fp32 and scales after. A NaN in Q or S reaches every output it reached
before, as NaN; an infinite scale does too, but where the graph's 0 x inf (or inf - inf) made NaN the kernel's
inf x sum gives +-inf (docs/index.md, Quantised experts). The rewrite fires only where every projection of
the block is such a chain (a block with one plain weight is left as it is), the chains have no other reader (a
training graph that saves the dequantised weight for its backward keeps it), and the op accepts the result
(``check_fused_args``).
"""

from __future__ import annotations

import logging

import torch
from torch.fx import Graph, Node

from moe_ops._checks import ONE_PER_BYTE_WEIGHT_DTYPES
from moe_ops._compat.dynamo import counters
from moe_ops.fused_experts import check_fused_args
from moe_ops.lowering.graph.fx_match import aten, is_call, new_node, prims, val

log = logging.getLogger("moe_ops")

_FUSED = torch.ops.moe_ops.fused_experts.default
_TRANSPOSE = [0, 2, 1]
# fused_experts' positional arguments, by name from its schema: the three weights, the layout, and the
# scales, which follow every argument without a default.
_ARGUMENTS = [argument.name for argument in _FUSED._schema.arguments]
_W_GATE_UP, _W_DOWN, _W_UP, _LAYOUT = (_ARGUMENTS.index(name) for name in ("w_gate_up", "w_down", "w_up", "layout"))
_NUM_PLAIN_ARGS = _ARGUMENTS.index("w_gate_up_scale")
_CHECKED = [i for i, name in enumerate(_ARGUMENTS) if name not in ("alpha", "limit")]  # check_fused_args' order


def _only_reader(node: Node, reader: Node) -> bool:
    return list(node.users) == [reader]


def _stored(node: Node, layout: str) -> Node | None:
    """The stored tensor ``node`` reads: itself ("EFH"), or the tensor it is the (0, 2, 1) permute of ("EHF")."""
    if layout == "EFH":
        return node
    if is_call(node, aten.permute.default) and list(node.args[1]) == _TRANSPOSE:
        return node.args[0]
    return None


def _dequantised(weight: Node, layout: str, dtype: torch.dtype, reader: Node) -> tuple[Node, Node] | str:
    """(Q, S) where ``weight`` is the dequantisation of per-row quantised values (module docstring), read by
    ``reader`` alone; else why not."""
    chain = weight
    if is_call(chain, prims.convert_element_type.default):
        if chain.args[1] != dtype or not _only_reader(chain, reader):
            return f"{weight.name} is not a dequantisation into x's dtype read by the op alone"
        reader, chain = chain, chain.args[0]
    if not (is_call(chain, aten.mul.Tensor) and _only_reader(chain, reader)
            and val(chain) is not None and val(chain).dtype == torch.float32):
        return f"{weight.name} is not a product of fp32 values and scales"
    for values, scales in (chain.args, reversed(chain.args)):
        if not (is_call(values, prims.convert_element_type.default) and values.args[1] == torch.float32
                and _only_reader(values, chain)):
            continue
        q, s = _stored(values.args[0], layout), _stored(scales, layout)
        if q is None or s is None or val(q) is None or val(s) is None:
            continue
        q_val, s_val = val(q), val(s)
        if (q_val.dtype in ONE_PER_BYTE_WEIGHT_DTYPES and q_val.dim() == 3 and s_val.dtype == torch.float32
                and tuple(s_val.shape) == (*q_val.shape[:2], 1)):
            return q, s
    return f"{weight.name} is not int8 / fp8 values times an fp32 scale per expert and output row"


def rewrite_quantised_weights(graph: Graph) -> int:
    """Give every ``moe_ops.fused_experts`` whose expert weights are all per-row dequantisations their stored
    values and scales (module docstring); returns how many calls changed."""
    rewritten = 0
    for node in list(graph.nodes):
        if not is_call(node, _FUSED) or len(node.args) != _NUM_PLAIN_ARGS or node.kwargs:
            continue
        x, layout = node.args[0], node.args[_LAYOUT]
        if val(x) is None:
            continue
        positions = [p for p in (_W_GATE_UP, _W_DOWN, _W_UP) if node.args[p] is not None]
        found = [_dequantised(node.args[p], layout, val(x).dtype, node) for p in positions]
        if all(isinstance(f, str) for f in found):
            continue  # no quantised weight: nothing to say
        reasons = [f for f in found if isinstance(f, str)]
        if reasons:
            log.debug("quantised expert weights left dequantised at %s: %s", node.name, "; ".join(reasons))
            continue
        args = list(node.args)
        scales = {}
        with graph.inserting_before(node):
            for position, (q, s) in zip(positions, found, strict=True):
                args[position] = q
                scales[position] = new_node(graph, aten.squeeze.dim, (s, -1))
        args[_LAYOUT] = "EFH"
        args += [scales.get(position) for position in (_W_GATE_UP, _W_UP, _W_DOWN)]  # the schema's scale order
        # The rest as the schema's defaults: no zero points (torchao's weight-only tensors are symmetric), inputs
        # not quantised.
        args += [argument.default_value for argument in _FUSED._schema.arguments[len(args):]]
        try:
            check_fused_args(*(val(args[i]) if isinstance(args[i], Node) else args[i] for i in _CHECKED))
        except (TypeError, ValueError) as refusal:
            log.debug("quantised expert weights left dequantised at %s: the op refuses them: %s", node.name, refusal)
            for scale in scales.values():
                graph.erase_node(scale)
            continue
        node.args = tuple(args)
        counters["moe_ops"]["quantised_weights_rewrite"] += 1
        log.info("moe_ops.fused_experts at node %s reads its quantised expert weights as stored (%s values, "
                 "scales per output row)", node.name, str(val(found[0][0]).dtype).replace("torch.", ""))
        rewritten += 1
    return rewritten
