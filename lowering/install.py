"""Turning the moe_ops rewrites on and off, and installing them where Inductor and transformers look.

``enable()`` sets ``moe_ops.config.rewrites`` and arranges the installation for when it can happen
without cost: the passes go into Inductor's hooks once ``torch._inductor.config`` is imported (now, if
it already is; else by torch.compile, which imports it), and the transformers experts implementations are
registered once transformers is imported. So ``import moe_ops`` imports neither Inductor nor
transformers (each import of the heavy modules below is inside the function that runs at that moment).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import sys
from collections.abc import Iterator

from moe_ops._compat.imports import when_imported
from moe_ops.settings import config

log = logging.getLogger("moe_ops")
# transformers' modeling modules that define the classes of hf_experts.OWN_LOOP_EXPERTS and OWN_BLOCKS.
OWN_CODE_MODELING = tuple(f"transformers.models.{family}.modeling_{family}"
                          for family in ("longcat_flash", "step3p7", "dbrx", "jetmoe", "aria"))


def enable() -> None:
    """Turn the rewrites on and make sure the moe_ops pass is installed (idempotent).

    The passes go into ``torch._inductor.config.post_grad_custom_post_pass`` (inference graphs),
    ``joint_custom_post_pass`` (training graphs) and ``pre_grad_custom_pass`` (a look at dynamo's graph for
    code that alters gradients, for the training pass). A pass already in a hook is kept: the moe_ops
    pass runs it first, then its own rewrites. A pass set there *after* ``enable()`` replaces the
    moe_ops pass; call ``enable()`` again to chain it.

    When transformers is imported (now, if it already is), the "moe_ops", "moe_ops_ep" and "eager" experts
    implementations are registered in its ``ALL_EXPERTS_FUNCTIONS`` (see ``moe_ops.lowering.hf_experts``),
    so a model built after that finds them.
    """
    config.rewrites = True
    when_imported("torch._inductor.config", _install_passes)
    when_imported("transformers", _register_transformers_experts)
    when_imported("transformers.integrations.finegrained_fp8", _register_transformers_fp8_experts)
    for module in OWN_CODE_MODELING:
        when_imported(module, _register_transformers_own_code(module))


def _install_passes() -> None:
    # Runs right after torch._inductor.config has been imported. Where one of moe_ops' own Inductor-facing
    # modules started that import, it is half-initialised now and the passes cannot be imported; those
    # modules are imported only after Inductor's config (by this function), so this is a misuse: logged.
    for name in ("moe_ops._compat.inductor_hooks", "moe_ops.lowering.passes"):
        module = sys.modules.get(name)
        if module is not None and getattr(module.__spec__, "_initializing", False):
            log.warning("moe_ops passes not installed: %s was imported before torch._inductor.config", name)
            return
    from moe_ops._compat.inductor_hooks import loaded_inductor_config, set_hook_for_every_thread
    from moe_ops.lowering.passes import PASSES

    inductor_config = loaded_inductor_config()
    for moe_ops_pass in PASSES:
        installed = getattr(inductor_config, moe_ops_pass.hook)
        if not isinstance(installed, moe_ops_pass):
            set_hook_for_every_thread(inductor_config, moe_ops_pass.hook, moe_ops_pass(previous=installed))


def _register_transformers_experts() -> None:
    # As soon as transformers is imported, not on first use: a model built after that must find "moe_ops"
    # among the experts implementations that transformers validates its config against. hf_experts registers
    # them when it is imported, so importing it is all there is to do; where its own imports were transformers'
    # first (moe_ops.quantise_experts, say), it is half-run now, import_module returns it as it is, and it
    # registers when it reaches its end.
    try:
        importlib.import_module("moe_ops.lowering.hf_experts")
    except ImportError as error:  # a transformers without use_experts_implementation (< 5), or a broken install
        log.debug("transformers experts implementations not registered: %s", error)


@functools.cache
def _register_transformers_own_code(module_name: str):
    # Experts classes and MoE blocks without an experts interface: their forward is wrapped when their modeling
    # module is imported (building the model imports it). One callback per module (cached: when_imported keeps it
    # once).
    def register() -> None:
        try:
            from moe_ops.lowering.hf_experts import register_own_code
        except ImportError as error:
            log.debug("MoE code of %s not wrapped: %s", module_name, error)
            return
        register_own_code(sys.modules[module_name])

    return register


def _register_transformers_fp8_experts() -> None:
    # transformers imports its fine-grained FP8 integration when it loads an FP8 model (or the user does):
    # registering then costs ``import moe_ops`` nothing.
    try:
        from moe_ops.lowering.hf_experts import register_fp8_experts_implementations
    except ImportError as error:
        log.debug("transformers FP8 experts implementations not registered: %s", error)
        return
    register_fp8_experts_implementations()


def disable() -> None:
    """Turn the rewrites off; the installed pass then only runs the pass it chains, if any."""
    config.rewrites = False


@contextlib.contextmanager
def rewrites_disabled() -> Iterator[None]:
    """Compile without the moe_ops rewrites inside the block; the previous setting comes back after."""
    saved = config.rewrites
    config.rewrites = False
    try:
        yield
    finally:
        config.rewrites = saved
