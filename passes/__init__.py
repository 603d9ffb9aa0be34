"""lora_fx's compiler passes over torch.fx graphs, one file a pass, in pipeline order.

    trace             model, call       -> GraphModule        symbolic tracing, or torch.export when that fails
    match             GraphModule       -> [Site]             every linear-like call on a parameter (site kinds)
    match_experts     GraphModule       -> [Site]             3-D expert weights: grouped matmul, W[e] slices, bmm
    roles             [Site]            -> [Site] with roles  q/k/v/out/mlp found from the graph's structure
    packed_rows       packed weight     -> rows per role      a fused qkv's row ranges, or why they were lost
    inject            GraphModule       -> GraphModule        a LoRA branch and an add beside each chosen site
    causal_attention  GraphModule       -> GraphModule        SDPA with a provably causal mask runs is_causal=True
    quantize_base     GraphModule       -> GraphModule        reads of an NF4/FP8 frozen weight -> its quantized
                                                              matmul (opt-in: lora_fx.quantize_base)
    capture           a new call        -> key, GraphModule   calls of the adapted model traced through these passes
    split_layers      GraphModule       -> layer view         one submodule per layer (checkpointing, FSDP2)
    fold              GraphModule       -> GraphModule        W0 + (alpha/r)·B·A, every LoRA node removed
    onnx_fold         ONNX model        -> ONNX model         the same fold on an unmerged ONNX export, by the rule
                                                              of onnx_fold_rule (onnxscript); onnx_fx_names renames
                                                              constants the exporter named after removed FX nodes

    infra             what the passes share: PassResult, graph signatures, module cloning, frozen norms

lora_fx/api.py (`adapt_model`) runs them in this order; docs/architecture.md draws the pipeline. Each pass takes a
GraphModule and returns a result that says what it changed (as torch.fx.passes.infra does). Installed as
`lora_fx.passes`.
"""
