"""The `lora-fx` command line: plan, export, verify, fold-onnx, generate.

    lora-fx plan MODEL [--rules rules.toml] [--json] [--input-shape 2,16 | --input-ids 2,16]
    lora-fx export MODEL --adapter DIR --out merged.onnx [--base-out base.onnx] [--fp16] [--dynamic] [--kv-cache]
                   [--parity]
    lora-fx verify A.onnx B.onnx
    lora-fx fold-onnx unmerged.onnx --out merged.onnx [--base base.onnx]
    lora-fx generate merged.onnx --prompt-ids 1,2,3 [--prompt-ids 4,5] [--max-new-tokens 20] [--sample ...]

MODEL is `package.module:function` (a factory returning a model, or (model, example_inputs[, example_kwargs])) or a
transformers config/model folder on disk (config.json, with or without weights).

Exit status: 0 success (for verify and export: the two ONNX graphs are identical); 1 the command ran and failed or
found a difference; 2 the command line is wrong. Errors are printed as `error: ...` and `hint: ...` on stderr;
--verbose adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import inspect
import json
import os
import pathlib
import shutil
import sys
import tempfile
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
PROG = "lora-fx"

#: files that mark a transformers folder as holding weights (else the model is built from its config)
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class CliError(Exception):
    """A failure the command line reports as `error: message` / `hint: hint`, exiting with `code`."""

    def __init__(self, message: str, hint: str | None = None, code: int = EXIT_FAILED):
        super().__init__(message)
        self.message, self.hint, self.code = message, hint, code


# ------------------------------------------------------------------------------------------------ argument parsing
class _Parser(argparse.ArgumentParser):
    """argparse with errors in the CLI's own format (`error:` + `hint:`, exit 2) and no sys.exit on bad input."""

    def error(self, message: str):  # noqa: D401 (argparse's name)
        raise CliError(message, hint=f"see '{self.prog} --help'", code=EXIT_USAGE)


def _ids(text: str) -> list[int]:
    """'1,2,3' -> [1, 2, 3] (token ids: non-negative integers)."""
    try:
        ids = [int(p) for p in text.split(",") if p.strip() != ""]
    except ValueError:
        ids = []
    if not ids or any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of token ids: write non-negative integers "
                                         f"separated by commas, e.g. 1,2,3")
    return ids


def _shape(text: str) -> tuple[int, ...]:
    """'2,16' or '2x16' -> (2, 16)."""
    parts = text.replace("x", ",").replace("X", ",").split(",")
    try:
        dims = tuple(int(p) for p in parts if p.strip() != "")
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape: write positive sizes separated by commas, "
                                         f"e.g. 2,16")
    return dims


EPILOG = """\
MODEL is either
  package.module:function   a function returning a model, or (model, example_inputs[, example_kwargs]);
                            the current folder is importable (after the installed packages)
  path/to/folder            a transformers model folder: loaded from the weights saved there; a folder with
                            config.json only (or weights that miss tensors) needs --random-weights for export
                            (plan builds it from the config, seeded); use_cache=False

exit status: 0 success, 1 failure (or, for verify/export, ONNX graphs that differ), 2 bad command line

examples:
  lora-fx plan mypkg.models:tiny_gpt --rules lora.toml
  lora-fx plan ./tiny-llama --input-ids 2,16 --json
  lora-fx export mypkg.models:tiny_gpt --adapter run/adapter --out merged.onnx --base-out base.onnx
  lora-fx verify base.onnx merged.onnx
  lora-fx fold-onnx unmerged.onnx --out merged.onnx --base base.onnx
  lora-fx export ./tiny-llama --adapter run/adapter --out merged.onnx --kv-cache
  lora-fx generate merged.onnx --prompt-ids 1,2,3 --max-new-tokens 16
"""


def build_parser() -> argparse.ArgumentParser:
    from lora_fx import __version__

    parser = _Parser(prog=PROG, description="LoRA as a compiler pass over torch.fx graphs: plan, export, verify.",
                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", default=False,
                        help="print the full traceback of an error, and every warning")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def command(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=description,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        # default=SUPPRESS: `lora-fx --verbose plan ...` and `lora-fx plan ... --verbose` both work
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="print the full traceback of an error, and every warning")
        return p

    def model_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", metavar="MODEL", help="package.module:function, or a transformers config/model folder")
        inputs = p.add_mutually_exclusive_group()
        inputs.add_argument("--input-shape", type=_shape, metavar="2,16",
                            help="example input: one float tensor of this shape (torch.randn, seeded)")
        inputs.add_argument("--input-ids", type=_shape, metavar="2,16",
                            help="example input: token ids of this shape (below the model's vocab_size, seeded); "
                                 "default for transformers language models: 2,16")
        p.add_argument("--frontend", choices=("auto", "fx", "export"), default=None,
                       help="how to trace the model (default: auto for plan, the adapter's own for export)")

    p = command("plan", "dry run: which sites get LoRA, by which rule, and the parameters added",
                "Trace MODEL, match every linear-like site and apply the rules without changing anything;\n"
                "print one row per site (name, op, shape, roles, deciding rule, r, alpha, parameters).")
    model_arguments(p)
    p.add_argument("--rules", metavar="FILE", help="a rules file (.toml or .json; see docs/rules.md); "
                                                    "default: every linear-like site")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    p.set_defaults(run=cmd_plan)

    p = command("export", "adapt MODEL from an adapter, fold, export base and merged ONNX, verify they are identical",
                "Adapt MODEL as the adapter folder says (a lora_fx adapter from lora_fx.adapter_file.save_adapter,\n"
                "or a PEFT LoRA folder), load its weights, fold them into the base weights, export the base model and\n"
                "the merged model to ONNX with the same settings and print the verification report.\n"
                "Exit status 0 only when the two graphs are identical.")
    model_arguments(p)
    p.add_argument("--adapter", required=True, metavar="DIR", help="adapter folder (lora_fx or PEFT)")
    p.add_argument("--random-weights", action="store_true",
                   help="accept a transformers folder without (all) weights: random, seeded values for those "
                        "missing (default: an error)")
    p.add_argument("--out", required=True, metavar="merged.onnx", help="where to write the merged model")
    p.add_argument("--base-out", metavar="base.onnx", help="also keep the base model's export here "
                                                           "(default: a temporary file)")
    p.add_argument("--fp16", action="store_true", help="export float16 copies of both models")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch and sequence dims (the first two of "
                                                          "every input)")
    p.add_argument("--kv-cache", action="store_true",
                   help="decoder LMs: the KV cache as inputs and outputs (past_key_values.N.key/value -> "
                        "present.N.key/value), one file for the prompt and each new token, every size dynamic; "
                        "serve it with `lora-fx generate`")
    p.add_argument("--parity", action="store_true", help="also run merged.onnx on ONNX Runtime against the folded "
                                                         "PyTorch model (with --kv-cache: greedy tokens against "
                                                         "its generate)")
    p.set_defaults(run=cmd_export)

    p = command("verify", "compare two ONNX graphs: exit 0 only when they are identical",
                "Compare the structure of two ONNX files (ops, wiring, initializer names, dtypes and shapes; not\n"
                "weight values) and print the report. Exit status 0 when identical, 1 when different.")
    p.add_argument("a", metavar="A.onnx")
    p.add_argument("b", metavar="B.onnx")
    p.set_defaults(run=cmd_verify)

    p = command("fold-onnx", "fold the LoRA branches of an unmerged ONNX export into its weights",
                "Fold every LoRA branch of an ONNX file exported from an UNMERGED adapted model into its base\n"
                "weight, without PyTorch, and write the result. With --base, verify it against the base export.")
    p.add_argument("unmerged", metavar="unmerged.onnx")
    p.add_argument("--out", required=True, metavar="merged.onnx")
    p.add_argument("--base", metavar="base.onnx", help="verify the result against this base export")
    p.set_defaults(run=cmd_fold_onnx)

    p = command("generate", "generate tokens with a KV-cache ONNX file on ONNX Runtime",
                "Run the generation loop (lora_fx.generate_onnx) on a file exported with `lora-fx export\n"
                "--kv-cache` and print prompt + new token ids, one line per prompt. Several --prompt-ids make a\n"
                "batch, left-padded with --pad-id. Greedy unless --sample.")
    p.add_argument("onnx", metavar="merged.onnx")
    p.add_argument("--prompt-ids", type=_ids, action="append", required=True, metavar="1,2,3",
                   help="token ids of one prompt (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=20, metavar="N")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    p.add_argument("--eos-id", type=int, default=None,
                   help="stop a sequence at this token (default: the model's EOS, which the export wrote into the file)")
    p.add_argument("--pad-id", type=int, default=0, help="padding id (left padding, finished sequences)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.set_defaults(run=cmd_generate)
    return parser


# ------------------------------------------------------------------------------------------------ entry point
def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with `argv` (default: sys.argv[1:]) and return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv or "--verbose" in argv
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help / --version
            return e.code if isinstance(e.code, int) else EXIT_OK
        verbose = args.verbose
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        with _warnings_shown(verbose):
            return args.run(args)
    except KeyboardInterrupt:
        _print_error("interrupted", None)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `lora-fx plan ... | head`: the reader left; say nothing more
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except CliError as e:
        if verbose and e.code != EXIT_USAGE and (e.__cause__ or e.__context__):
            traceback.print_exc()
        _print_error(e.message, e.hint)
        return e.code
    except Exception as e:  # noqa: BLE001 (the one place every error becomes a message)
        from lora_fx.errors import LoraFxError

        if verbose:
            traceback.print_exc()
        if isinstance(e, LoraFxError):
            what = e.what if e.where is None else f"{e.what} (at {e.where})"
            hint = e.fix
            if hint and "example inputs do not" in e.what:
                hint += " (on the command line: --input-shape / --input-ids, or the factory's example inputs)"
            _print_error(what, hint or _verbose_hint(verbose))
        else:
            _print_error(f"{type(e).__name__}: {e}", _verbose_hint(verbose))
        return EXIT_FAILED


def _verbose_hint(verbose: bool) -> str | None:
    return None if verbose else "run again with --verbose for the traceback"


def _print_error(message: str, hint: str | None) -> None:
    lines = str(message).strip().splitlines() or ["(no message)"]
    print("error: " + "\n       ".join(lines), file=sys.stderr)
    if hint:
        print("hint: " + "\n      ".join(str(hint).strip().splitlines()), file=sys.stderr)


def _info(message: str) -> None:
    """Progress, on stderr (stdout holds the command's result)."""
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _warnings_shown(verbose: bool):
    """Warnings as one `warning: ...` line each; torch/transformers deprecation chatter only with --verbose."""
    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message).removeprefix("lora_fx: ")
        print(f"warning: {text}" + (f" [{category.__name__} at {filename}:{lineno}]" if verbose else ""),
              file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        if not verbose:
            for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
                warnings.simplefilter("ignore", category)
            warnings.filterwarnings("ignore", message=".*enable_nested_tensor.*")
        yield


# ------------------------------------------------------------------------------------------------ MODEL
@dataclass
class LoadedModel:
    model: Any
    args: tuple | None
    kwargs: dict = field(default_factory=dict)
    description: str = ""


def load_model(spec: str, input_shape: tuple[int, ...] | None = None,
               input_ids: tuple[int, ...] | None = None, random_weights: bool = False) -> LoadedModel:
    """The model MODEL names, with example inputs: --input-shape / --input-ids, else the factory's, else (for
    transformers language models) token ids of shape 2x16.

    random_weights: a transformers folder without weights, or whose weight files miss some of the model's tensors,
    is built with random (seeded) weights for those; without it that is an error, since exporting such a model
    silently ships weights nobody trained."""
    import torch

    path = pathlib.Path(spec).expanduser()
    if path.exists():
        loaded = _load_transformers(path, random_weights)
    elif ":" in spec:
        loaded = _load_factory(spec)
    else:
        raise CliError(f"MODEL {spec!r} is neither a folder on disk nor package.module:function",
                       hint="give a factory such as mypkg.models:make_model (a function returning a model or "
                            "(model, example_inputs)), or a folder holding a transformers config.json",
                       code=EXIT_USAGE)
    if input_shape is not None:
        torch.manual_seed(0)
        loaded.args = (torch.randn(*input_shape),)
    elif input_ids is not None:
        torch.manual_seed(0)
        loaded.args = (torch.randint(0, _vocab_size(loaded.model), input_ids),)
    return loaded


def _vocab_size(model: Any) -> int:
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None) or getattr(model, "vocab_size", None)
    if isinstance(vocab, int) and vocab > 0:
        return vocab
    import torch

    sizes = [m.num_embeddings for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    if sizes:
        return min(sizes)
    raise CliError(f"--input-ids needs the vocabulary size, and this {type(model).__name__} has no config.vocab_size "
                   f"nor nn.Embedding", hint="use --input-shape for float inputs, or return (model, example_inputs) "
                                             "from the factory", code=EXIT_USAGE)


def _load_factory(spec: str) -> LoadedModel:
    import torch

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise CliError(f"MODEL {spec!r} is not package.module:function", code=EXIT_USAGE,
                       hint="write the module and the function with a colon between, e.g. mypkg.models:make_model")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        # the factory's module may live in the current folder; after the installed packages, so that a stray
        # onnxscript.py or torch.py there never shadows what lora_fx imports
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise CliError(f"cannot import {module_name!r}: no module named {e.name!r}",
                           hint=f"check the spelling; the module must be installed or importable from the current "
                                f"folder ({cwd})") from e
        raise CliError(f"importing {module_name!r} failed: {type(e).__name__}: {e}",
                       hint=f"install {e.name!r}, which {module_name} imports") from e
    except Exception as e:
        raise CliError(f"importing {module_name!r} failed: {type(e).__name__}: {e}",
                       hint="run with --verbose for the traceback of the error in that module") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            near = difflib.get_close_matches(part, names, n=3, cutoff=0.5)
            functions = sorted(n for n in names if callable(getattr(obj, n, None))
                               and getattr(getattr(obj, n), "__module__", None) == module_name)
            raise CliError(f"{module_name} has no attribute {attr!r}",
                           hint=(f"did you mean {', '.join(module_name + ':' + n for n in near)}?" if near else
                                 f"name a function defined in {module_name}"
                                 + (f": {', '.join(functions[:10])}" if functions else "")))
        obj = getattr(obj, part)
    if isinstance(obj, torch.nn.Module):
        result = obj
    elif callable(obj):
        try:
            result = obj()
        except Exception as e:
            raise CliError(f"the factory {spec} failed: {type(e).__name__}: {e}",
                           hint="it is called without arguments; run with --verbose for the traceback") from e
    else:
        raise CliError(f"{spec} is a {type(obj).__name__}, not a function or a model",
                       hint="name a function returning a model or (model, example_inputs)")
    return _from_factory_result(spec, result)


def _from_factory_result(spec: str, result: Any) -> LoadedModel:
    import torch

    expected = "a model, or (model, example_inputs) or (model, example_inputs, example_kwargs)"
    if isinstance(result, torch.nn.Module):
        return LoadedModel(result, None, {}, f"{spec} ({type(result).__name__})")
    if isinstance(result, (tuple, list)) and 2 <= len(result) <= 3 and isinstance(result[0], torch.nn.Module):
        model, args = result[0], result[1]
        kwargs = result[2] if len(result) == 3 else {}
        if isinstance(args, torch.Tensor):
            args = (args,)
        if args is not None and not isinstance(args, (tuple, list)) or not isinstance(kwargs or {}, dict):
            raise CliError(f"the factory {spec} returned example inputs of type {type(args).__name__}",
                           hint=f"return {expected}; example_inputs a tensor or a tuple of them")
        return LoadedModel(model, None if args is None else tuple(args), dict(kwargs or {}),
                           f"{spec} ({type(model).__name__})")
    raise CliError(f"the factory {spec} returned {type(result).__name__}, not a model", hint=f"return {expected}")


def _load_transformers(path: pathlib.Path, random_weights: bool = False) -> LoadedModel:
    import torch

    folder = path if path.is_dir() else path.parent
    config_path = path if path.is_file() else path / "config.json"
    if not config_path.is_file():
        raise CliError(f"{path} is a folder without config.json", code=EXIT_USAGE,
                       hint="give a transformers model folder (config.json, e.g. from config.save_pretrained), or "
                            "package.module:function")
    try:
        import transformers
    except ImportError as e:
        raise CliError("a transformers folder needs the transformers package, which is not installed",
                       hint="pip install transformers") from e
    try:
        config = transformers.AutoConfig.from_pretrained(str(config_path if path.is_file() else folder),
                                                         local_files_only=True)
    except Exception as e:
        raise CliError(f"cannot read the transformers config {config_path}: {type(e).__name__}: {e}",
                       hint="check the file (it needs a model_type transformers knows)") from e
    if hasattr(config, "use_cache"):
        config.use_cache = False
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    weights = path.is_dir() and any((folder / name).is_file() for name in _HF_WEIGHTS)
    if not weights and not random_weights:
        raise CliError(f"{folder} holds no weights ({', '.join(_HF_WEIGHTS[:1] + _HF_WEIGHTS[2:3])}, ...): the model "
                       f"would be built with random weights", hint="save the trained model there "
                       "(model.save_pretrained), or pass --random-weights to build it from config.json with random "
                       "(seeded) weights on purpose")
    torch.manual_seed(0)
    # "Loading weights" bars and load notices of a local folder say nothing here; restored afterwards
    hf_logging = transformers.utils.logging
    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    missing = []
    try:
        if weights:
            model, info = (cls or transformers.AutoModel).from_pretrained(str(folder), config=config,
                                                                          local_files_only=True,
                                                                          output_loading_info=True)
            missing = sorted(info.get("missing_keys") or []) + sorted(
                str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or [])
        else:
            model = cls(config) if cls is not None else transformers.AutoModel.from_config(config)
    except Exception as e:
        raise CliError(f"cannot build the transformers model from {folder}: {type(e).__name__}: {e}",
                       hint="check config.json (architectures, model_type) and the weight files") from e
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if missing and not random_weights:
        raise CliError(f"the weight files in {folder} miss {len(missing)} of the model's tensors (e.g. "
                       f"{', '.join(missing[:3])}): they would be random", hint="save the whole model there "
                       "(model.save_pretrained), or pass --random-weights to accept random (seeded) values for them")
    model.eval()
    kwargs = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    args = None
    if getattr(model, "main_input_name", "input_ids") == "input_ids" and getattr(config, "vocab_size", None):
        torch.manual_seed(0)
        args = (torch.randint(0, config.vocab_size, (2, 16)),)
    source = ("weights" if not missing else f"weights, {len(missing)} tensor(s) random") if weights else \
        "config, random weights"
    return LoadedModel(model, args, kwargs, f"{folder} ({type(model).__name__}, from {source})")


def _need_inputs(loaded: LoadedModel, what: str) -> None:
    if loaded.args is None and not loaded.kwargs:
        raise CliError(f"{what} needs example inputs and MODEL gives none",
                       hint="add --input-shape 2,16 (float) or --input-ids 2,16 (token ids), or return "
                            "(model, example_inputs) from the factory", code=EXIT_USAGE)


def _describe_inputs(loaded: LoadedModel) -> str:
    import torch

    def one(value: Any) -> str:
        if isinstance(value, torch.Tensor):
            return f"{'x'.join(map(str, value.shape)) or 'scalar'} {str(value.dtype).removeprefix('torch.')}"
        return type(value).__name__

    parts = [one(a) for a in loaded.args or ()] + [f"{k}={v!r}" if not isinstance(v, torch.Tensor) else
                                                   f"{k}={one(v)}" for k, v in loaded.kwargs.items()]
    return ", ".join(parts) or "none"


# ------------------------------------------------------------------------------------------------ commands
def cmd_plan(args: argparse.Namespace) -> int:
    import lora_fx

    rules, defaults = None, {}
    if args.rules:
        from lora_fx.rules_file import load_rules

        rules, defaults = load_rules(args.rules)
    loaded = load_model(args.model, args.input_shape, args.input_ids, random_weights=True)  # a plan reads no weight
    plan = lora_fx.plan(loaded.model, rules, example_inputs=loaded.args, example_kwargs=loaded.kwargs or None,
                        frontend=args.frontend or "auto", **defaults)
    print(plan.to_json() if args.json else plan.table())
    return EXIT_OK



def _is_peft_folder(adapter: pathlib.Path) -> bool:
    """PEFT's save_pretrained wrote it: its weights (safetensors or the pickle the loader refuses, with the reason)
    or a config with peft_type. lora_fx's own folders have neither."""
    from lora_fx.peft_config import PEFT_WEIGHTS, PEFT_WEIGHTS_BIN

    if (adapter / PEFT_WEIGHTS).is_file() or (adapter / PEFT_WEIGHTS_BIN).exists():
        return True
    try:
        config = json.loads((adapter / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "peft_type" in config

def cmd_export(args: argparse.Namespace) -> int:
    import torch

    import lora_fx
    from lora_fx import quantize, state
    from lora_fx.adapter_file import adapt_from_adapter

    adapter = pathlib.Path(args.adapter)
    if not adapter.is_dir():
        raise CliError(("the adapter folder does not exist" if not adapter.exists() else
                        "the adapter path is not a folder") + f" (at {adapter})", hint="give the folder lora_fx.save_adapter (or PEFT's "
                                                                "save_pretrained) wrote")
    out = pathlib.Path(args.out)
    _check_outputs(out, pathlib.Path(args.base_out) if args.base_out else None)
    loaded = load_model(args.model, args.input_shape, args.input_ids, random_weights=args.random_weights)
    _need_inputs(loaded, "export")
    _info(f"model: {loaded.description}; example inputs: {_describe_inputs(loaded)}")
    kwargs = loaded.kwargs or None
    if _is_peft_folder(adapter):
        from lora_fx.peft_compat import load_peft_adapter

        adapted = load_peft_adapter(loaded.model, adapter, example_inputs=loaded.args, example_kwargs=kwargs,
                                    frontend=args.frontend or "auto")
        kind = "PEFT adapter"
    else:
        adapted = adapt_from_adapter(loaded.model, adapter, example_inputs=loaded.args, example_kwargs=kwargs,
                                     frontend=args.frontend)
        kind = "adapter"
    n = sum(1 for _ in adapted.lora_fx.values())
    _info(f"adapted with the {kind} {adapter}: {n} LoRA weight(s), front end "
          f"{lora_fx.capture_info(adapted)['frontend']}")
    record = quantize.adapter_record(state.adapted_state(adapted)[1])
    if record:
        _info(f"the adapter was trained against a {record['kind']} base: its {len(record['weights'])} weights "
              f"quantized again as then; fold into the {record['fold'] or 'dequantized'} weights")
    merged = lora_fx.fold(adapted)
    dtype = torch.float16 if args.fp16 else None
    with tempfile.TemporaryDirectory(prefix="lora-fx-") as staging:
        # the base export waits in a temporary folder until the merged one is written: a failed export leaves no
        # half of the pair behind (its external-data file, if any, keeps its name beside it)
        base_path = pathlib.Path(staging) / (pathlib.Path(args.base_out).name if args.base_out else "base.onnx")
        lora_fx.export_onnx(loaded.model, base_path, loaded.args or (), kwargs, dynamic=args.dynamic, dtype=dtype,
                            kv_cache=args.kv_cache)
        _info("exported the base model")
        lora_fx.export_onnx(merged, out, loaded.args or (), kwargs, dynamic=args.dynamic, dtype=dtype,
                            kv_cache=args.kv_cache)
        _info(f"exported the merged model -> {out}")
        report = lora_fx.verify_onnx(base_path, out)
        if args.base_out:
            target = pathlib.Path(args.base_out)
            for f in sorted(pathlib.Path(staging).iterdir(), key=lambda f: f == base_path):  # the .onnx last
                shutil.move(str(f), str(target if f == base_path else target.parent / f.name))
            base_path = target
            _info(f"kept the base model's export -> {target}")
    report.base_name = str(base_path) if args.base_out else "base (temporary file)"
    report.merged_name = str(out)
    print(report)
    if args.parity and args.kv_cache:
        _generate_parity(out, merged, loaded)
    elif args.parity:
        parity = lora_fx.check_parity(out, merged, loaded.args or (), kwargs)
        print(parity)
        if not parity.ok:
            raise CliError("ONNX Runtime's outputs differ from the folded PyTorch model's beyond the tolerances",
                           hint="see the table above; with --fp16 larger errors are expected")
    if not report.identical:
        raise CliError(f"the merged export's graph differs from the base export's ({len(report.differences)} "
                       f"difference(s) listed above)",
                       hint="folding must give back the original graph: report this as a lora_fx bug with the "
                            "differences above (the merged file was written so you can inspect it)")
    return EXIT_OK


def _check_outputs(out: pathlib.Path, base_out: pathlib.Path | None) -> None:
    """Refuse output paths that cannot be written before anything is exported (nothing half-written)."""
    for path, flag in ((out, "--out"), (base_out, "--base-out")):
        if path is None:
            continue
        if path.is_dir():
            raise CliError(f"{flag} {path} is a folder", hint="give a file path such as merged.onnx")
        if not path.parent.is_dir():
            raise CliError(f"the folder of {flag} {path} does not exist", hint=f"create {path.parent} first")
    if base_out is not None and base_out.resolve() == out.resolve():
        raise CliError(f"--out and --base-out are the same file ({out}): the base export would be overwritten and "
                       f"the merged file verified against itself", hint="give the base export its own path")


def _generate_parity(path: pathlib.Path, merged: Any, loaded: Any) -> None:
    """--kv-cache --parity: 8 greedy tokens from the file equal the merged PyTorch model's generate."""
    import torch

    import lora_fx

    ids = next((a for a in [*(loaded.args or ()), *(loaded.kwargs or {}).values()]
                if isinstance(a, torch.Tensor) and not a.dtype.is_floating_point), None)
    if ids is None:
        raise CliError("--parity with --kv-cache needs token ids as example input", hint="pass --input-ids 2,16")
    want = merged.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                           pad_token_id=0)
    got = lora_fx.generate_onnx(path, ids, max_new_tokens=8, pad_token_id=0)  # eos: the file's, as generate's
    same = want.shape == got.shape and bool(torch.equal(want, got))
    print(f"generate parity: {'OK' if same else 'FAILED'}: 8 greedy tokens for {ids.shape[0]} prompt(s) "
          f"{'equal' if same else 'differ from'} the folded PyTorch model's generate")
    if not same:
        raise CliError("the ONNX file generates other tokens than the folded PyTorch model",
                       hint="run lora_fx.generate_onnx and model.generate side by side on one prompt to find the "
                            "first step that differs; with --fp16 rounding can flip near-ties")


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    import lora_fx

    path = pathlib.Path(args.onnx)
    if not path.is_file():
        raise CliError(f"the ONNX file does not exist (at {path})",
                       hint="export a decoder first: lora-fx export MODEL --adapter DIR --out merged.onnx --kv-cache")
    longest = max(len(p) for p in args.prompt_ids)
    ids = torch.full((len(args.prompt_ids), longest), args.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(args.prompt_ids):  # left padding: the new tokens follow every prompt directly
        ids[row, longest - len(prompt):] = torch.tensor(prompt)
        mask[row, longest - len(prompt):] = 1
    tokens = lora_fx.generate_onnx(path, ids, mask, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                   eos_token_id=args.eos_id, pad_token_id=args.pad_id,
                                   generator=torch.Generator().manual_seed(args.seed), device=args.device)
    for row, prompt in enumerate(args.prompt_ids):
        print(",".join(str(int(t)) for t in tokens[row, longest - len(prompt):]))
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    import lora_fx

    report = lora_fx.verify_onnx(args.a, args.b)
    print(report)
    return EXIT_OK if report.identical else EXIT_FAILED


def cmd_fold_onnx(args: argparse.Namespace) -> int:
    try:
        from lora_fx.onnx.fold import fold_onnx
    except ModuleNotFoundError as e:
        if e.name in ("lora_fx.onnx.fold", "lora_fx.passes.onnx_fold", "lora_fx.passes.onnx_fold_rule"):
            raise CliError("the ONNX-level fold is not available in this lora_fx installation "
                           "(lora_fx.onnx.fold is missing)",
                           hint="upgrade lora_fx, or fold in PyTorch instead: lora-fx export MODEL --adapter DIR "
                                "--out merged.onnx") from e
        raise CliError(f"the ONNX-level fold needs {e.name!r}, which is not installed",
                       hint=f"pip install {e.name}") from e
    out = pathlib.Path(args.out)
    _check_outputs(out, None)
    with tempfile.TemporaryDirectory(prefix=".lora-fx-", dir=out.parent) as staging:
        # folded beside, moved into place unless there was nothing to fold: a failed call writes no file
        staged = pathlib.Path(staging) / out.name
        report = fold_onnx(args.unmerged, staged)
        if report.folded or report.rejected:
            for f in sorted(pathlib.Path(staging).iterdir(), key=lambda f: f == staged):  # the .onnx last
                os.replace(f, out.parent / f.name)
    report.path = str(out) if report.folded or report.rejected else None
    print(report)
    identical = True
    if args.base:
        from lora_fx.onnx.verify import verify_onnx

        verify = verify_onnx(args.base, args.out)
        print(verify)
        identical = verify.identical
    if report.folded == 0 and not report.rejected:
        raise CliError(f"{args.unmerged} has no LoRA branch to fold (nothing was written)",
                       hint="give the export of the UNMERGED adapted model (what lora_fx.adapt returned, before "
                            "lora_fx.fold)")
    if report.rejected:
        raise CliError(f"{len(report.rejected)} LoRA branch(es) could not be folded and were left in the graph "
                       f"(listed above); {args.out} was written with them",
                       hint="fold in PyTorch instead (lora_fx.fold, or lora-fx export), which handles every site")
    if not identical:
        raise CliError(f"the folded graph differs from the base export {args.base}",
                       hint="export the base with lora_fx.export_onnx and the same settings as the unmerged model")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
