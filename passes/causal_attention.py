"""Causal-attention pass: give attention its flash kernel back in torch.export graphs; fold undoes it.

Under torch.export, transformers cannot see that its attention mask is plain causal (it is tracing, so it may not
look at values), and builds the mask as a tensor: every SDPA call gets attn_mask=<B,1,S,S bool>. A materialized
mask rules out the flash kernel, which doubled attention's backward time in the H200 profile
(docs/benchmarks.md). HF models run eagerly call SDPA with is_causal=True instead.

This pass rewrites such a call to `causal_or_masked(q, k, v, mask, ...)`, which runs SDPA with is_causal=True
and no mask while the mask's sizes are within what was checked, and the original masked call otherwise. A call
is rewritten only when both hold:

* the mask is computed from tensor *shapes* only: no input's values reach it (an attention_mask with padding,
  position_ids of packed sequences would), so for given sizes it is one fixed tensor;
* that tensor equals the causal pattern (query i sees keys j <= i) at the example inputs' sizes and at twice
  them (a sliding window shorter than that shows up as "not causal" and the call is left alone).

The mask's nodes stay in the graph (they feed the masked branch), so `fold` restores each call exactly and the
folded graph is the traced one node for node.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from lora_fx.passes.infra import PassResult, clone_graph_module, keep_call, restore_calls

SDPA = torch.ops.aten.scaled_dot_product_attention.default
META_KEY = "lora_fx_causal"  # node.meta key holding the original call, for restore_attention
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")


def causal_or_masked(query, key, value, attn_mask, sizes, limits, dropout_p=0.0, scale=None, enable_gqa=False):
    """SDPA with is_causal=True while every size is within its checked limit, else the original masked SDPA."""
    if all(s <= limit for s, limit in zip(sizes, limits)):
        return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout_p, is_causal=True, scale=scale,
                                              enable_gqa=enable_gqa)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale,
                                          enable_gqa=enable_gqa)


def _call(node: fx.Node) -> dict[str, Any]:
    """An SDPA node's arguments by name."""
    named = dict(zip(_SDPA_ARGS, node.args))
    named.update(node.kwargs)
    return named


def _ancestors(node: fx.Node) -> list[fx.Node]:
    seen, stack = {}, [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen[n] = None
            stack.extend(n.all_input_nodes)
    return list(seen)


def _shape_only(nodes: list[fx.Node]) -> tuple[list[fx.Node], list[fx.Node]] | None:
    """(placeholders read, their sym_size nodes) when the mask depends on inputs only through their sizes; else None."""
    placeholders, sizes, inside = [], [], set(nodes)
    for n in nodes:
        if n.op == "placeholder":
            if any(u.target is not torch.ops.aten.sym_size.int for u in n.users if u in inside):
                return None  # an input's values reach the mask (a padding mask, position ids, ...)
            placeholders.append(n)
        elif n.target is torch.ops.aten.sym_size.int:
            sizes.append(n)
    return placeholders, sizes


def _mask_function(gm: fx.GraphModule, mask: fx.Node, nodes: list[fx.Node], sizes: list[fx.Node]) -> fx.GraphModule:
    """A GraphModule computing `mask` and the `sizes` it depends on from the placeholders it reads (only their
    shapes matter)."""
    graph, env, inside = fx.Graph(), {}, set(nodes)
    for n in gm.graph.nodes:  # graph order, so every node's inputs are copied before it
        if n in inside:
            env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output((env[mask], *[env[n] for n in sizes]))
    return fx.GraphModule(gm, graph)


def _is_causal(mask: torch.Tensor) -> bool:
    """True when mask (bool: True = attend; float: 0 = attend, very negative = not) is the causal pattern."""
    if mask.dim() < 2 or mask.shape[-1] != mask.shape[-2]:
        return False
    n = mask.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
    if mask.dtype == torch.bool:
        return bool((mask == causal).all())
    if not mask.is_floating_point():
        return False
    blocked = mask <= torch.finfo(mask.dtype).min / 2
    return bool(((mask == 0) == causal).all() and (blocked == ~causal).all())


def _checked(fn: fx.GraphModule, placeholders: list[fx.Node]) -> list[int] | None:
    """Evaluate the mask at the example sizes and at twice them; the sizes it was checked at, or None."""
    limits = None
    for factor in (1, 2):
        inputs = []
        for p in placeholders:
            val = p.meta.get("val")
            if not isinstance(val, torch.Tensor):
                return None
            shape = [int(d) * factor if int(d) > 1 else int(d) for d in val.shape]
            inputs.append(torch.empty(shape, dtype=val.dtype, device="meta"))  # only the shape is read
        try:
            with torch.no_grad():
                mask, *sizes = fn(*inputs)
        except Exception:
            return None
        if not isinstance(mask, torch.Tensor) or mask.is_meta or not _is_causal(mask):
            return None
        limits = [int(s) for s in sizes]
    return limits


def use_causal_attention(gm: fx.GraphModule) -> PassResult:
    """Rewrite SDPA calls whose mask is provably causal to `causal_or_masked` (see the module docstring)."""
    changes = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not SDPA:
            continue
        call = _call(node)
        mask = call.get("attn_mask")
        if not isinstance(mask, fx.Node) or call.get("is_causal"):
            continue
        nodes = _ancestors(mask)
        found = _shape_only(nodes)
        if found is None:
            continue
        placeholders, size_nodes = found
        limits = _checked(_mask_function(gm, mask, nodes, size_nodes), placeholders)
        if limits is None:
            continue
        keep_call(node, META_KEY)
        node.target = causal_or_masked
        node.args = (call["query"], call["key"], call["value"], mask, tuple(size_nodes), tuple(limits))
        node.kwargs = {k: call[k] for k in ("dropout_p", "scale", "enable_gqa") if k in call}
        changes.append(f"{node.name}: causal mask -> is_causal=True (checked up to sizes {limits})")
    if changes:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, bool(changes), changes)


def restore_attention(graph: fx.Graph) -> int:
    """Put back every SDPA call use_causal_attention rewrote; returns how many."""
    return restore_calls(graph, META_KEY)


def with_masked_attention(module: torch.nn.Module) -> torch.nn.Module:
    """`module` itself, or, when use_causal_attention rewrote calls in it, a copy with the masked calls back
    (sharing every tensor; the module is unchanged)."""
    if not isinstance(module, fx.GraphModule) or not any(META_KEY in n.meta for n in module.graph.nodes):
        return module
    copy = clone_graph_module(module)
    restore_attention(copy.graph)
    copy.recompile()
    return copy
