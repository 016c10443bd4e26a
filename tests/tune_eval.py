"""A user's evaluation script for `ckptavg tune --eval`, written independently of ckptavg: the perplexity of a
causal LM folder on a text file, from the model's own loss (labels=) over windows of its context without overlap,
the first TOKENS tokens. Prints {"perplexity": ..., "nll": ...} on its last line.

    python tune_eval.py MODEL TEXT TOKENS
"""

from __future__ import annotations

import json
import math
import sys


def perplexity(model_dir: str, text_file: str, tokens: int) -> tuple[float, float, int]:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with open(text_file, encoding="utf-8") as f:
        ids = transformers.AutoTokenizer.from_pretrained(model_dir)(f.read())["input_ids"][:tokens]
    context = model.config.n_positions
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), context):
            window = torch.tensor([ids[start : start + context]])
            if window.shape[1] > 1:
                total += model(input_ids=window, labels=window).loss.double().item() * (window.shape[1] - 1)
                count += window.shape[1] - 1
    return math.exp(total / count), total / count, count


if __name__ == "__main__":
    print("loading", sys.argv[1], file=sys.stderr)
    ppl, nll, _ = perplexity(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    print(json.dumps({"perplexity": ppl, "nll": nll}))
