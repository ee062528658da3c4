"""The baselines: sparse upcycling (Mixtral / Qwen2-MoE), SMEAR, LoRA and full fine-tuning."""

import copy
import json
import re
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, char_tokenizer, tiny_model
from transformers import AutoModelForCausalLM

from simoe import SIMoEConfig
from simoe.baselines import METHODS, BaselineConfig, SMEARModel, build, parameter_counts
from simoe.baselines.smear import CONFIG_NAME, WEIGHTS_NAME
from simoe.hub import load_model_and_tokenizer
from simoe.inference.generation import pad_left

MOE_CLASS = {"llama": "MixtralForCausalLM", "mistral": "MixtralForCausalLM", "qwen2": "Qwen2MoeForCausalLM"}


def _ids(batch=2, length=9, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


# ---------------------------------------------------------------- sparse upcycling
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # Qwen2-MoE's empty shared expert
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_sparse_upcycling_equals_dense_and_reloads_as_plain_hf(tmp_path, arch):
    base = tiny_model(arch)
    moe = build("sparse-upcycling", base, BaselineConfig(num_ffn_experts=4, top_k=2)).eval()
    assert type(moe).__name__ == MOE_CLASS[arch]
    dense_mlp = base.model.layers[1].mlp
    experts = moe.model.layers[1].mlp.experts
    gate_up = torch.cat([dense_mlp.gate_proj.weight, dense_mlp.up_proj.weight])
    for e in range(4):  # every expert is the dense FFN, in the stacked layout
        assert torch.equal(experts.gate_up_proj[e], gate_up)
        assert torch.equal(experts.down_proj[e], dense_mlp.down_proj.weight)
    ids, mask = _ids(), torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    dense = _logits(base, ids, attention_mask=mask)
    upcycled = _logits(moe, ids, attention_mask=mask)
    assert (upcycled - dense).abs().max() <= 1e-5

    moe.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(reloaded).__name__ == MOE_CLASS[arch]
    assert torch.equal(_logits(reloaded, ids, attention_mask=mask), upcycled)
    greedy = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(reloaded.generate(input_ids=ids, attention_mask=mask, **greedy),
                       base.generate(input_ids=ids, attention_mask=mask, **greedy))


def test_sparse_upcycling_loss_has_aux_loss_and_training_pulls_experts_apart():
    torch.manual_seed(0)
    options = BaselineConfig(num_ffn_experts=4, top_k=2, router_aux_loss_coef=0.5)
    moe = build("sparse-upcycling", tiny_model("llama"), options).train()
    assert all(p.requires_grad for p in moe.parameters())  # upcycling_trainable="all"
    ids, mask = _ids(4, 12), torch.ones(4, 12, dtype=torch.long)
    out = moe(input_ids=ids, attention_mask=mask, labels=ids)
    nll = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert out.aux_loss > 0
    assert torch.allclose(out.loss, nll + 0.5 * out.aux_loss, atol=1e-6)
    moe.eval()  # evaluation losses are the plain NLL, comparable across methods
    out = moe(input_ids=ids, attention_mask=mask, labels=ids)
    assert out.aux_loss is None and torch.allclose(out.loss, nll, atol=1e-6)
    moe.train()

    layer = moe.model.layers[0].mlp
    before = layer.experts.gate_up_proj.detach().clone(), layer.gate.weight.detach().clone()
    optimizer = torch.optim.Adam(moe.parameters(), lr=1e-2)
    for step in range(3):
        optimizer.zero_grad()
        moe(input_ids=_ids(4, 12, seed=step), labels=_ids(4, 12, seed=step)).loss.backward()
        optimizer.step()
    updates = layer.experts.gate_up_proj.detach() - before[0]
    changed = [e for e in range(4) if updates[e].abs().max() > 0]
    assert len(changed) >= 2  # the router spreads tokens over experts ...
    assert not all(torch.allclose(updates[changed[0]], updates[e]) for e in changed[1:])  # ... differently
    assert not torch.equal(layer.gate.weight, before[1])


def test_sparse_upcycling_can_train_only_the_moe():
    moe = build("sparse-upcycling", tiny_model("qwen2"), BaselineConfig(upcycling_trainable="moe"))
    trainable = {n for n, p in moe.named_parameters() if p.requires_grad}
    assert trainable and all(".mlp." in n for n in trainable)
    assert any(n.endswith("mlp.gate.weight") for n in trainable)


def test_sparse_upcycling_refuses_other_architectures():
    with pytest.raises(ValueError, match=r"supports model types \['llama', 'mistral', 'qwen2'\].*'gpt2'"):
        build("sparse-upcycling", tiny_model("gpt2"))
    with pytest.raises(ValueError, match="router_jitter_noise"):
        build("sparse-upcycling", tiny_model("qwen2"), BaselineConfig(router_jitter_noise=0.1))


# ---------------------------------------------------------------- SMEAR
def _smear(arch="llama", seed=0, base=None):
    """A SMEAR model with experts and router made different, so tests can tell them apart."""
    torch.manual_seed(seed)
    model = SMEARModel(base if base is not None else tiny_model(arch),
                       BaselineConfig(num_ffn_experts=3, smear_init_noise=0.5, smear_router_hidden_size=16))
    with torch.no_grad():
        for p in model.router.parameters():
            p.copy_(0.5 * torch.randn(p.shape))
    return model.eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_smear_equals_dense_at_init(arch):
    base = tiny_model(arch)
    ids = _ids()
    dense = _logits(base, ids)
    model = build("smear", base, BaselineConfig(num_ffn_experts=4)).eval()
    assert (_logits(model, ids) - dense).abs().max() <= 1e-5
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters()
                         if n.startswith("router.") or n.endswith((".gate_up", ".down"))}


def test_smear_merges_each_example_as_its_own_ffn():
    dense_mlp = copy.deepcopy(tiny_model("llama").model.layers[0].mlp)
    layer = _smear().base_model.model.layers[0].mlp
    assert not torch.equal(layer.gate_up[0], layer.gate_up[1])  # the noise made the experts differ
    routing = torch.softmax(torch.randn(3, 3, generator=torch.Generator().manual_seed(1)), -1)
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        layer.set_routing(routing)
        batched = layer(x)
        repeated = layer(x.repeat_interleave(2, dim=0))  # generate()'s beams: each prompt repeated in place
        for b in range(3):
            merged = copy.deepcopy(dense_mlp)
            gate_up = sum(routing[b, e] * layer.gate_up[e] for e in range(3))
            merged.gate_proj.weight.copy_(gate_up[:64])
            merged.up_proj.weight.copy_(gate_up[64:])
            merged.down_proj.weight.copy_(sum(routing[b, e] * layer.down[e] for e in range(3)))
            alone = merged(x[b : b + 1])
            assert (batched[b : b + 1] - alone).abs().max() <= 1e-5
            assert (repeated[2 * b : 2 * b + 2] - alone.expand(2, -1, -1)).abs().max() <= 1e-5


def test_smear_routing_ignores_response_and_padding():
    model = _smear()
    ids, mask, prompt = _ids(2, 10), torch.ones(2, 10, dtype=torch.long), torch.zeros(2, 10, dtype=torch.long)
    mask[0, :2] = 0  # left padding
    prompt[0, 2:6] = prompt[1, :7] = 1
    r = model.route(ids, mask, prompt)
    assert torch.allclose(r.sum(-1), torch.ones(2))
    other = ids.clone()
    other[0, :2] = 5  # padding
    other[:, 7:] = 7  # response
    assert torch.equal(model.route(other, mask, prompt), r)
    other[1, 3] = (ids[1, 3] + 1) % VOCAB  # a prompt token
    assert not torch.allclose(model.route(other, mask, prompt)[1], r[1])


def test_smear_left_padded_batch_generates_as_one_prompt_at_a_time():
    model = _smear()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g) for n in (7, 4, 6)]
    ids, mask = pad_left(prompts, pad_id=0)
    width = ids.shape[1]
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    batched = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, width:]
    singles = [model.generate(input_ids=p[None], **kwargs)[0, len(p):] for p in prompts]
    assert torch.equal(batched, torch.stack(singles))
    fixed = torch.zeros(len(prompts), 3)
    fixed[:, 0] = 1
    other = model.generate(input_ids=ids, attention_mask=mask, routing=fixed, **kwargs)[:, width:]
    assert not torch.equal(other, batched)  # the routing is what changes the output
    beams = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0)
    prompt_ids = _ids(2, 5)
    singles = [model.generate(input_ids=prompt_ids[i : i + 1], **beams) for i in range(2)]
    assert torch.equal(model.generate(input_ids=prompt_ids, **beams), torch.cat(singles))


def test_smear_training_updates_only_experts_and_router():
    model = build("smear", tiny_model("llama"), BaselineConfig(num_ffn_experts=3)).train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    layer = model.base_model.model.layers[0].mlp
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = model(input_ids=_ids(4, 8), labels=_ids(4, 8)).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # each step's forward merges the updated experts
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert not torch.equal(layer.gate_up[0], layer.gate_up[1])  # different routings pulled them apart


def test_smear_save_and_reload(tmp_path):
    base_dir = tmp_path / "base"
    tiny_model("qwen2").save_pretrained(base_dir)
    char_tokenizer().save_pretrained(base_dir)
    model = _smear(base=load_model_and_tokenizer(base_dir)[0])
    ids = _ids()
    before = _logits(model, ids)
    model.save_pretrained(tmp_path / "smear")
    assert sorted(p.name for p in (tmp_path / "smear").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    saved = json.loads((tmp_path / "smear" / CONFIG_NAME).read_text())
    assert saved["base_model_name_or_path"] == str(base_dir) and saved["num_ffn_experts"] == 3

    on_base = SMEARModel.from_pretrained(load_model_and_tokenizer(base_dir)[0], tmp_path / "smear").eval()
    path_only = SMEARModel.from_pretrained(tmp_path / "smear").eval()
    assert torch.equal(_logits(on_base, ids), before)
    assert torch.equal(_logits(path_only, ids), before)
    saved["num_ffn_experts"] = 2
    (tmp_path / "smear" / CONFIG_NAME).write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"smear_model.safetensors: .*gate_up has shape \(3, 128, 32\)"):
        SMEARModel.from_pretrained(tiny_model("qwen2"), tmp_path / "smear")


def test_smear_refuses_an_ffn_it_cannot_copy():
    with pytest.raises(ValueError, match="bias-free gate_proj, up_proj, down_proj"):
        build("smear", tiny_model("gpt2"))


# ---------------------------------------------------------------- LoRA, full, build, options
def test_lora_trains_only_adapters_and_starts_as_the_base():
    base = tiny_model("llama")
    ids = _ids()
    dense = _logits(base, ids)
    model = build("lora", base, BaselineConfig(lora_rank=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    wrapped = {n.split(".lora_")[0] for n in trainable}
    assert len(wrapped) == 2 * 7  # q k v o gate up down in both layers, not lm_head
    assert torch.equal(_logits(model, ids), dense)


def test_full_trains_everything_and_counts():
    model = build("full", tiny_model("llama"))
    assert all(p.requires_grad for p in model.parameters())
    n = sum(p.numel() for p in model.parameters())
    assert parameter_counts(model) == {"trainable": n, "total": n, "active_per_token": n}


def test_parameter_counts_of_moe_and_smear():
    base = tiny_model("llama")
    n_base = sum(p.numel() for p in base.parameters())
    ffn = 3 * 32 * 64  # gate, up, down of one layer
    moe = build("sparse-upcycling", base, BaselineConfig(num_ffn_experts=4, top_k=2))
    counts = parameter_counts(moe)
    assert counts["total"] == n_base + 2 * (3 * ffn + 4 * 32)  # 3 more FFNs + a 4 x 32 router per layer
    assert counts["active_per_token"] == counts["total"] - 2 * 2 * ffn  # 2 of 4 experts idle
    assert counts["trainable"] == counts["total"]
    smear = build("smear", base, BaselineConfig(num_ffn_experts=4, smear_router_hidden_size=16))
    router = sum(p.numel() for p in smear.router.parameters())
    counts = parameter_counts(smear)
    assert counts == {"trainable": 2 * 4 * ffn + router, "total": n_base + 2 * 3 * ffn + router,
                      "active_per_token": n_base + router}


def test_parameter_counts_of_simoe_follow_the_gates(tmp_path):
    from simoe.inference.export import save_compact

    base = tiny_model("llama")
    n_base = sum(p.numel() for p in base.parameters())
    config = SIMoEConfig(num_experts=2, target_modules=["down_proj"], upcycle_norms=False)
    model = build("simoe", base, config)
    router = sum(p.numel() for p in model.router.parameters())
    with torch.no_grad():
        for _, layer in model.routed_layers():
            layer.log_alpha.fill_(-10.0)  # every gate off: the model is the base
            layer.log_alpha[1, :5] = 10.0  # 5 input columns of down_proj (32 entries each) on in expert 1
    counts = parameter_counts(model)
    assert counts["trainable"] == counts["total"] - n_base
    # base + Δ of the 5 kept columns in 2 layers + their 2 gate values each + router
    assert counts["active_per_token"] == n_base + router + 2 * 5 * 32 + 2 * 5 * 2
    # the number the compact export reports
    assert counts["active_per_token"] == save_compact(model, tmp_path)["total_inference_params"]


def test_build_checks_method_and_options(tmp_path):
    assert METHODS == ("simoe", "full", "lora", "sparse-upcycling", "smear")
    with pytest.raises(ValueError, match="unknown method 'moe'; methods: simoe, full"):
        build("moe", tiny_model("llama"))
    with pytest.raises(ValueError, match="takes a SIMoEConfig"):
        build("simoe", tiny_model("llama"), BaselineConfig())
    with pytest.raises(ValueError, match="top_k=3 exceeds num_ffn_experts=2"):
        BaselineConfig(num_ffn_experts=2, top_k=3)
    path = tmp_path / "options.json"
    BaselineConfig(lora_rank=8).save(path)
    assert BaselineConfig.load(path) == BaselineConfig(lora_rank=8)
    path.write_text(json.dumps({"lora_rnk": 8}))
    with pytest.raises(ValueError, match=r"options.json: unknown field\(s\) \['lora_rnk'\]"):
        BaselineConfig.load(path)
    path.write_text(json.dumps({"top_k": 0}))
    with pytest.raises(ValueError, match="options.json: top_k must be an integer >= 1"):
        BaselineConfig.load(path)


@pytest.mark.parametrize("method", ["simoe", "smear"])
def test_a_routing_of_the_wrong_shape_is_refused_by_both_routed_models(method):
    options = SIMoEConfig(num_experts=3) if method == "simoe" else BaselineConfig(num_ffn_experts=3)
    model = build(method, tiny_model("llama"), options)
    model.set_routing(torch.full((2, 3), 1 / 3))
    for wrong in (torch.ones(2, 4) / 4, torch.ones(3) / 3):
        message = f"routing must have shape [batch, 3], got {tuple(wrong.shape)}"
        with pytest.raises(ValueError, match=re.escape(message)):
            model.set_routing(wrong)


def test_a_missing_optional_dependency_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    with pytest.raises(ImportError, match=re.escape("pip install 'simoe[baselines]'")):
        build("lora", tiny_model("llama"))
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    from simoe.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["eval", "lm-eval", "--checkpoint", "x", "--tasks", "arc_easy", "--output_dir", "o"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "simoe eval lm-eval needs the lm_eval package: pip install 'simoe[eval]'" in err
