"""lm-evaluation-harness on a RAT+ model under a chosen attention pattern, offline.

Importing this module registers the model class ``ratplus`` with lm-eval, so besides ``ratplus eval --tasks
lm-eval:...`` the harness's own Python API runs it too:
``lm_eval.simple_evaluate(model="ratplus", model_args="pretrained=HF_FOLDER,pattern=16:256:4", tasks=[...])``.

Requests are answered with the reference model (fp32) under the pattern: a log-likelihood sums the log-softmax
of the continuation's tokens given the context (no BOS, as in training; an empty context is the EOS token,
as after the previous document); inputs longer than the model's window keep their last tokens; requests of
equal length run as one batch (the model takes no padding). Greedy generation uses the compressed decode cache.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from .models import LoadedModel, parse_patterns


@register_model("ratplus")
class RatPlusLM(LM):
    def __init__(self, pretrained: str | None = None, pattern: str = "own", batch_size: int | str = 8,
                 tokenizer: str | None = None, loaded: LoadedModel | None = None, **_unused):
        super().__init__()
        if loaded is None:
            from ..config.schema import PATTERN_KEYS
            from ..inference.generate import load_model

            if pretrained is None:
                raise ValueError("ratplus: model_args need pretrained=HF_FOLDER")
            model, tok = load_model(Path(pretrained), tokenizer=tokenizer)
            model = model.float().eval()
            loaded = LoadedModel(model, tok, Path(pretrained),
                                 {k: getattr(model.config, k) for k in PATTERN_KEYS if hasattr(model.config, k)})
            [head_pattern] = parse_patterns(str(pattern).replace(";", ","))[:1]
            loaded.set_pattern(head_pattern)
        self.loaded = loaded
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.eos = int(loaded.model.config.eos_token_id)

    # -- the three request types ------------------------------------------------------------------------------

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*req.args) for req in requests]
        return self._score([ctx + cont for ctx, cont in pairs], [len(cont) for _, cont in pairs])

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        span = self.loaded.max_length
        for req in requests:
            tokens = [self.eos] + self.loaded.encode(req.args[0])
            # disjoint windows of predicted tokens, each read from the start of its window
            windows = [tokens[start:start + span + 1] for start in range(0, len(tokens) - 1, span)]
            scores = self._score(windows, [len(w) - 1 for w in windows])
            out.append(sum(s for s, _ in scores))
        return out

    def generate_until(self, requests) -> list[str]:
        out = []
        model, tok = self.loaded.model, self.loaded.tokenizer
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            new = int(kwargs.get("max_gen_toks", 128))
            ids = (self.loaded.encode(context) or [self.eos])[-max(1, self.loaded.max_length - new):]
            ids = torch.tensor([ids])
            with torch.no_grad():
                seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                                     attention_mode="sparse", max_cache_len=ids.shape[1] + new,
                                     pad_token_id=self.eos)
            text = tok.decode(seq[0, ids.shape[1]:], skip_special_tokens=True)
            cut = min([text.find(u) for u in until if u and u in text], default=len(text))
            out.append(text[:cut])
        return out

    # -- helpers ------------------------------------------------------------------------------------------------

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation tokens as the whole string tokenizes (trailing spaces of the context move
        to the continuation, where a sentencepiece tokenizer attaches them to the next word)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return [self.eos], self.loaded.encode(continuation)
        whole, ctx = self.loaded.encode(context + continuation), self.loaded.encode(context)
        return ctx, whole[len(ctx):]

    def _score(self, sequences: list[list[int]], targets: list[int]) -> list[tuple[float, bool]]:
        """(sum of log-probabilities, all greedy) of the last ``targets[i]`` tokens of each sequence."""
        limit = self.loaded.max_length + 1
        sequences = [s[-limit:] for s in sequences]
        results: list[tuple[float, bool] | None] = [None] * len(sequences)
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        groups: list[list[int]] = []
        for i in order:
            if groups and len(sequences[groups[-1][0]]) == len(sequences[i]) and len(groups[-1]) < self.batch_size:
                groups[-1].append(i)
            else:
                groups.append([i])
        for group in groups:
            batch = torch.tensor([sequences[i] for i in group])
            logprobs = F.log_softmax(self.loaded.logits(batch[:, :-1]), dim=-1)
            for row, i in enumerate(group):
                n = min(targets[i], batch.shape[1] - 1)
                want = batch[row, -n:]
                lp = logprobs[row, -n:]
                results[i] = (float(lp.gather(-1, want[:, None]).sum()), bool((lp.argmax(-1) == want).all()))
        return results  # type: ignore[return-value]


def run_lm_eval(loaded: LoadedModel, tasks: list[str], *, include_path: str | None = None, limit: int | None = None,
                num_fewshot: int | None = None, batch_size: int = 8, log_samples: bool = False) -> dict:
    """``lm_eval.simple_evaluate`` on ``loaded`` under the pattern set on it, offline (datasets and hub in
    offline mode); returns lm-eval's result dict."""
    import os

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    # Indexing lm-eval's thousands of own task files takes minutes on a busy CPU: skipped when the include
    # folder defines every task asked for.
    local = _task_names(include_path) if include_path else set()
    manager = TaskManager(include_path=include_path, include_defaults=not set(tasks) <= local)
    return lm_eval.simple_evaluate(model=RatPlusLM(loaded=loaded, batch_size=batch_size), tasks=tasks,
                                   task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                                   log_samples=log_samples, bootstrap_iters=0)


def _task_names(folder: str) -> set[str]:
    """The ``task:`` names of the YAML files under ``folder``."""
    import yaml

    names = set()
    for path in Path(folder).rglob("*.yaml"):
        try:
            doc = yaml.safe_load(path.read_text())
        except yaml.YAMLError:
            continue
        if isinstance(doc, dict) and isinstance(doc.get("task"), str):
            names.add(doc["task"])
    return names
