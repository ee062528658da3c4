"""Records to token ids: the chat template (or a plain one), loss labels and the router's prompt span.

:func:`tokenize_record` puts the loss on every assistant turn (content + the end-of-turn token generation
stops on) and marks in ``prompt_mask`` the tokens the router reads: everything before the *first*
assistant response (system + first user turn + the assistant header). Later turns are not routed on: they
come after the first response, so routing on them would let the router see a response it is trained to
produce. A single-turn prompt is exactly :func:`render_prompt`'s output, so generation (which routes on
the whole prompt) routes as training did.
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedTokenizerBase

from simoe.data.records import check_messages

# Plain template, for tokenizers without a chat template (base models). The user turn ends with the
# response header, so a prompt always ends where the response starts; each response ends with eos.
PLAIN_SYSTEM = "{content}\n\n"


PLAIN_USER = "### Instruction:\n{content}\n\n### Response:\n"


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _chat_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool) -> list[int]:
    return list(tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False
    ))


Spans = list[tuple[int, int]]


def _plain_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> tuple[list[int], Spans]:
    """Plain-template ids of ``messages`` and the [start, end) span of every assistant turn.

    Responses are tokenized apart from the text before them, so the prompt's ids are the same whether
    or not a response follows. BOS leads when the tokenizer itself starts encoded text with it.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no chat template and no eos token to end responses with")
    bos = tokenizer.bos_token_id
    ids = [bos] if bos is not None and tokenizer("x")["input_ids"][:1] == [bos] else []
    spans, text = [], ""
    for m in messages:
        if m["role"] == "assistant":
            ids += _encode(tokenizer, text)
            text, start = "", len(ids)
            ids += _encode(tokenizer, m["content"]) + [eos]
            spans.append((start, len(ids)))
        else:
            text += (PLAIN_SYSTEM if m["role"] == "system" else PLAIN_USER).format(content=m["content"])
    return ids + _encode(tokenizer, text), spans


def _chat_template_ids(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], origin: str
) -> tuple[list[int], Spans]:
    """Chat-template ids of a conversation and its assistant spans, by diffing rendered prefixes.

    The span of assistant turn i runs from the end of ``messages[:i]`` rendered with the generation
    prompt to the end of ``messages[:i + 1]``; both must be prefixes of the whole rendering (as in
    open-instruct). The span stops at its last special token (the end-of-turn token generation stops
    on): what a template writes after it, like ChatML's newline, is never generated.
    """
    full = _chat_ids(tokenizer, messages, False)
    special = set(tokenizer.all_special_ids)
    special.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = _chat_ids(tokenizer, messages[:i], True)
        end = full if i == len(messages) - 1 else _chat_ids(tokenizer, messages[: i + 1], False)
        if full[: len(start)] != start or full[: len(end)] != end or len(end) <= len(start):
            raise ValueError(
                f"{origin}: the tokenizer's chat template is not prefix-stable at message {i}: rendering "
                "the conversation up to a turn is not a prefix of rendering all of it (e.g. it rewrites "
                "earlier turns), so the assistant tokens cannot be located"
            )
        stops = [j for j in range(len(start), len(end)) if end[j] in special]
        if not stops:
            raise ValueError(f"{origin}: the chat template ends assistant turn {i} without a special token, "
                             "so a model trained on it cannot learn to stop")
        spans.append((len(start), stops[-1] + 1))
    return full, spans


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    """Token ids of a prompt exactly as training saw them before the (final) assistant response.

    ``messages`` ends with a user turn (a final assistant turn is left out). With a chat template:
    ``apply_chat_template(..., add_generation_prompt=True)``; without one, the plain template
    ``[system + "\\n\\n"] "### Instruction:\\n{user}\\n\\n### Response:\\n"`` (PLAIN_SYSTEM, PLAIN_USER;
    earlier responses end with eos).
    """
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    check_messages([*messages, {"role": "assistant", "content": ""}], "prompt")
    if _has_chat_template(tokenizer):
        return _chat_ids(tokenizer, messages, True)
    return _plain_ids(tokenizer, messages)[0]


def template_affixes(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The token ids the prompt template puts before and after a single user turn's text.

    Two prompts that differ only in the user text are rendered as generation and training render
    them (:func:`render_prompt`); their longest common prefix and suffix are the template's fixed
    tokens: for SmolLM2 the default system prompt and the role headers before the text, the end of
    turn and the assistant header after it.
    """
    a = render_prompt(tokenizer, [{"role": "user", "content": "Alpha 1 beta, gamma."}])
    b = render_prompt(tokenizer, [{"role": "user", "content": "Zulu; 9 yankee x-ray?"}])
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    m = 0
    while m < min(len(a), len(b)) - n and a[-1 - m] == b[-1 - m]:
        m += 1
    return a[:n], (a[len(a) - m:] if m else [])


def tokenize_truncated(
    record: dict, tokenizer: PreTrainedTokenizerBase, max_seq_length: int
) -> tuple[dict | None, bool]:
    """(features or None when no response token fits, whether the example was truncated)."""
    if max_seq_length < 1:
        raise ValueError(f"max_seq_length must be >= 1, got {max_seq_length}")
    origin = record.get("origin") or "record"
    check_messages(record.get("messages"), origin)
    if _has_chat_template(tokenizer):
        ids, spans = _chat_template_ids(tokenizer, record["messages"], origin)
    else:
        ids, spans = _plain_ids(tokenizer, record["messages"])
    labels = [-100] * len(ids)
    for start, end in spans:
        labels[start:end] = ids[start:end]
    prompt_len = spans[0][0]
    # Too long: cut the prompt from the left, down to half the budget (the end of the prompt, nearest
    # the response, matters most; the router needs prompt tokens), then the response from the right.
    floor = min(prompt_len, max(1, max_seq_length // 2))
    keep = min(prompt_len, max(max_seq_length - (len(ids) - prompt_len), floor))
    total, cut = len(ids), prompt_len - keep
    ids, labels = ids[cut:][:max_seq_length], labels[cut:][:max_seq_length]
    truncated = len(ids) < total
    if all(label == -100 for label in labels):
        return None, truncated
    features = {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels,
                "prompt_mask": [1] * keep + [0] * (len(ids) - keep)}
    return features, truncated


def tokenize_record(record: dict, tokenizer: PreTrainedTokenizerBase, max_seq_length: int) -> dict | None:
    """``input_ids``, ``attention_mask``, ``labels`` and ``prompt_mask`` of a normalized record.

    ``labels`` is -100 except on assistant tokens (content and end-of-turn / eos, every turn);
    ``prompt_mask`` is 1 on everything before the first response (what the router reads). Longer than
    ``max_seq_length``: the prompt loses tokens from the left, keeping at least half the length (or all
    of a shorter prompt), then the response loses tokens from the right. Returns None when no response
    token is left.
    """
    return tokenize_truncated(record, tokenizer, max_seq_length)[0]


def eos_ids(model: nn.Module | None, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokenizer's eos and the model's generation_config eos ids (chat models often differ)."""
    ids = [tokenizer.eos_token_id]
    if model is not None:
        config = getattr(model, "generation_config", None)
        if config is None:  # a SIMoE / SMEAR model: the generation config is its base model's
            config = model.base_model.generation_config
        ids.append(config.eos_token_id)
    flat = []
    for entry in ids:
        flat.extend(entry if isinstance(entry, (list, tuple)) else [entry])
    return list(dict.fromkeys(int(i) for i in flat if i is not None))


def pad_id_of(tokenizer: PreTrainedTokenizerBase, model: nn.Module | None = None) -> int:
    """The id sequences are padded with (padding is masked out, so any of these serves): the
    tokenizer's pad token, else the first of :func:`eos_ids`."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    eos = eos_ids(model, tokenizer)
    if not eos:
        raise ValueError("the tokenizer has neither a pad nor an eos token to pad with"
                         + (", nor has the model's generation config an eos" if model is not None else ""))
    return eos[0]

