"""What adapt returns behaves like the model the user gave: any call, the model's own API, generate, Trainer,
devices and dtypes, modules trained in full, and the merged model as the user's class (issue 16).

Every comparison is against PEFT with the same adapter weights (a real client, not our own reference). Tolerances:
PEFT and lora_fx run the same fp32 ops in the same order on CPU (measured bit-equal logits); ATOL = 1e-5 leaves
room for a BLAS that picks another kernel. Trainer losses: 1e-4 as the issue asks (measured equal).
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch

import lora_fx
from lora_fx import Rule

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
transformers.logging.set_verbosity_error()
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

ATOL = 1e-5
VOCAB = 100


def llama(dropout: float = 0.0):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0, attention_dropout=dropout)
    return transformers.LlamaForCausalLM(cfg).eval()


def ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def left_padded(batch: int = 3, seq: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    x, mask = ids(batch, seq, seed=5), torch.ones(batch, seq, dtype=torch.long)
    mask[0, :3] = 0
    x[0, :3] = 0
    return x, mask


def pair(rules=(Rule(name="q_proj|v_proj", r=4, alpha=8),), model=llama, **adapt_options):
    """(adapted, the same adapter in PEFT, the plain model); adapted from a batch-1 example, B random."""
    base = model()
    adapted = lora_fx.adapt(copy.deepcopy(base), list(rules), example_inputs=(ids(1, 5),),
                            example_kwargs={"use_cache": False}, **adapt_options)
    torch.manual_seed(1)
    with torch.no_grad():
        for lora in adapted.lora_fx.values():
            lora.lora_B.normal_(0, 0.5)
    return adapted, to_peft(adapted, base), base


def to_peft(adapted, base, trainable: bool = False):
    """The adapted model's adapter in PEFT, through a PEFT folder (save_peft_adapter -> PeftModel.from_pretrained)."""
    import tempfile

    folder = tempfile.mkdtemp()
    lora_fx.save_peft_adapter(adapted, folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), folder, is_trainable=trainable).eval()


# ------------------------------------------------------------------------------------------------ the model's own
def test_the_adapted_model_is_the_users_model():
    adapted, _, base = pair()
    assert isinstance(adapted, transformers.LlamaForCausalLM) and isinstance(adapted, transformers.PreTrainedModel)
    assert type(adapted).__name__ == "LlamaForCausalLM"
    assert adapted.config is base.config or adapted.config == base.config
    assert adapted.get_input_embeddings() is adapted.model.embed_tokens
    assert adapted.device == torch.device("cpu") and adapted.dtype == torch.float32
    names = set(adapted.state_dict())
    assert set(base.state_dict()) <= names and any(n.startswith("lora_fx.") and n.endswith(".lora_A") for n in names)
    import inspect
    assert list(inspect.signature(adapted.forward).parameters)[:2] == ["input_ids", "attention_mask"]


def test_any_batch_keywords_labels_and_return_types():
    """Traced from one batch-1 call; called at batch 3 with a padded mask, labels, return_dict=False,
    output_hidden_states: every output equals PEFT's."""
    adapted, pm, _ = pair()
    x, mask = left_padded()
    calls = [dict(input_ids=x), dict(input_ids=x, attention_mask=mask), dict(input_ids=x, attention_mask=mask,
             labels=x), dict(input_ids=x, return_dict=False), dict(input_ids=x, output_hidden_states=True)]
    with torch.no_grad():
        for kw in calls:
            got, want = adapted(**kw), pm(**kw)
            got_t = got if isinstance(got, tuple) else got.to_tuple()
            want_t = want if isinstance(want, tuple) else want.to_tuple()
            flat = lambda t: [v for o in t for v in (o if isinstance(o, tuple) else (o,)) if torch.is_tensor(v)]
            assert len(flat(got_t)) == len(flat(want_t)), kw.keys()
            for a, b in zip(flat(got_t), flat(want_t)):
                assert torch.allclose(a, b, atol=ATOL), kw.keys()
    info = lora_fx.capture_info(adapted)
    assert info["captures"] >= 4 and info["graphs"] == info["captures"]
    with torch.no_grad():
        adapted(input_ids=x, attention_mask=mask)
    assert lora_fx.capture_info(adapted)["captures"] == info["captures"]  # a call seen before is not captured again


class WithOptions(torch.nn.Module):
    """A bare-parameter site (only a graph can apply its LoRA) and an argument that is neither tensor nor constant."""

    def __init__(self):
        super().__init__()
        self.proj, self.w = torch.nn.Linear(8, 8), torch.nn.Parameter(torch.randn(8, 8))

    def forward(self, x, options=None):
        scale = options.scale if options is not None else 1.0
        return torch.nn.functional.linear(self.proj(x), self.w) * scale


def test_a_call_the_graphs_cannot_take_is_a_clear_error():
    import types

    x = torch.randn(2, 8)
    adapted = lora_fx.adapt(WithOptions(), example_inputs=(x,))
    with pytest.raises(TypeError, match="takes the arguments of the original forward"):
        adapted(x, nonsense=1)  # as the original forward would refuse it
    with pytest.raises(lora_fx.LoraFxError, match="options: SimpleNamespace") as e:
        adapted(x, options=types.SimpleNamespace(scale=2.0))
    assert "bare parameter" in str(e.value) and "w" in str(e.value)
    module_sites_only = lora_fx.adapt(WithOptions(), [Rule(name="proj")], example_inputs=(x,))
    with torch.no_grad():  # the LoRA on an nn.Linear is applied by a hook: the original forward runs with it
        y = module_sites_only(x, options=types.SimpleNamespace(scale=2.0))
        assert torch.allclose(y, module_sites_only(x) * 2.0)
    assert lora_fx.capture_info(module_sites_only)["fallbacks"] == 1


class WithOptionalLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.extra = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x, use_extra: bool = False):
        h = self.a(x)
        return self.extra(h) if use_extra else h


@pytest.mark.parametrize("frontend", ["auto", "export"])
def test_a_call_reaching_layers_the_example_did_not_says_they_have_no_lora(frontend):
    """LoRA modules are made at adapt from the example call: a later call that reads other weights the rules select
    runs them as the frozen base, and says so (once per captured graph) instead of training without them."""
    x = torch.randn(2, 4)
    adapted = lora_fx.adapt(WithOptionalLayer(), example_inputs=(x,), frontend=frontend)
    with pytest.warns(UserWarning, match=r"reads weights the example call at adapt did not: \['extra.weight'\]"):
        adapted(x, use_extra=True)
    excluded = lora_fx.adapt(WithOptionalLayer(), [Rule(name="extra", exclude=True), Rule(r=2)], example_inputs=(x,),
                             frontend=frontend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        excluded(x, use_extra=True)  # no rule selects extra: nothing to say
    reached = lora_fx.adapt(WithOptionalLayer(), example_inputs=(x,), example_kwargs={"use_extra": True},
                            frontend=frontend)
    assert sorted(l.weight_name for l in reached.lora_fx.values()) == ["a.weight", "extra.weight"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reached(x)


def test_resizing_the_vocabulary_after_adapt_is_refused_before_anything_changes():
    """A resize would replace the embedding and output head under graphs made for the old vocabulary (the adapted
    model kept computing 64 logits after resize_token_embeddings(70), and fold gave back the old head). The same
    size passes through, as tokenizer scripts call it unconditionally."""
    adapted, _, base = pair()
    table, head = adapted.get_input_embeddings().weight, adapted.lm_head.weight
    assert adapted.resize_token_embeddings(VOCAB).weight is table
    with pytest.raises(lora_fx.InputError, match=rf"resize_token_embeddings\({VOCAB + 6}\) after") as e:
        adapted.resize_token_embeddings(VOCAB + 6)
    assert "resize the original model first" in e.value.fix
    with pytest.raises(lora_fx.InputError, match=rf"resize_token_embeddings\({VOCAB + 4}\)"):
        adapted.resize_token_embeddings(VOCAB + 1, pad_to_multiple_of=8)
    assert adapted.get_input_embeddings().weight is table and adapted.lm_head.weight is head
    assert adapted.config.vocab_size == VOCAB and adapted(ids(2, 5)).logits.shape[-1] == VOCAB


# ------------------------------------------------------------------------------------------------ generate
def test_generate_uses_the_lora_with_a_kv_cache_and_matches_peft():
    adapted, pm, base = pair()
    x, mask = left_padded(batch=2, seq=6)
    options = dict(input_ids=x, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    got, want, plain = adapted.generate(**options), pm.generate(**options), base.generate(**options)
    assert torch.equal(got, want) and not torch.equal(got, plain)
    assert lora_fx.capture_info(adapted)["fallbacks"] == 0  # the cache went through graphs


# ------------------------------------------------------------------------------------------------ device, dtype, modes
def test_dtype_changes_after_adapt():
    """Adapted in fp32, run in bf16 (graphs are captured again): equal to PEFT's bf16 model. bf16 rounds each of
    ~10 ops to 8 bits of mantissa: 5e-2 on logits of size ~1."""
    adapted, pm, _ = pair()
    adapted.to(torch.bfloat16)
    pm.to(torch.bfloat16)
    x, mask = left_padded()
    with torch.no_grad():
        got, want = adapted(input_ids=x, attention_mask=mask).logits, pm(input_ids=x, attention_mask=mask).logits
    assert got.dtype == torch.bfloat16 and torch.allclose(got.float(), want.float(), atol=5e-2)


def test_base_dropout_follows_train_and_eval():
    adapted, _, _ = pair(model=lambda: llama(dropout=0.5))
    x = ids(2, 6)
    adapted.train()
    a, b = adapted(input_ids=x).logits, adapted(input_ids=x).logits
    assert not torch.allclose(a, b)  # the base's attention dropout is live in train mode, as in the model
    adapted.eval()
    with torch.no_grad():
        assert torch.equal(adapted(input_ids=x).logits, adapted(input_ids=x).logits)


def test_pickle_and_deepcopy_keep_the_model_working():
    adapted, pm, _ = pair()
    x = ids(2, 5)
    for copied in (pickle.loads(pickle.dumps(adapted)), copy.deepcopy(adapted)):
        with torch.no_grad():
            assert torch.allclose(copied(input_ids=x).logits, pm(input_ids=x).logits, atol=ATOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")
def test_a_model_adapted_on_the_cpu_trains_on_the_gpu():
    """Adapted on the CPU from a batch-1 example (torch.export bakes the CPU into the graph), then .to("cuda"): the
    graphs are captured again there, and training under bf16 autocast gives PEFT's losses from the same adapter (bf16
    autocast: each matmul rounds to 8 mantissa bits, ~1e-2 on a loss of ~4.6), eager and under torch.compile."""
    adapted, pm, _ = pair()
    adapted.to("cuda")
    pm.to("cuda")
    x, mask = (t.cuda() for t in left_padded(batch=4, seq=8))
    labels = x.masked_fill(mask == 0, -100)

    def losses(model, steps=5):
        params = [p for n, p in model.named_parameters() if "lora_" in n]
        for p in model.parameters():
            p.requires_grad_(any(p is q for q in params))
        opt = torch.optim.AdamW(params, lr=1e-2)
        out = []
        for _ in range(steps):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=x, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            assert all(p.grad is not None and p.grad.is_cuda for p in params)
            opt.step()
            out.append(loss.item())
        return out

    start = {k: v.clone() for k, v in lora_fx.lora_state_dict(adapted).items()}
    ours, theirs = losses(adapted), losses(pm)
    assert ours[-1] < ours[0] and max(abs(a - b) for a, b in zip(ours, theirs)) < 2e-2, (ours, theirs)
    with torch.no_grad():
        for k, v in lora_fx.lora_state_dict(adapted).items():
            v.copy_(start[k])
    compiled = torch.compile(adapted)
    assert max(abs(a - b) for a, b in zip(losses(compiled), theirs)) < 2e-2


# ------------------------------------------------------------------------------------------------ Trainer
class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _trainer_losses(model, tmp_path, name, **args) -> list[float]:
    x, mask = left_padded(batch=4, seq=8)
    labels = x.masked_fill(mask == 0, -100)
    data = ListDataset([{"input_ids": x[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(4)])
    losses = []

    class Record(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    targs = transformers.TrainingArguments(output_dir=str(tmp_path / name), per_device_train_batch_size=4,
                                           max_steps=4, logging_steps=1, learning_rate=1e-2, report_to=[],
                                           save_strategy="no", use_cpu=True, seed=0, **args)
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=data, callbacks=[Record()])
    trainer.train()
    return losses


@pytest.mark.parametrize("checkpointing", [False, True])
def test_trainer_trains_it_with_peft_losses(tmp_path, checkpointing):
    """transformers Trainer on padded batches (attention_mask and labels reach the model: no column dropped), per-step
    losses equal to PEFT's from the same adapter; gradient_checkpointing=True runs the graphs layer by layer."""
    pytest.importorskip("accelerate")
    adapted, pm, _ = pair()
    for p in pm.parameters():
        p.requires_grad_("lora_" in "".join(n for n, q in pm.named_parameters() if q is p))
    ours = _trainer_losses(adapted, tmp_path, "ours", gradient_checkpointing=checkpointing)
    theirs = _trainer_losses(pm, tmp_path, "peft")
    assert len(ours) == len(theirs) == 4
    assert max(abs(a - b) for a, b in zip(ours, theirs)) <= 1e-4, (ours, theirs)
    assert lora_fx.capture_info(adapted)["checkpointing"] == checkpointing


def _lm_rows(n: int = 8) -> ListDataset:
    return ListDataset([{"input_ids": ids(1, 8, seed=10 + i)[0], "labels": ids(1, 8, seed=10 + i)[0]}
                        for i in range(n)])


def _checkpointing_trainer(model, folder, max_steps: int, **args):
    """A Trainer saving every step; a constant learning rate, so that a run cut in two has the schedule of one."""
    targs = transformers.TrainingArguments(output_dir=str(folder), per_device_train_batch_size=2, max_steps=max_steps,
                                           learning_rate=1e-2, report_to=[], use_cpu=True, seed=0, save_steps=1,
                                           save_strategy="steps", logging_steps=1, lr_scheduler_type="constant", **args)
    return transformers.Trainer(model=model, args=targs, train_dataset=_lm_rows(), eval_dataset=_lm_rows(2))


def test_trainer_resumes_from_and_reloads_the_checkpoints_it_wrote(tmp_path):
    """Trainer checkpoints of an adapted model (save_pretrained): train(resume_from_checkpoint=...) continues the run
    exactly (Trainer could not find a checkpoint there), load_best_model_at_end loads the best one (it kept the last
    silently), and save_model writes into the output folder that holds the checkpoints."""
    pytest.importorskip("accelerate")
    base = llama()

    def fresh():
        torch.manual_seed(0)  # the same A in every run
        return lora_fx.adapt(copy.deepcopy(base), Rule(name="q_proj|v_proj", r=4), example_inputs=(ids(1, 5),),
                             example_kwargs={"use_cache": False})

    whole = fresh()
    _checkpointing_trainer(whole, tmp_path / "whole", 4).train()
    halves = fresh()
    _checkpointing_trainer(halves, tmp_path / "halves", 2).train()
    resumed = fresh()  # a new process: the same model adapted the same way, its LoRA at its start
    _checkpointing_trainer(resumed, tmp_path / "halves", 4).train(resume_from_checkpoint=str(tmp_path / "halves" /
                                                                                           "checkpoint-2"))
    for (name, a), b in zip(lora_fx.lora_state_dict(whole).items(), lora_fx.lora_state_dict(resumed).values()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=name)  # same CPU ops: equal up to rounding

    best = fresh()
    trainer = _checkpointing_trainer(best, tmp_path / "best", 3, eval_strategy="steps", eval_steps=1,
                                     load_best_model_at_end=True, metric_for_best_model="loss",
                                     greater_is_better=True)  # the worst loss is "best": not the last step
    trainer.train()
    chosen = trainer.state.best_model_checkpoint
    assert chosen is not None and not chosen.endswith("checkpoint-3")
    again = lora_fx.adapt_from_adapter(copy.deepcopy(base), chosen, example_inputs=(ids(1, 5),),
                                       example_kwargs={"use_cache": False})
    for a, b in zip(lora_fx.lora_state_dict(again).values(), lora_fx.lora_state_dict(best).values()):
        assert torch.equal(a, b)
    trainer.save_model()  # into the folder that holds checkpoint-1..3
    assert (tmp_path / "best" / "adapter.safetensors").is_file() and (tmp_path / "best" / "checkpoint-1").is_dir()


# ------------------------------------------------------------------------------------------------ fold
def test_fold_gives_back_the_users_class(tmp_path):
    adapted, pm, base = pair()
    merged = lora_fx.fold(adapted)
    assert type(merged) is transformers.LlamaForCausalLM
    x, mask = left_padded(batch=2, seq=6)
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=x).logits, pm(input_ids=x).logits, atol=1e-4)
    options = dict(input_ids=x, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(merged.generate(**options), adapted.generate(**options))
    merged.save_pretrained(tmp_path / "merged")
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=x).logits, merged(input_ids=x).logits)
        assert not torch.allclose(base(input_ids=x).logits, merged(input_ids=x).logits)  # the user's model as it was


def test_save_pretrained_of_the_adapted_model_writes_the_adapter(tmp_path):
    adapted, _, base = pair()
    adapted.save_pretrained(tmp_path / "adapter")
    again = lora_fx.adapt_from_adapter(copy.deepcopy(base), tmp_path / "adapter", example_inputs=(ids(1, 5),),
                                       example_kwargs={"use_cache": False})
    x = ids(2, 5)
    with torch.no_grad():
        assert torch.equal(again(input_ids=x).logits, adapted(input_ids=x).logits)


# ------------------------------------------------------------------------------------------------ modules trained in full
def bert_classifier(labels: int = 3):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64, num_labels=labels)
    return transformers.BertForSequenceClassification(cfg).eval()


def test_modules_trained_in_full_beside_the_lora(tmp_path):
    base = bert_classifier()
    x = ids(2, 6)
    adapted = lora_fx.adapt(base, [Rule(role=["attn.q", "attn.v"], r=4)], example_inputs=(x,),
                            modules_to_save=["classifier"])
    head_before = base.classifier.weight.detach().clone()
    trainable = lora_fx.trainable_parameters(adapted)
    assert any(p is adapted.classifier.weight for p in trainable)
    assert adapted.classifier.weight is not base.classifier.weight and not base.classifier.weight.requires_grad
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(3):
        loss = adapted(input_ids=x, labels=torch.tensor([0, 2])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(base.classifier.weight, head_before)  # the user's head is untouched
    assert not torch.equal(adapted.classifier.weight, head_before)
    adapted.eval()
    lora_fx.save_adapter(adapted, tmp_path / "a")
    again = lora_fx.adapt_from_adapter(copy.deepcopy(base), tmp_path / "a", example_inputs=(x,))
    merged = lora_fx.fold(adapted)
    with torch.no_grad():
        want = adapted(input_ids=x).logits
        assert torch.equal(again(input_ids=x).logits, want)
        assert torch.allclose(merged(input_ids=x).logits, want, atol=1e-5)
    assert torch.equal(merged.classifier.weight, adapted.classifier.weight)
    user_head, trained_head = base.classifier.weight, adapted.classifier.weight
    with torch.no_grad():
        with lora_fx.disable_adapters(adapted):  # the base model: no LoRA and the user's own head (PEFT does so)
            assert torch.equal(adapted(input_ids=x).logits, base.eval()(input_ids=x).logits)
        assert torch.equal(adapted(input_ids=x).logits, want)  # and back
    assert base.classifier.weight is user_head and adapted.classifier.weight is trained_head
    base_onnx = lora_fx.export_onnx(base, tmp_path / "base.onnx", (x,))
    merged_onnx = lora_fx.export_onnx(merged, tmp_path / "merged.onnx", (x,))
    assert lora_fx.verify_onnx(base_onnx, merged_onnx).identical


def test_peft_sequence_classification_adapters_load_and_save_back(tmp_path):
    """A PEFT SEQ_CLS adapter (LoRA on q, v and a classifier trained in full) loads with PEFT's logits; saved back,
    PEFT loads it with the same logits."""
    base = bert_classifier()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                                       target_modules=["query", "value"]))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_(0, 0.5)
    pm.save_pretrained(tmp_path / "peft")
    x = ids(2, 6)
    with torch.no_grad():
        want = pm.eval()(input_ids=x).logits
    adapted = lora_fx.load_peft_adapter(copy.deepcopy(base), tmp_path / "peft", example_inputs=(x,))
    with torch.no_grad():
        assert torch.allclose(adapted(input_ids=x).logits, want, atol=ATOL)
    lora_fx.save_peft_adapter(adapted, tmp_path / "again")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "again").eval()
    with torch.no_grad():
        assert torch.allclose(again(input_ids=x).logits, want, atol=ATOL)


# ------------------------------------------------------------------------------------------------ parts of the model
def test_direct_calls_of_submodules_carry_the_lora():
    """Clients call parts of the model (TRL runs model.base_model and the LM head apart): the backbone of the adapted
    model gives PEFT's backbone output; the user's model gets no hook; disabled adapters add nothing."""
    adapted, pm, base = pair()
    x = ids(2, 6)
    with torch.no_grad():
        ours, theirs = adapted.model(x).last_hidden_state, pm.base_model.model.model(x).last_hidden_state
        assert torch.allclose(ours, theirs, atol=ATOL) and not torch.allclose(ours, base.model(x).last_hidden_state)
        assert torch.allclose(adapted(x).logits, pm(x).logits, atol=ATOL)  # the graph adds each LoRA once
        with lora_fx.disable_adapters(adapted):
            assert torch.equal(adapted.model(x).last_hidden_state, base.model(x).last_hidden_state)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in base.modules())


class Projection(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        return torch.nn.functional.linear(x, self.w)


class BareParameter(torch.nn.Module):
    """A LoRA on a bare parameter (F.linear on it) is applied by graphs only."""

    def __init__(self):
        super().__init__()
        self.inner = Projection()
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.inner(x))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_direct_calls_in_symbolic_and_export_graphs_and_a_bare_parameter(frontend):
    torch.manual_seed(0)
    model, x = BareParameter(), torch.randn(3, 8)
    adapted = lora_fx.adapt(model, example_inputs=(x,), frontend=frontend, r=2)
    with torch.no_grad():
        for lora in adapted.lora_fx.values():
            lora.lora_B.normal_()
        h = torch.nn.functional.linear(x, model.inner.w) + adapted.lora_fx["inner_w"](x)
        assert torch.allclose(adapted.head(h), adapted(x), atol=ATOL)  # head called directly: its LoRA, once
    with pytest.raises(lora_fx.LoraFxError, match="bare") as info:
        adapted.inner(x)  # its LoRA cannot be added here: an error, not a silent miss
    assert "inner" in str(info.value) and "How to fix" in str(info.value)
    with torch.no_grad(), lora_fx.disable_adapters(adapted):
        assert torch.equal(adapted.inner(x), model.inner(x))  # no LoRA enabled: the direct call is the model's


def test_trl_sft_trainer_trains_it_with_peft_losses(tmp_path):
    """TRL's SFTTrainer (a fused LM head: it calls the backbone and lm_head apart) from the same adapter: per-step
    losses equal to PEFT's (same fp32 ops on CPU; 1e-4 as for Trainer)."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(VOCAB - 3)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                     eos_token="</s>")
    data = datasets.Dataset.from_dict({"text": [" ".join(f"w{(i + j) % 90}" for j in range(4 + i % 5))
                                                for i in range(16)]})
    adapted, _, base = pair()
    pm = to_peft(adapted, base, trainable=True)

    def losses(model, name):
        args = trl.SFTConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=8, max_steps=3,
                             logging_steps=1, learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                             seed=0)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        trainer.train()
        return [log["loss"] for log in trainer.state.log_history if "loss" in log]

    ours, theirs = losses(adapted, "ours"), losses(pm, "peft")
    assert len(ours) == 3 and max(abs(a - b) for a, b in zip(ours, theirs)) <= 1e-4, (ours, theirs)
