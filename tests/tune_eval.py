"""A user's evaluation script for `ckptavg tune --eval`, written independently of ckptavg and of transformers'
evaluation code: the perplexity of a GPT-2 folder on a text file, over windows of its context without overlap,
the first TOKENS tokens. Run as a script, it computes GPT-2's forward pass itself from model.safetensors and
config.json (torch, safetensors and tokenizers only: it starts in a moment); `perplexity` gives the same number
from transformers' own loss (labels=), as the tests' reference. Prints {"perplexity": ..., "nll": ...}.

    python tune_eval.py MODEL TEXT TOKENS
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def perplexity(model_dir: str, text_file: str, tokens: int) -> tuple[float, float, int]:
    """(perplexity, mean NLL, predicted tokens) from transformers' loss of each window."""
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


def gpt2_perplexity(model_dir: str, text_file: str, tokens: int) -> tuple[float, float, int]:
    """The same, with GPT-2 written out: pre-norm blocks, causal attention, tanh GELU, the head tied to wte."""
    import torch
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    folder = Path(model_dir)
    config = json.loads((folder / "config.json").read_text())
    w = {k.removeprefix("transformer."): v.double() for k, v in load_file(folder / "model.safetensors").items()}
    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(Path(text_file).read_text(encoding="utf-8")).ids[:tokens]
    heads, eps, context = config["n_head"], config.get("layer_norm_epsilon", 1e-5), config["n_positions"]

    def norm(x, name):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"], eps)

    def gelu(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    def forward(window):
        n = len(window)
        x = w["wte.weight"][window] + w["wpe.weight"][:n]
        for layer in range(config["n_layer"]):
            p = f"h.{layer}"
            q, k, v = (norm(x, f"{p}.ln_1") @ w[f"{p}.attn.c_attn.weight"] + w[f"{p}.attn.c_attn.bias"]).split(x.shape[-1], -1)
            q, k, v = (t.view(n, heads, -1).transpose(0, 1) for t in (q, k, v))
            scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            attended = (scores.softmax(-1) @ v).transpose(0, 1).reshape(n, -1)
            x = x + attended @ w[f"{p}.attn.c_proj.weight"] + w[f"{p}.attn.c_proj.bias"]
            hidden = gelu(norm(x, f"{p}.ln_2") @ w[f"{p}.mlp.c_fc.weight"] + w[f"{p}.mlp.c_fc.bias"])
            x = x + hidden @ w[f"{p}.mlp.c_proj.weight"] + w[f"{p}.mlp.c_proj.bias"]
        return norm(x, "ln_f") @ w["wte.weight"].T

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), context):
            window = torch.tensor(ids[start : start + context])
            if len(window) > 1:
                logits = forward(window)[:-1]
                total += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
                count += len(window) - 1
    return math.exp(total / count), total / count, count


if __name__ == "__main__":
    print("scoring", sys.argv[1], file=sys.stderr)
    ppl, nll, _ = gpt2_perplexity(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    print(json.dumps({"perplexity": ppl, "nll": nll}))
