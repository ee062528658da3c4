import json
import os

import pytest
import torch
from conftest import VOCAB, randomize_experts, tiny_model
from safetensors.torch import load_file

from simoe import SIMoEConfig, SIMoEModel, upcycle
from simoe.config import CONFIG_NAME, WEIGHTS_NAME


def _trained(arch="qwen2", **kw):
    model = upcycle(tiny_model(arch), SIMoEConfig(num_experts=3, **kw))
    randomize_experts(model)
    model.set_router_temperature(0.7)
    return model.eval()


@pytest.mark.parametrize("arch", ["qwen2", "gpt2", "gemma2"])
def test_save_then_reload_gives_identical_logits(tmp_path, arch):
    targets = ["c_attn"] if arch == "gpt2" else ["q_proj", "down_proj"]
    model = _trained(arch, router_input="hidden-mean", target_modules=targets)
    ids = torch.randint(3, VOCAB, (2, 9))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]

    saved = load_file(tmp_path / WEIGHTS_NAME)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {f"router.{k}" for k in model.router.state_dict()} <= set(saved)
    assert {k for k in saved if k != "router.temperature"} == {
        n.removeprefix("base_model.") for n in trainable
    }  # only the trainable tensors (+ the router's temperature): no base weight
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["num_experts"] == 3

    reloaded = SIMoEModel.from_pretrained(tiny_model(arch), tmp_path).eval()
    assert reloaded.router.temperature.item() == pytest.approx(0.7)
    with torch.no_grad():
        after = reloaded(input_ids=ids).logits
    assert torch.equal(before, after)


def test_reload_onto_another_base_is_refused(tmp_path):
    _trained("qwen2").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not fit this model"):
        SIMoEModel.from_pretrained(tiny_model("gpt2"), tmp_path)


def test_bad_config_file_names_file_and_field(tmp_path):
    _trained().save_pretrained(tmp_path)
    path = tmp_path / CONFIG_NAME
    data = json.loads(path.read_text())
    data["num_expert"] = 2
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"simoe_config.json: unknown field\(s\) \['num_expert'\]"):
        SIMoEModel.from_pretrained(tiny_model("qwen2"), tmp_path)
    path.write_text("{\n  \"num_experts\": 3,\n  oops\n}")
    with pytest.raises(ValueError, match="simoe_config.json: invalid JSON at line 3"):
        SIMoEModel.from_pretrained(tiny_model("qwen2"), tmp_path)
    with pytest.raises(FileNotFoundError, match="missing: no such directory"):  # not a Hub lookup
        SIMoEModel.from_pretrained(tiny_model("qwen2"), tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no simoe_config.json in .*empty"):
        SIMoEModel.from_pretrained(tiny_model("qwen2"), tmp_path / "empty")


def test_config_records_base_model_path(tmp_path):
    base = tiny_model("llama")
    base.save_pretrained(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    model = upcycle(AutoModelForCausalLM.from_pretrained(tmp_path / "base"))
    assert model.simoe_config.base_model_name_or_path == str(tmp_path / "base")


def test_a_checkpoint_carries_a_model_card_with_its_base_options_and_sparsity(tmp_path):
    base = tiny_model("llama")
    base.save_pretrained(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    model = upcycle(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                    SIMoEConfig(num_experts=3, target_sparsity=0.5, gate_regime="noise-free",
                                target_modules=r".*\.(q_proj|v_proj)"))
    randomize_experts(model)
    model.save_pretrained(tmp_path / "ckpt")
    card = (tmp_path / "ckpt" / "README.md").read_text()
    report = model.sparsity_report()
    assert card.startswith(f"---\nlibrary_name: simoe\nbase_model: {tmp_path / 'base'}\n")
    union = report["union"]["deterministic_density"]
    assert f"{union:.1%} of the {report['upcycled_params']:,} upcycled" in card
    assert "| `target_sparsity` | `0.5` |" in card and "| `gate_regime` | `noise-free` |" in card
    assert r"| `target_modules` | `.*\.(q_proj\|v_proj)` |" in card  # the regex's | escaped in its cell
    assert "Per expert: " + ", ".join(f"{e['deterministic_density']:.1%}" for e in report["experts"]) in card
    assert "simoe export --checkpoint THIS_DIRECTORY --mode compact" in card
    # the card is not in the way of loading
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    reloaded = SIMoEModel.from_pretrained(again, tmp_path / "ckpt")
    assert reloaded.sparsity_report() == report


def test_push_to_hub_uploads_the_checkpoint_and_from_pretrained_reads_it_back(tmp_path, monkeypatch):
    """Everything up to the network: huggingface_hub's API is replaced at its boundary."""
    import huggingface_hub
    from conftest import char_tokenizer

    calls, hub_repo = [], tmp_path / "hub" / "owner" / "simoe-tiny"

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls.append(("create_repo", repo_id, private, exist_ok))

        def upload_folder(self, repo_id, folder_path, commit_message):
            import shutil

            calls.append(("upload_folder", repo_id, sorted(os.listdir(folder_path)), commit_message))
            shutil.copytree(folder_path, hub_repo)  # what the Hub would now hold
            return "https://huggingface.co/owner/simoe-tiny/commit/abc"

    def fake_snapshot_download(repo_id, allow_patterns=None):
        calls.append(("snapshot_download", repo_id, sorted(allow_patterns)))
        return str(hub_repo)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = _trained("llama")
    url = model.push_to_hub("owner/simoe-tiny", token="hf_x", private=True, tokenizer=char_tokenizer())
    assert url == "https://huggingface.co/owner/simoe-tiny/commit/abc"
    assert calls[:2] == [("token", "hf_x"), ("create_repo", "owner/simoe-tiny", True, True)]
    _, repo, files, message = calls[2]
    assert repo == "owner/simoe-tiny" and message == "Upload SIMoEModel"
    assert {"README.md", CONFIG_NAME, WEIGHTS_NAME, "tokenizer_config.json"} <= set(files)

    reloaded = SIMoEModel.from_pretrained(tiny_model("llama"), "owner/simoe-tiny")
    wanted = sorted([CONFIG_NAME, WEIGHTS_NAME, "README.md"])
    assert calls[3] == ("snapshot_download", "owner/simoe-tiny", wanted)
    for (name, a), (_, b) in zip(model.routed_state_dict().items(), reloaded.routed_state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
