"""Shared test helpers: tiny random models (one per supported architecture), tiny tokenizers and
checkpoints, all built offline.

The one place for helpers used by more than one test file; test files import them with
``from conftest import ...`` (pytest puts tests/ on sys.path; tests/train_tiny.py, run as a script
from tests/, finds it the same way) and never import each other.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

# Real data shared by the team (read-only), next to the repository: ../shared/data
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

VOCAB = 96
_COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
    eos_token_id=2, max_position_embeddings=128, initializer_range=0.2,
)

CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON),
    "mistral": lambda: MistralConfig(**_COMMON, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**_COMMON),
    "qwen3": lambda: Qwen3Config(**_COMMON, head_dim=8),
    "gemma2": lambda: Gemma2Config(**_COMMON, head_dim=8),
    "gemma3": lambda: Gemma3TextConfig(**_COMMON, head_dim=8, sliding_window=16),
    "phi3": lambda: Phi3Config(**_COMMON),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                               bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2),
    "gpt_neox": lambda: GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, initializer_range=0.2,
    ),
}
ARCHS = sorted(CONFIGS)


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random causal LM of ``arch`` in fp32 and eval mode (same seed, same weights)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch](), attn_implementation="eager")
    return model.float().eval()


def randomize_experts(model, seed: int = 0) -> None:
    """Give a SIMoE model non-trivial Δ, mask logits and router, so tests can tell things apart."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.routed_layers():
            layer.delta.copy_(0.3 * torch.randn(layer.delta.shape, generator=g))
            layer.log_alpha.copy_(6 * torch.rand(layer.log_alpha.shape, generator=g) - 3)
            layer.log_alpha[:, : layer.in_features // 4] = -10.0  # off in every expert: skipped
        for p in model.router.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


def train_without_dropout(model) -> None:
    """Train mode (gates sampled) with the base model's dropout off, so outputs are comparable."""
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # some attention code reads .p under the parent's training flag


CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def char_tokenizer(chat_template: str | None = CHATML_TEMPLATE):
    """A character-level tokenizer whose ids fit the tiny models' vocabulary (pad 0, bos 1, eos 2).

    Letters, digits, whitespace and most ASCII punctuation; any other character is <unk>.
    """
    import string

    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
    chars = list(string.ascii_letters + string.digits + " \n" + "!\"#$%&'()*+,-./:;<=>?@[]_`")
    vocab = {t: i for i, t in enumerate([*specials, *chars, "<unk>"])}
    assert len(vocab) <= VOCAB
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|pad|>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", unk_token="<unk>", chat_template=chat_template)


# ChatML with a default system prompt, like SmolLM2-Instruct's template.
SYSTEM = "You are a test assistant."
CHATML_SYSTEM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + SYSTEM + "<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def byte_tokenizer(chat_template: str | None = None, bos: bool = False, pad: bool = False):
    """A byte-level BPE without merges: one token per byte, so decoding is exact for any text.

    256 byte tokens, then the specials <s>, </s>, <|im_start|>, <|im_end|>, <pad> (ids 256-260): more
    than the tiny models' VOCAB, so it goes with models sized to ``len(tokenizer)``. eos is <|im_end|>
    with a chat template, </s> without; ``bos``: encode text as "<s> text", as Llama's tokenizer does;
    ``pad``: <pad> is the pad token (none otherwise).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok.add_special_tokens(specials)
    if bos:  # encodes text as "<s> text", as Llama's tokenizer does
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    kwargs = {"pad_token": "<pad>"} if pad else {}
    if chat_template:
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<s>",
                                       chat_template=chat_template, **kwargs)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", bos_token="<s>", **kwargs)


def save_tiny_checkpoint(root: Path, num_experts: int = 4, chat_template: str | None = CHATML_TEMPLATE,
                         **config) -> tuple[str, str]:
    """(base dir, SIMoE checkpoint dir) under ``root``: a tiny llama and a randomized SIMoE upcycling of
    it, each saved with ``char_tokenizer(chat_template)``; the checkpoint records the base dir as its
    base. ``config``: further :class:`SIMoEConfig` fields (``router_input``, ...)."""
    from simoe import SIMoEConfig, upcycle

    base_dir, ckpt_dir = root / "base", root / "ckpt"
    tokenizer = char_tokenizer(chat_template)
    tiny_model("llama").save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    config = SIMoEConfig(num_experts=num_experts, base_model_name_or_path=str(base_dir), **config)
    model = upcycle(tiny_model("llama"), config)
    randomize_experts(model)
    model.save_pretrained(ckpt_dir)
    tokenizer.save_pretrained(ckpt_dir)
    return str(base_dir), str(ckpt_dir)


def tiny_simoe(arch: str = "llama", num_experts: int = 4, router_input: str = "embedding-mean"):
    """A randomized SIMoE upcycling of ``tiny_model(arch)``, in eval mode."""
    from simoe import SIMoEConfig, upcycle

    model = upcycle(tiny_model(arch), SIMoEConfig(num_experts=num_experts, router_input=router_input))
    randomize_experts(model)
    return model.eval()


PROMPTS = ["Add: 2 + 3", "Reverse the word: ocean", "Hi", "Count the letter: 'a' in banana", "Sort: c a b"]


def chat_records(texts, groups):
    """One record per text: the text as the user turn, "x" as the answer, and its group."""
    return [{"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": "x"}],
             "group": g} for t, g in zip(texts, groups, strict=True)]


@pytest.fixture(scope="module")
def tokenizer():
    """:func:`char_tokenizer` with ChatML, built once per module."""
    return char_tokenizer()


# Local stand-ins for chat data that lives on the hub, as records.
CHAT_RECORDS = [
    {"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w},
                  {"role": "user", "content": "Again?"}, {"role": "assistant", "content": f"{w}!"}]}
    for w in ("yes", "no", "maybe", "never")
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    """A tiny Llama with a byte-level ChatML tokenizer (default system prompt, pad), saved as a local
    model directory; its vocabulary is the tokenizer's (261 ids)."""
    tok = byte_tokenizer(CHATML_SYSTEM_TEMPLATE, pad=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tok.pad_token_id))
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


TESTS = Path(__file__).parent
TRAINING_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}


def run_training(script: str, out: Path, launcher: list[str] | None = None, check: bool = True,
                 **opts) -> dict[int, dict]:
    """Run ``tests/<script> OUT '<opts as JSON>'`` (under ``launcher``: torchrun, accelerate launch;
    default this Python) and return its log lines by step (:func:`training_log`)."""
    cmd = [*(launcher or [sys.executable]), str(TESTS / script), str(out), json.dumps(opts)]
    proc = subprocess.run(cmd, env=TRAINING_ENV, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])
    return training_log(out)


def training_log(out: Path) -> dict[int, dict]:
    """The training log lines (``out/log.jsonl``) by step."""
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


LOGGED = ("loss", "nll", "grad_norm", "lambda1", "density/union_expected")
WEIGHTS_FILE = "simoe_model.safetensors"


def same_logs(a: dict, b: dict, keys: tuple[str, ...] = LOGGED) -> None:
    """Two training runs' log lines for one step agree (to float rounding)."""
    for k in keys:
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (k, a[k], b[k])


def same_weights(a: Path, b: Path, rtol: float, atol: float = 1e-6) -> None:
    """Two saved SIMoE directories hold the same tensors, whole (shapes checked too)."""
    from safetensors.torch import load_file

    a, b = load_file(a / WEIGHTS_FILE), load_file(b / WEIGHTS_FILE)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)
