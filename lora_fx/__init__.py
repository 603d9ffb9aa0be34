"""lora_fx: LoRA as a compiler pass over torch.fx graphs.

    adapted = lora_fx.adapt(model, rules=[lora_fx.Rule(name="q|v", r=8)], example_inputs=(x,))
    ...train lora_fx.lora_parameters(adapted)...   (or lora_fx.checkpoint_layers(adapted) to keep fewer activations)
    merged = lora_fx.fold(adapted)
    lora_fx.export_onnx(merged, "merged.onnx", example_inputs=(x,))
    lora_fx.verify_onnx("base.onnx", "merged.onnx").identical
"""

from lora_fx.adapted import capture_info
from lora_fx.api import (active_adapters, adapt, add_adapter, checkpoint_layers, disable_adapters, fold, graph,
                         lora_parameters, lora_state_dict, merge_adapter, plan, set_adapter, split_layers,
                         trainable_parameters, unmerge_adapter)
from lora_fx.errors import (AdapterFileError, ExportError, FoldError, InputError, LoraFxError, NoSitesError,
                            NotAdaptedError, RuleError, TraceError, VerifyError)
from lora_fx.lora import LoraLinear
from lora_fx.plan import Plan
from lora_fx.rules import Rule
from lora_fx.site import Site

__version__ = "0.1.0"


def __getattr__(name):
    # The ONNX side loads onnx/onnxscript/onnxruntime only when first used.
    import importlib

    onnx_side = importlib.import_module("lora_fx.onnx")  # not `from lora_fx import onnx`: that asks this __getattr__
    if name in onnx_side._HOMES:
        return getattr(onnx_side, name)
    if name in ("save_adapter", "load_adapter", "adapt_from_adapter", "LoadReport"):
        from lora_fx import adapter_file
        return getattr(adapter_file, name)
    if name in ("load_peft_adapter", "save_peft_adapter"):
        from lora_fx import peft_compat
        return getattr(peft_compat, name)
    if name in ("quantize_base", "compare_folds", "QuantizeReport", "FoldComparison"):
        from lora_fx import quantize
        return getattr(quantize, name)
    if name in ("train", "prepare_mixed_precision"):
        from lora_fx import training
        return getattr(training, name)
    raise AttributeError(f"module 'lora_fx' has no attribute {name!r}")


__all__ = ["adapt", "fold", "graph", "capture_info", "trainable_parameters", "NotAdaptedError", "add_adapter", "set_adapter", "active_adapters", "disable_adapters", "merge_adapter",
           "unmerge_adapter", "lora_parameters", "lora_state_dict", "plan", "Rule", "Site", "Plan", "LoraLinear",
           "export_onnx", "verify_onnx", "check_parity", "ort_session", "run_onnx", "LoraFxError", "InputError",
           "TraceError", "RuleError", "NoSitesError", "FoldError", "ExportError", "VerifyError", "AdapterFileError",
           "save_adapter", "load_adapter", "adapt_from_adapter", "LoadReport", "load_peft_adapter", "save_peft_adapter",
           "train", "prepare_mixed_precision", "fold_onnx", "FoldOnnxReport", "checkpoint_layers",
           "split_layers", "generate_onnx", "write_genai_config", "quantize_base", "compare_folds"]
