"""The layer split pass (passes/split_layers.py): lora_fx.split_layers / checkpoint_layers give a training view with
one submodule per layer. It must compute the same loss and LoRA gradients as the adapted model, keep fewer
activations alive when layers are checkpointed, shard per layer under FSDP2 with the adapted model seeing the shards,
and leave the adapted model (fold, save, export) as it was.

Tolerances: recomputation replays the same ops on the same inputs with the same RNG state, so on CPU in fp32 the
values agree exactly in practice; the checks allow 1e-6 relative (a few fp32 ulps) so a kernel that picks another
summation order on recompute would not fail them.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import lora_fx
from lora_fx.passes.infra import graph_signature

import zoo as Z
from conftest import gloo_rank, randomize_lora, sharded_and_reference_lora, spawn_fsdp2

RTOL = 1e-6


def _llama(layers: int = 4, seq: int = 32):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   use_cache=False, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    return model, torch.randint(0, 64, (2, seq))


def _adapted_llama(dropout: float = 0.0, **kw):
    model, ids = _llama(**kw)
    adapted = lora_fx.adapt(model, lora_fx.Rule(name="q_proj|v_proj|down_proj", r=4, alpha=8, dropout=dropout),
                            example_inputs=(ids,))
    randomize_lora(adapted)
    return model, adapted, ids


def _loss(model, ids):
    return Z.first_output(model(ids)).float().square().mean()


def _loss_and_grads(model, adapted, ids, seed: int = 1):
    params = list(lora_fx.lora_parameters(adapted))
    for p in params:
        p.grad = None
    torch.manual_seed(seed)  # the LoRA dropout masks
    loss = _loss(model, ids)
    loss.backward()
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return loss.detach(), grads


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a - b).abs().max().item() <= RTOL * max(1.0, b.abs().max().item())


class _Outputs(TorchDispatchMode):
    """Weak references to every tensor an op produces (the real tensors, nothing replaced)."""

    def __init__(self):
        super().__init__()
        self.refs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.refs += [weakref.ref(t) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def retained_activation_bytes(model, params_of: nn.Module, ids) -> int:
    """Bytes of tensors made in the forward that are still alive when it returns (kept for the backward pass):
    the activation memory checkpointing is there to cut. Parameters and their views are not counted."""
    weights = {p.untyped_storage().data_ptr() for p in params_of.parameters()}
    weights |= {b.untyped_storage().data_ptr() for b in params_of.buffers()}
    mode = _Outputs()
    with mode:
        loss = _loss(model, ids)
    gc.collect()
    alive = {}
    for ref in mode.refs:
        t = ref()
        if t is not None and t.untyped_storage().data_ptr() not in weights:
            alive[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    del loss
    return sum(alive.values())


# ------------------------------------------------------------------------------------------------ same values
@pytest.mark.parametrize("every", [1, 2])
def test_view_gives_the_adapted_models_loss_and_lora_gradients(every):
    _, adapted, ids = _adapted_llama(dropout=0.2)  # dropout: the recompute must replay the same masks
    adapted.train()
    view = lora_fx.checkpoint_layers(adapted, every=every)
    assert view.layers == [f"model.layers.{i}" for i in range(4)]
    assert view.checkpointed == [f"model.layers.{i}" for i in range(0, 4, every)]
    loss, grads = _loss_and_grads(adapted, adapted, ids)
    loss_v, grads_v = _loss_and_grads(view, adapted, ids)
    _close(loss_v, loss)
    assert len(grads) == 2 * 3 * 4 and any(g.abs().max() > 0 for g in grads)
    for g_v, g in zip(grads_v, grads):
        _close(g_v, g)
    view.eval()  # no dropout: two calls give the same values
    with torch.no_grad():  # no gradients: the layers run without checkpointing
        _close(Z.first_output(view(ids)), Z.first_output(adapted(ids)))


def test_view_keeps_fewer_activations_in_proportion_to_the_layers_checkpointed():
    _, adapted, ids = _adapted_llama(layers=4, seq=48)
    adapted.train()
    plain = retained_activation_bytes(adapted, adapted, ids)
    every = retained_activation_bytes(lora_fx.checkpoint_layers(adapted), adapted, ids)
    half = retained_activation_bytes(lora_fx.checkpoint_layers(adapted, every=2), adapted, ids)
    # measured on this model: every layer keeps 0.08 of plain (each layer's input, the logits and the loss),
    # every other layer about half of plain
    assert every < 0.2 * plain, (plain, every)
    assert 0.35 * plain < half < 0.65 * plain, (plain, half)


# ------------------------------------------------------------------------------------------------ the adapted model
def test_training_the_view_trains_the_adapted_model_which_folds_as_before():
    model, adapted, ids = _adapted_llama()
    signature = graph_signature(lora_fx.graph(adapted).graph)
    names = [n for n, _ in adapted.named_parameters()]
    view = lora_fx.checkpoint_layers(adapted)
    before = [p.detach().clone() for p in lora_fx.lora_parameters(adapted)]
    opt = torch.optim.AdamW(lora_fx.lora_parameters(adapted), lr=1e-2)
    view.train()
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(Z.first_output(view(ids)).flatten(0, 1), ids.roll(-1, 1).flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert any(not torch.equal(b, p) for b, p in zip(before, lora_fx.lora_parameters(adapted)))
    assert graph_signature(lora_fx.graph(adapted).graph) == signature  # the view changed nothing of the model
    assert [n for n, _ in adapted.named_parameters()] == names
    view.eval()
    folded = lora_fx.fold(adapted)
    with torch.no_grad():
        _close(Z.first_output(folded(ids)), Z.first_output(adapted(ids)))
        _close(Z.first_output(view(ids)), Z.first_output(adapted(ids)))


def test_view_train_keeps_batchnorm_statistics_fx_front_end():
    """A model with BatchNorm in each block, fx front end: the base's BatchNorm statistics stay frozen under
    view.train() (recomputations in the backward pass included), as they do under adapted.train()."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU()) for _ in range(3))

        def forward(self, x):
            for block in self.blocks:
                x = x + block(x)
            return x

    torch.manual_seed(0)
    x = torch.randn(16, 8)
    adapted = lora_fx.adapt(Net(), lora_fx.Rule(module_type="Linear", r=2), example_inputs=(x,), frontend="fx")
    randomize_lora(adapted)
    view = lora_fx.checkpoint_layers(adapted).train()
    stats = [b.detach().clone() for b in adapted.buffers()]
    assert view.checkpointed == ["blocks.0", "blocks.1", "blocks.2"]
    assert all(lora.training for lora in adapted.lora_fx.values())
    loss, grads = _loss_and_grads(adapted, adapted, x)
    loss_v, grads_v = _loss_and_grads(view, adapted, x)
    _close(loss_v, loss)
    for g_v, g in zip(grads_v, grads):
        _close(g_v, g)
    assert all(torch.equal(s, b) for s, b in zip(stats, adapted.buffers()))


def test_train_and_save_adapter_take_the_view(tmp_path):
    _, adapted, ids = _adapted_llama()
    view = lora_fx.checkpoint_layers(adapted)
    batches = [ids] * 4
    losses = lora_fx.train(view, batches, lambda m, b: _loss(m, b), steps=4, lr=1e-2)
    assert len(losses) == 4 and losses[-1] < losses[0]
    path = lora_fx.save_adapter(view, tmp_path / "adapter")
    fresh = lora_fx.adapt(_llama()[0], lora_fx.Rule(name="q_proj|v_proj|down_proj", r=4, alpha=8),
                          example_inputs=(ids,))
    lora_fx.load_adapter(fresh, path)
    with torch.no_grad():
        _close(Z.first_output(fresh(ids)), Z.first_output(adapted(ids)))


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input_says_what_and_how():
    _, adapted, ids = _adapted_llama(layers=2)
    for bad in (0, 1.5, True, "2"):
        with pytest.raises(lora_fx.InputError, match="every must be a positive int") as e:
            lora_fx.checkpoint_layers(adapted, every=bad)
        assert "every=2" in e.value.fix
    with pytest.raises(lora_fx.InputError, match="no items of a module list 'model.blocks'") as e:
        lora_fx.checkpoint_layers(adapted, layers="model.blocks")
    assert "model.layers" in e.value.fix
    view = lora_fx.checkpoint_layers(adapted)
    with pytest.raises(lora_fx.InputError, match="layer view") as e:
        lora_fx.fold(view)
    assert "view.adapted" in e.value.fix
    with pytest.raises(lora_fx.NotAdaptedError, match="not adapted"):
        lora_fx.checkpoint_layers(_llama(layers=2)[0])

    single = lora_fx.adapt(nn.Sequential(nn.Linear(8, 8), nn.ReLU()), example_inputs=(torch.randn(2, 8),))
    with pytest.raises(lora_fx.InputError, match="checkpoint_every must be an int >= 0"):
        lora_fx.split_layers(adapted, checkpoint_every=-1)
    with pytest.raises(lora_fx.InputError, match="no repeated layers"):
        lora_fx.checkpoint_layers(single)


def test_view_compiles_in_one_graph():
    """torch.compile(fullgraph=True) takes the view (non-reentrant checkpoint is a higher-order op for dynamo),
    with the same loss and gradients as the adapted model."""
    _, adapted, ids = _adapted_llama(layers=2)
    view = lora_fx.checkpoint_layers(adapted).train()
    compiled = torch.compile(lambda batch: _loss(view, batch), backend="aot_eager", fullgraph=True)
    params = list(lora_fx.lora_parameters(adapted))
    loss = compiled(ids)
    loss.backward()
    grads = [p.grad.clone() for p in params]
    loss_ref, grads_ref = _loss_and_grads(adapted, adapted, ids)
    _close(loss.detach(), loss_ref)
    for g, g_ref in zip(grads, grads_ref):
        _close(g, g_ref)


# ------------------------------------------------------------------------------------------------ parts own their weights
def test_each_layer_part_reads_its_own_weights_through_the_adapted_models_modules():
    """What per-layer FSDP2 needs: a layer's part holds exactly that layer's weights (base and LoRA), as the very
    module objects of the adapted model or modules sharing their parameter dicts (the adapted model's hooked clones of
    modules owning adapted weights, lora_fx/submodule_calls.py), so sharding the part reaches the adapted model."""
    _, adapted, ids = _adapted_llama(layers=3)
    view = lora_fx.split_layers(adapted)
    assert view.checkpointed == [] and view.layers == ["model.layers.0", "model.layers.1", "model.layers.2"]
    named = dict(adapted.named_parameters())
    for name, parts in view.layer_modules.items():
        assert len(parts) == 1
        index = name.rsplit(".", 1)[1]
        expected = {id(p) for n, p in named.items()
                    if n.startswith(name + ".") or n.startswith(f"lora_fx.model_layers_{index}_")}
        assert {id(p) for p in parts[0].parameters()} == expected
        owners = {id(m._parameters) for m in adapted.modules()}
        assert all(id(m._parameters) in owners for m in parts[0].children())
    with torch.no_grad():
        _close(Z.first_output(view(ids)), Z.first_output(adapted(ids)))


class _DropoutBlocks(nn.Module):
    """Dropout in the model itself (a graph bakes its train/eval mode in) and an optional target: a call with it
    returns the loss, a call without it the output (another call kind, another graph)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.3), nn.Tanh()) for _ in range(3))
        self.head = nn.Linear(8, 2)

    def forward(self, x, target=None):
        for block in self.blocks:
            x = x + block(x)
        out = self.head(x)
        return out if target is None else F.mse_loss(out, target)


def test_view_runs_calls_of_other_kinds_than_its_graph_through_their_own_split():
    """The view splits one captured call (here x alone, in training mode); a call with a target, or in eval mode,
    is another graph: the view runs the adapted model's graph for it, split the same way, so the loss is there and
    dropout follows the mode (it used to drop the target and keep dropout on)."""
    torch.manual_seed(0)
    x, target = torch.randn(4, 8), torch.randn(4, 2)
    adapted = lora_fx.adapt(_DropoutBlocks(), lora_fx.Rule(r=2, alpha=4), example_inputs=(x,))  # torch.export
    randomize_lora(adapted)
    adapted.train()
    view = lora_fx.checkpoint_layers(adapted)
    torch.manual_seed(1)
    loss_v = view(x, target=target)
    torch.manual_seed(1)
    loss = adapted(x, target=target)
    assert loss_v.dim() == 0
    _close(loss_v, loss)
    loss_v.backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in lora_fx.lora_parameters(adapted))
    view.eval()
    with torch.no_grad():
        _close(view(x), adapted(x))  # no dropout in eval mode
        _close(view(x, target=target), adapted(x, target=target))


class _Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def _blocks(seed: int = 0):
    torch.manual_seed(seed)
    x = torch.randn(4, 8)
    return lora_fx.adapt(_Blocks(), lora_fx.Rule(r=2, alpha=4), example_inputs=(x,), frontend="export"), x


def _batch(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(16, 8, generator=g), torch.randn(16, 2, generator=g)


def _fsdp2_layers_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import json

    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor

    with gloo_rank(rank, world, init_file):
        adapted, _ = _blocks()
        reference, _ = _blocks()  # the same model, trained in one process on every rank's batch
        view = lora_fx.split_layers(adapted)
        for parts in view.layer_modules.values():
            for part in parts:
                fully_shard(part)
        fully_shard(view)
        units = sum(isinstance(m, FSDPModule) for m in view.modules())
        adapted_sharded = all(isinstance(p, DTensor) for p in adapted.parameters())
        error = sharded_and_reference_lora(view, adapted, reference, [_batch(r) for r in range(world)], rank, 4)
        adapted.eval()  # another call kind than the one the sharded view splits: refused, not run unsharded
        try:
            view(_batch(rank)[0])
            refused = False
        except lora_fx.InputError as e:
            refused = "sharded (FSDP2)" in str(e)
        adapted.train()
        ref = lora_fx.lora_state_dict(reference)
        changed = any(v.abs().max().item() > 0 for k, v in ref.items() if "lora_B" in k)
        # docs/tutorials.md section 4: gather the adapted model's state (its own names) into a plain copy, fold it
        full = {k: v.full_tensor() for k, v in adapted.state_dict().items()}
        plain, x = _blocks()
        plain.load_state_dict(full)
        with torch.no_grad():
            fold_error = (lora_fx.fold(plain)(x) - reference(x)).abs().max().item()
        path = lora_fx.save_adapter(adapted, f"{out}/adapter")  # a collective: gathers A and B, rank 0 writes
        fresh, _ = _blocks()
        lora_fx.load_adapter(fresh, path)
        with torch.no_grad():
            file_error = (fresh(x) - reference(x)).abs().max().item()
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump({"units": units, "adapted_sharded": adapted_sharded, "error": error, "changed": changed,
                       "refused_other_call": refused,
                       "fold_error": fold_error, "file_error": file_error}, f)


@pytest.mark.slow  # two processes, a torch.export trace each: about 15 s on 2 cores
def test_fsdp2_per_layer_on_two_processes_gloo(tmp_path):
    """fully_shard on every layer part and on the view: 4 FSDP units, the adapted model's parameters are the
    shards, and 4 steps train A and B as one process does on both ranks' batches; the gathered state folds, and
    the saved adapter loads, to the same outputs. Tolerance 1e-5: the same fp32 math, reduced across ranks in another order."""
    _, results = spawn_fsdp2(_fsdp2_layers_worker, tmp_path)
    for r in results:
        assert r["units"] == 4 and r["adapted_sharded"] and r["changed"] and r["refused_other_call"], r
        assert max(r["error"], r["fold_error"], r["file_error"]) <= 1e-5, r
