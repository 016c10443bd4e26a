"""The built-in evaluator for causal language models: perplexity on a held-out text file.

Documents: a `.txt` file is one document (the whole file); a `.jsonl` file has one document per line, its `text`
field. Each document is tokenized whole by the candidate's own tokenizer, with only the tokens that tokenizer adds
by default, and cut into windows of the model's context length without overlap (a window never spans two
documents). Perplexity = exp(mean negative log-likelihood of the predicted tokens: every token of a window but
its first). At most `max_tokens` tokens are fed to the model, the first ones of the file, in order. The model runs
in eval mode without gradients, on batches of windows of one length (no padding), so the number is the
same each time on the same device.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ckptavg.errors import InputError, UsageError, option
from ckptavg.tuning.evaluation import Evaluation

DEFAULT_MAX_TOKENS = 8192
BATCH_TOKENS = 2048  # tokens per forward pass: the logits of a batch are BATCH_TOKENS x vocabulary floats
METRICS = ("perplexity", "nll")  # perplexity is the score (lower is better); nll is its logarithm
INSTALL = "pip install 'ckptavg[eval]'"


def require_transformers() -> None:
    """Refuse the built-in evaluator, with the install command, where transformers is missing."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UsageError(None, f"{option('eval_text')}: the perplexity evaluator needs transformers: {INSTALL}") from None


def read_documents(path: Path) -> list[str]:
    """The documents of a .txt (the whole file) or .jsonl (each line's `text`) file, in file order."""
    if path.suffix.lower() not in (".txt", ".jsonl"):
        raise UsageError(path, f"{option('eval_text', path)}: expected a .txt or .jsonl file")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(path, "not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(path, f"cannot be read as UTF-8 text ({e})") from None
    if path.suffix.lower() == ".txt":
        documents = [text] if text.strip() else []
    else:
        documents = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise InputError(path, f"line {number} is not JSON") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise InputError(path, f"line {number} has no `text` string")
            documents.append(record["text"])
    if not any(d.strip() for d in documents):
        raise InputError(path, "holds no text to evaluate on")
    return documents


def windows(documents: list[list[int]], context: int, max_tokens: int) -> list[list[int]]:
    """The token ids of each document cut into windows of at most `context` tokens, without overlap, until
    `max_tokens` tokens are taken; windows of one token (nothing to predict) are dropped."""
    taken: list[list[int]] = []
    left = max_tokens
    for ids in documents:
        for start in range(0, len(ids), context):
            if left <= 0:
                return taken
            window = ids[start : start + min(context, left)]
            left -= len(window)
            if len(window) > 1:
                taken.append(window)
    return taken


def batches(cut: list[list[int]], tokens: int = BATCH_TOKENS) -> list[list[list[int]]]:
    """The windows in order, consecutive ones of the same length together, about `tokens` tokens a batch (one
    window at least): no padding, so each window is scored as it would be alone."""
    out: list[list[list[int]]] = []
    for window in cut:
        last = out[-1] if out else None
        if last and len(last[0]) == len(window) and (len(last) + 1) * len(window) <= tokens:
            last.append(window)
        else:
            out.append([window])
    return out


def context_length(config: object) -> int:
    """The longest input the model takes, from its config."""
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 1:
            return value
    raise InputError(None, "the model's config names no context length (max_position_embeddings, n_positions)")


@dataclass
class PerplexityEvaluator:
    """Scores candidate folders by perplexity on `text_file`; the token windows are made once, by the first
    candidate's tokenizer (every candidate carries the same tokenizer files, copied from the newest input)."""

    text_file: Path
    max_tokens: int = DEFAULT_MAX_TOKENS
    device: str = "auto"

    def __post_init__(self) -> None:
        self.text_file = Path(self.text_file)
        self._documents = read_documents(self.text_file)
        self._ids: list[list[int]] | None = None

    def __call__(self, model_dir: Path) -> Evaluation:
        started = time.perf_counter()
        try:
            nll, tokens = self.score(Path(model_dir))
        except (OSError, ValueError, RuntimeError, InputError) as e:
            return Evaluation(seconds=time.perf_counter() - started, failure=f"perplexity: {_one_line(e)}")
        metrics = {"perplexity": math.exp(nll), "nll": nll, "tokens": float(tokens)}
        return Evaluation(metrics, metrics["perplexity"], time.perf_counter() - started)

    def score(self, model_dir: Path) -> tuple[float, int]:
        """(mean negative log-likelihood, predicted tokens) of the model in `model_dir`."""
        import torch
        import transformers

        from ckptavg.averaging import choose_device

        device = choose_device(self.device)
        with _quiet_transformers():
            model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
            model.to(device).eval()
            if self._ids is None:
                tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
                # A document longer than the model's context is expected (it is cut into windows).
                self._ids = [list(tokenizer(text)["input_ids"]) for text in self._documents]
        cut = windows(self._ids, context_length(model.config), self.max_tokens)
        if not cut:
            raise InputError(self.text_file, "too short: no window of two tokens or more to predict")
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in batches(cut):
                ids = torch.tensor(batch, device=device)
                logits = model(input_ids=ids).logits[:, :-1].float()
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
                total += float(loss.double())
                count += ids[:, 1:].numel()
        del model
        return total / count, count


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No loading bars or warnings from transformers on ckptavg's stderr while a candidate is loaded."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _one_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
