"""A real transformers.Trainer run of a tiny causal LM for `tune`: a word-level tokenizer built here (no
download), a GPT-2 of one layer trained on CPU at a high constant learning rate, so that its last checkpoints are
noisy and an average of them beats the newest one; plus held-out text from the same source."""

from __future__ import annotations

import random
from pathlib import Path

import torch

NOUNS = "cat dog bird fish horse mouse child teacher farmer doctor".split()
VERBS = "sees finds follows helps likes feeds watches calls".split()
ADJECTIVES = "small big old young happy quiet red green".split()
PLACES = "garden house river field school market".split()


def sentences(seed: int, count: int) -> list[str]:
    """Sentences of a small grammar: words depend on each other, so a model can learn something in a few steps."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        noun, other = rng.choice(NOUNS), rng.choice(NOUNS)
        adjective = ADJECTIVES[NOUNS.index(noun) % len(ADJECTIVES)] if rng.random() < 0.7 else rng.choice(ADJECTIVES)
        verb = VERBS[NOUNS.index(other) % len(VERBS)] if rng.random() < 0.7 else rng.choice(VERBS)
        out.append(f"the {adjective} {noun} {verb} the {other} in the {rng.choice(PLACES)} .")
    return out


def tokenizer():
    """A word-level fast tokenizer over the grammar's words."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<eos>", "the", "in", ".", *NOUNS, *VERBS, *ADJECTIVES, *PLACES]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>", model_max_length=32)


def tiny_lm_run(root: Path, steps: int = 144, save_every: int = 12) -> tuple[Path, Path]:
    """Train, saving checkpoint-12 ... checkpoint-144 (12 folders, each with its tokenizer); returns the run folder
    and a held-out .txt file."""
    import transformers

    torch.manual_seed(0)
    tok = tokenizer()
    config = transformers.GPT2Config(
        vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=32, bos_token_id=1, eos_token_id=1
    )
    model = transformers.GPT2LMHeadModel(config)
    ids = tok(" ".join(sentences(0, 400)))["input_ids"]
    data = [
        {"input_ids": torch.tensor(ids[i : i + 32]), "labels": torch.tensor(ids[i : i + 32])} for i in range(0, len(ids) - 32, 32)
    ]
    args = transformers.TrainingArguments(
        output_dir=str(root),
        max_steps=steps,
        save_steps=save_every,
        save_only_model=True,
        logging_steps=save_every,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        warmup_steps=0,
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data, processing_class=tok, data_collator=transformers.default_data_collator
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains faster on one thread, and much faster on a busy machine
    try:
        trainer.train()
    finally:
        torch.set_num_threads(threads)
    held_out = root.parent / "held_out.txt"
    held_out.write_text(" ".join(sentences(1, 120)) + "\n")
    return root, held_out
