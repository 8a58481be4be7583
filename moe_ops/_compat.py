"""Everything that differs between the torch versions moe_ops supports (2.11 on GPU, 2.13 on CPU),
or that reaches into torch internals, lives here."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def autograd_inside_custom_op():
    """Record autograd inside a custom op's implementation.

    The dispatcher runs a custom op's kernel below the Autograd key (its TLS exclude set holds the
    autograd functionality), so ``torch.enable_grad()`` alone records nothing there. The backward
    ops of moe_ops differentiate the reference, so they lift that exclusion for their body.
    """
    excluded = torch._C._dispatch_tls_local_exclude_set()
    included = torch._C._dispatch_tls_local_include_set()
    with torch._C._ForceDispatchKeyGuard(included, excluded.remove(torch._C.DispatchKey.AutogradFunctionality)):
        with torch.enable_grad():
            yield


def fp32_matmul_allows_tf32() -> bool:
    """Whether the user lets fp32 matmuls round their inputs to tf32 (moe_ops follows torch's setting:
    ``torch.backends.cuda.matmul.fp32_precision`` since 2.9, ``allow_tf32`` before; off by default)."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if precision != "none":
        return precision == "tf32"
    return bool(torch.backends.cuda.matmul.allow_tf32)
