"""A *site* is one call of a linear-like op on a parameter: a place where LoRA can go.

The match pass describes every site the same way whatever front end made the graph (symbolic tracing gives
`call_module` nn.Linear nodes, torch.export gives `aten.linear` / `aten.addmm` nodes), so rules never need to
know which front end ran.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# What op a site is. Rules select on these names (Rule(op=...)); lora_fx.site_kinds groups them into kinds of site
# (linear, conv, embedding, experts), each with its own LoRA math. The experts ops name how a 3-D expert weight
# is read (lora_fx.passes.match_experts).
OP_KINDS = ("linear_module", "functional_linear", "matmul", "conv1d", "conv", "embedding", "grouped", "x_first",
            "w_first")

# How the weight is stored: nn.Linear keeps (out, in); GPT-2's Conv1D and `x @ W` keep (in, out).
OUT_IN, IN_OUT = "out_in", "in_out"


@dataclass(frozen=True)
class Site:
    node: str  # name of the FX node that calls the op
    op: str  # one of OP_KINDS
    weight: str  # qualified name of the weight parameter, e.g. "layers.0.attn.q.weight"
    module: str  # qualified name of the module that owns the weight ("" for the root module)
    module_type: str  # class name of that module, e.g. "Linear", "Conv1D"
    in_features: int  # in features; a convolution's in channels; an embedding's table size
    out_features: int  # out features; out channels; the embedding dim
    weight_layout: str  # OUT_IN or IN_OUT
    has_bias: bool
    input_arg: int | str  # which argument of the node is the activation x: its position, or its keyword
    layer: int | None = None  # the i in "layers.<i>." (or h.<i>, blocks.<i>, ...), if any
    roles: tuple[str, ...] = field(default=())  # graph roles such as "attn.q", filled by the roles pass
    # packed weights only (GPT-2's c_attn, MultiheadAttention's in_proj_weight, a fused qkv): per role, the rows of the
    # weight (output features) it computes, as (role, ((start, end), ...)) pairs; filled by the roles pass
    role_rows: tuple[tuple[str, tuple[tuple[int, int], ...]], ...] = field(default=())
    # a site feeding several of q/k/v whose rows could not be followed: why (the roles pass never guesses rows)
    rows_lost: str = ""
    # nodes that read the weight other than as a linear site's weight (an nn.Embedding sharing its table with an
    # output projection under one name): fold would change what they compute too
    other_readers: tuple[str, ...] = field(default=())
    # when the op reads a row slice of the parameter (nn.MultiheadAttention's cross-attention splits in_proj_weight
    # into q and kv before F.linear): the (start, end) rows of the parameter it reads; out_features is end - start
    weight_rows: tuple[int, int] | None = None
    # what the kind of site needs beyond the shapes, as (name, value) pairs: a convolution's kernel_size, stride,
    # padding, dilation and groups; an embedding's padding_idx (lora_fx.site_kinds)
    params: tuple[tuple[str, object], ...] = field(default=())

    def param(self, name: str, default: object = None) -> object:
        return dict(self.params).get(name, default)

    @property
    def name(self) -> str:
        """The name users see: the owning module's name, or the parameter's for a bare parameter or an expert
        weight (a module holds several: gate_up_proj and down_proj)."""
        return self.weight if self.param("num_experts") is not None else self.module or self.weight

    def to_dict(self) -> dict:
        return asdict(self)
