"""lora_fx's compiler passes over torch.fx graphs, one file a pass.

    trace   model            -> GraphModule      (symbolic tracing, or torch.export when that fails)
    match   GraphModule      -> [Site]           (every linear-like call on a parameter)
    roles   GraphModule      -> {node: roles}    (q/k/v/out/mlp found from the graph's structure)
    inject  GraphModule      -> GraphModule      (a LoRA branch beside each chosen site)
    fold    GraphModule      -> GraphModule      (B·A folded into W0, every LoRA node removed)

Each pass takes a GraphModule and returns a result that says what it changed (as torch.fx.passes.infra does).
Installed as `lora_fx.passes`.
"""
