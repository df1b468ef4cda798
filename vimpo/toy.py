"""The embedded toy task: two-number addition with exactly checkable answers.

A prompt is `a+b=` (a, b in [0, toy_max_operand]), the answer the decimal sum followed by the
end-of-sequence token. The vocabulary is 15 symbols (3 specials, 10 digits, `+`, `=`), built
with the `tokenizers` library, so nothing is downloaded. Pairs are split into train and
held-out by a hash of the pair, so evaluation always uses sums never seen in training.
"""

from __future__ import annotations

import hashlib
import random
from typing import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

SPECIALS = ("<pad>", "<bos>", "<eos>")
SYMBOLS = tuple("0123456789+=")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
EVAL_SHARE = 0.2
"""Share of all (a, b) pairs reserved for evaluation."""


def build_tokenizer():
    """A `PreTrainedTokenizerFast` over single characters; every encoding starts with <bos>."""
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + SYMBOLS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.add_special_tokens(list(SPECIALS))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS_ID)])
    tok.decoder = decoders.Fuse()
    # Left padding: generation appends to the right end of every row.
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", padding_side="left")


def tiny_model_config(hidden_size: int = 128, layers: int = 2, heads: int = 4, max_positions: int = 32):
    """A Llama-architecture config small enough to train on two CPU cores in minutes."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(SPECIALS) + len(SYMBOLS), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_positions, tie_word_embeddings=True, pad_token_id=PAD_ID,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, rms_norm_eps=1e-5)


def _uniform(tag: str) -> float:
    h = hashlib.blake2b(tag.encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2 ** 64


def is_eval_pair(a: int, b: int) -> bool:
    """Deterministic, seed-free split: the same pairs are held out on every machine."""
    return _uniform(f"{a}+{b}") < EVAL_SHARE


def teacher_answer(a: int, b: int, error_rate: float) -> str:
    """The warm start's demonstration: a sloppy teacher who is off by one on a fixed share
    `error_rate` of the pairs. Above 0.5 the imitated mode is wrong, so a warm-started model
    decodes mostly wrong answers greedily while sampling the right one often enough for
    reinforcement learning with the exact verifier to find and prefer it."""
    return str(a + b + 1) if _uniform(f"teacher:{a}+{b}") < error_rate else str(a + b)


def problems(split: str, max_operand: int = 99, teacher_error: float = 0.0) -> list[dict]:
    """Every (a, b) pair of the split as records {prompt, answer, demo}, in a fixed order.

    `answer` is the truth (what the reward checks); `demo` is what the warm start imitates."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    want_eval = split == "eval"
    return [{"prompt": f"{a}+{b}=", "answer": str(a + b), "demo": teacher_answer(a, b, teacher_error)}
            for a in range(max_operand + 1) for b in range(max_operand + 1) if is_eval_pair(a, b) == want_eval]


def eval_problems(max_operand: int, size: int, seed: int = 1234) -> list[dict]:
    """A fixed random subset of the held-out pairs (the same for every run)."""
    recs = problems("eval", max_operand)
    random.Random(seed).shuffle(recs)
    return recs[:size]


def toy_reward(prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str]) -> list[float]:
    """1.0 when the completion is exactly the sum (whitespace ignored), else 0.0."""
    return [1.0 if c.strip() == a.strip() else 0.0 for c, a in zip(completions, answers)]
