"""Our model directories as a model of EleutherAI's lm-evaluation-harness: every variant the pipeline makes
(any normalization, pruned, int8, int4), not only those `transformers` has an architecture for.

    python -m lm.harness run --model llm-pipeline --model_args pretrained=models/distill \
        --include_path lm/harness_tasks --tasks pipeline_python_idioms,pipeline_python_snippets

(lm_eval's own CLI, after this module has registered the model type `llm-pipeline`.) The tasks in
lm/harness_tasks read local files; any harness task works where its data can be had."""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tokenizers import Tokenizer

from lm import model_dir


@register_model("llm-pipeline")
class PipelineLM(LM):
    """Scores with the model's full context window: a request longer than block_size keeps its last tokens."""

    def __init__(self, pretrained: str, batch_size: int | str = 16, device: str | None = None, **_):
        super().__init__()
        if not device or (device.startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # the harness asks for cuda by default
        path = Path(pretrained)
        self.model = model_dir.load(path).to(device).eval()
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        specials = [t for t in json.loads((path / "tokenizer.json").read_text())["added_tokens"] if t["special"]]
        self.eos_id = specials[0]["id"]
        self.block_size = self.model.config.block_size
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16  # "auto" -> 16
        self.on = device

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    @torch.no_grad()
    def _continuation_logprobs(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """For each (context ids, continuation ids): the continuation's summed log-probability and whether it is
        the greedy choice at every position."""
        results = []
        for start in range(0, len(pairs), self.batch_size):
            batch = pairs[start : start + self.batch_size]
            windows = [(ctx + cont)[-(self.block_size + 1) :][:-1] for ctx, cont in batch]
            width = max(map(len, windows))
            idx = torch.full((len(batch), width), self.eos_id, dtype=torch.long)
            for row, window in enumerate(windows):
                idx[row, : len(window)] = torch.tensor(window)
            logprobs = F.log_softmax(self.model(idx.to(self.on)).float(), dim=-1).cpu()
            for row, ((_, cont), window) in enumerate(zip(batch, windows, strict=True)):
                positions = range(len(window) - len(cont), len(window))
                scores = logprobs[row, list(positions)]  # predicts cont
                target = torch.tensor(cont)
                total = scores.gather(1, target[:, None]).sum().item()
                results.append((total, bool((scores.argmax(-1) == target).all())))
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = []
        for request in requests:
            context, continuation = request.args
            # the boundary's whitespace belongs to the continuation, as the harness's own HF model does it
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            ctx = self.encode(context) if context else [self.eos_id]
            whole = self.encode(context + continuation)
            pairs.append((whole[: len(ctx)], whole[len(ctx) :] or self.encode(continuation)))
        return self._continuation_logprobs(pairs)

    def loglikelihood_rolling(self, requests) -> list[float]:
        """A document's log-probability, scored in block_size windows, each token predicted once."""
        totals = []
        for request in requests:
            (text,) = request.args
            ids = [self.eos_id, *self.encode(text)]
            starts = range(1, len(ids), self.block_size)
            pairs = [(ids[:start], ids[start : start + self.block_size]) for start in starts]
            totals.append(sum(score for score, _ in self._continuation_logprobs(pairs)))
        return totals

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        """Greedy continuation, cut at the first stop string."""
        outputs = []
        for request in requests:
            context, kwargs = request.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else until
            idx = torch.tensor([self.encode(context)[-self.block_size :] or [self.eos_id]], device=self.on)
            new = self.model.generate(idx, int(kwargs.get("max_gen_toks", 64)), temperature=0)[0, idx.shape[1] :]
            ids = new.tolist()
            text = self.tokenizer.decode(ids[: ids.index(self.eos_id)] if self.eos_id in ids else ids)
            for stop in until:
                text = text.split(stop)[0]
            outputs.append(text)
        return outputs


if __name__ == "__main__":
    import lm_eval.models  # noqa: F401 - the harness's own model types (hf, ...) stay available beside ours
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
