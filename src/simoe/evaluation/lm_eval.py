"""lm-evaluation-harness integration: the ``simoe`` model, which routes on the context tokens only.

A SIMoE model merges its experts with a routing computed from the *prompt*. Scoring a continuation
must therefore route on the context alone: routing on context + continuation would let the router
read the answer it is being scored on (and differently for every answer choice). HFLM scores a
right-padded batch of ``context + continuation[:-1]`` rows with ``self.model(inps)``, which for a
SIMoE model would route on every token of the row, so :meth:`SIMoELM._loglikelihood_tokens` is
replaced by one that knows each row's context length and routes every row on its own context.
Generation needs nothing new: HFLM's ``_model_generate`` calls ``model.generate(input_ids,
attention_mask=...)`` with the left-padded prompts, and ``SIMoEModel.generate`` routes on them.

    simoe eval lm-eval --checkpoint DIR --tasks arc_easy      (in Python: :func:`evaluate`)

Importing this module registers the model, so lm-eval's own API takes it by name too:
``lm_eval.simple_evaluate(model="simoe", model_args={"pretrained": DIR}, tasks=[...])``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import transformers
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm

from simoe.config import SIMoEConfig
from simoe.hub import resolve_name
from simoe.io import save_json
from simoe.model import SIMoEModel

RESULTS_NAME = "results.json"


def _load_tokenizer(checkpoint: str, config: SIMoEConfig) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer saved with the checkpoint (training saves it), else the base model's."""
    if os.path.isfile(os.path.join(checkpoint, "tokenizer_config.json")):
        return transformers.AutoTokenizer.from_pretrained(checkpoint)
    return transformers.AutoTokenizer.from_pretrained(resolve_name(config.base_model_name_or_path))


@register_model("simoe")
class SIMoELM(HFLM):
    """HFLM over a SIMoE checkpoint (``pretrained``: its directory); experts routed on contexts only.

    The base model is the one recorded in the checkpoint's config (a built-in name, a local
    directory or a hub id). ``kwargs`` go to HFLM (``truncation``, ``softmax_dtype``, ...).
    """

    def __init__(
        self,
        pretrained: str,
        batch_size: int | str = 1,
        device: str | None = None,
        dtype: str | None = None,
        max_length: int | None = None,
        **kwargs,
    ) -> None:
        if str(batch_size).startswith("auto"):
            # HFLM's batch size search calls the model without a context to route on.
            raise ValueError(f"simoe: batch_size must be an integer, got {batch_size!r}")
        if kwargs.get("trust_remote_code"):
            raise ValueError("simoe: trust_remote_code is not supported")
        config = SIMoEConfig.from_pretrained(pretrained)  # clear errors for a wrong directory
        model = SIMoEModel.from_pretrained(pretrained, dtype=dtype)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device).eval()  # eval: the evaluation gates
        # HFLM accepts an already loaded transformers model: hand it the base (it reads its config,
        # device and dtype), then put the SIMoE wrapper in its place for every forward.
        super().__init__(pretrained=model.base_model, tokenizer=_load_tokenizer(pretrained, config),
                         backend="causal", batch_size=int(batch_size), max_length=max_length, **kwargs)
        self._model = model
        self.pretrained = pretrained  # recorded in the results instead of the model object

    def get_model_info(self) -> dict:
        """What the results record about the model (HFLM's version would query the hub)."""
        base = self.model.base_model
        return {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(base.dtype),
            "simoe_checkpoint": str(self.pretrained),
            "base_model": self.model.simoe_config.base_model_name_or_path,
        }

    def _model_call(
        self,
        inps: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [batch, seq, vocab] with every row's experts routed on its ``prompt_mask`` tokens.

        A call without ``prompt_mask`` is refused rather than routed on the whole row.
        """
        if prompt_mask is None or labels is not None:
            raise ValueError("SIMoELM._model_call needs prompt_mask, the context tokens to route on")
        with (
            torch.no_grad(),
            torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                           enabled=self.mixed_precision_dtype is not None),
        ):
            routing = self.model.route(inps, attn_mask, prompt_mask)
            return self.model(input_ids=inps, attention_mask=attn_mask, routing=routing).logits

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        """(log P(continuation | context), whether it is the greedy continuation) per request.

        As HFLM: the row is ``(context + continuation)``, left-truncated to ``max_length + 1``
        tokens, minus its last token. Unlike HFLM, each row routes on the context tokens it keeps;
        the windows of ``loglikelihood_rolling`` (perplexity) thus route on their few context tokens
        (the first one on the prefix token alone), never on the text they score. Requests with the
        same context and continuation[:-1] (answer choices of one token) share one row; HFLM's
        cache key, context + continuation[:-1] joined, would also share a row between requests
        that split it at different points, so routed differently. ``override_bs`` only matters
        for HFLM's automatic batch size, which this class refuses.
        """
        groups: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = {}
        for i, (_, context, continuation) in enumerate(requests):
            if not context or not continuation or len(continuation) > self.max_length:
                raise ValueError(f"request {i}: needs a non-empty context and a continuation of 1 to "
                                 f"{self.max_length} tokens, got {len(context)} and {len(continuation)}")
            groups.setdefault((tuple(context), tuple(continuation[:-1])), []).append(i)
        # Longest rows first, as HFLM: a batch's padding is then small and an OOM happens at once.
        keys = sorted(groups, key=lambda k: -(len(k[0]) + len(k[1])))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                    desc="Running loglikelihood requests")
        for start in range(0, len(keys), self.batch_size):
            batch = keys[start:start + self.batch_size]
            # key = (context, continuation[:-1]); the row is their concatenation, left-truncated.
            rows = [(context + head)[-self.max_length:] for context, head in batch]
            # Context tokens left after truncation; at least one, as the continuation fits.
            n_context = [len(row) - len(head) for row, (_, head) in zip(rows, batch, strict=True)]
            width = max(len(row) for row in rows)
            # Pad with id 0, as HFLM does: the pad token may be one it added beyond the embeddings.
            ids = torch.zeros((len(rows), width), dtype=torch.long)
            for r, row in enumerate(rows):
                ids[r, :len(row)] = torch.tensor(row)
            positions = torch.arange(width)
            attention_mask = (positions < torch.tensor([len(row) for row in rows])[:, None]).long()
            prompt_mask = (positions < torch.tensor(n_context)[:, None]).long()
            logits = self._model_call(ids.to(self.device), attention_mask.to(self.device),
                                      prompt_mask=prompt_mask.to(self.device))
            logprobs = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
            for r, key in enumerate(batch):
                # The logits at positions n_context - 1 ... len(row) - 1 predict the continuation.
                scored = logprobs[r, n_context[r] - 1:len(rows[r])]
                for i in groups[key]:
                    request, _, continuation = requests[i]
                    target = torch.tensor(continuation, device=scored.device)
                    answer = (float(scored.gather(-1, target[:, None]).sum()),
                              bool((scored.argmax(-1) == target).all()))
                    results[i] = answer
                    if request is not None:  # None: a window of loglikelihood_rolling
                        self.cache_hook.add_partial("loglikelihood", request, answer)
                    pbar.update(1)
        pbar.close()
        return results


def evaluate(
    checkpoint: str,
    tasks: list[str],
    output_dir: str,
    batch_size: int = 8,
    limit: int | None = None,
    include_path: str | None = None,
    num_fewshot: int | None = None,
    apply_chat_template: bool = False,
) -> dict:
    """Run lm-evaluation-harness ``tasks`` on the SIMoE checkpoint; write ``output_dir/results.json``.

    ``include_path``: a directory of extra task YAMLs (e.g. local datasets); ``limit``: at most
    this many documents per task; ``apply_chat_template``: render prompts with the tokenizer's
    chat template (for instruction-tuned checkpoints). Returns lm-eval's results dict.
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    if not tasks:
        raise ValueError("evaluate: give at least one task name")
    if include_path is not None and not os.path.isdir(include_path):
        raise ValueError(f"evaluate: include_path {include_path!r} is not a directory")
    task_manager = TaskManager(include_path=include_path)
    # lm-eval takes registered task/group/tag names and paths of task YAMLs.
    unknown = [t for t in tasks if t not in task_manager.all_tasks and not os.path.isfile(t)]
    if unknown:
        raise ValueError(f"evaluate: unknown lm-eval task(s) {unknown}, neither a task name (see "
                         "`lm_eval ls tasks`; add local task YAMLs with include_path) nor a YAML file")
    results = simple_evaluate(
        model="simoe", model_args={"pretrained": checkpoint}, tasks=list(tasks),
        batch_size=batch_size, limit=limit, num_fewshot=num_fewshot, task_manager=task_manager,
        apply_chat_template=apply_chat_template, log_samples=False,
    )
    os.makedirs(output_dir, exist_ok=True)
    save_json(results, os.path.join(output_dir, RESULTS_NAME), default=handle_non_serializable,
              ensure_ascii=False)
    return results
