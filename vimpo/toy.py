"""The embedded toy tasks: arithmetic with exactly checkable answers.

* `addition` (the default): a prompt is `a+b=` (a, b in [0, toy_max_operand]), the answer the
  decimal sum followed by the end-of-sequence token (3-4 tokens). Vocabulary: 15 symbols (3
  specials, 10 digits, `+`, `=`).
* `carry`: written-out column addition of two 3-digit numbers, a task where credit assignment
  matters. The prompt is `047+285=`; the answer works the columns from the right, writing the
  carry-in of every column explicitly and every column sum as two digits, then the result:
  `7+5+0=12;4+8+1=13;0+2+1=03;332` (28-31 tokens, plus end-of-sequence). A wrong carry is one
  token; everything after it is then wrong, and only the whole answer is rewarded. Vocabulary:
  16 symbols (`;` added).

Tokenizers are built with the `tokenizers` library, so nothing is downloaded. Pairs are split
into train and held-out by a hash of the pair, so evaluation always uses pairs never seen in
training.
"""

from __future__ import annotations

import hashlib
import random
from typing import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

SPECIALS = ("<pad>", "<bos>", "<eos>")
SYMBOLS = tuple("0123456789+=")
TASK_SYMBOLS = {"addition": SYMBOLS, "carry": SYMBOLS + (";",)}
TASKS = tuple(TASK_SYMBOLS)
TASK_MAX_POSITIONS = {"addition": 32, "carry": 64}
CARRY_DIGITS = 3
CARRY_TRAIN_SIZE = 20000
"""Training pairs of the `carry` task (a fixed sample of its ~800k training pairs)."""
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
EVAL_SHARE = 0.2
"""Share of all (a, b) pairs reserved for evaluation."""


def _check_task(task: str) -> None:
    if task not in TASK_SYMBOLS:
        raise ValueError(f"toy task must be one of {TASKS}, got {task!r}")


def build_tokenizer(task: str = "addition"):
    """A `PreTrainedTokenizerFast` over single characters; every encoding starts with <bos>."""
    from transformers import PreTrainedTokenizerFast

    _check_task(task)
    vocab = {tok: i for i, tok in enumerate(SPECIALS + TASK_SYMBOLS[task])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.add_special_tokens(list(SPECIALS))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS_ID)])
    tok.decoder = decoders.Fuse()
    # Left padding: generation appends to the right end of every row.
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", padding_side="left")


def tiny_model_config(hidden_size: int = 128, layers: int = 2, heads: int = 4, max_positions: int | None = None,
                      task: str = "addition"):
    """A Llama-architecture config small enough to train on two CPU cores in minutes."""
    from transformers import LlamaConfig

    _check_task(task)
    return LlamaConfig(
        vocab_size=len(SPECIALS) + len(TASK_SYMBOLS[task]), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_positions or TASK_MAX_POSITIONS[task], tie_word_embeddings=True,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, rms_norm_eps=1e-5)


def _uniform(tag: str) -> float:
    h = hashlib.blake2b(tag.encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2 ** 64


def is_eval_pair(a: int, b: int, task: str = "addition") -> bool:
    """Deterministic, seed-free split: the same pairs are held out on every machine."""
    return _uniform(f"{a}+{b}" if task == "addition" else f"{task}:{a}+{b}") < EVAL_SHARE


def teacher_answer(a: int, b: int, error_rate: float) -> str:
    """The warm start's demonstration: a sloppy teacher who is off by one on a fixed share
    `error_rate` of the pairs. Above 0.5 the imitated mode is wrong, so a warm-started model
    decodes mostly wrong answers greedily while sampling the right one often enough for
    reinforcement learning with the exact verifier to find and prefer it."""
    return str(a + b + 1) if _uniform(f"teacher:{a}+{b}") < error_rate else str(a + b)


def problems(split: str, max_operand: int = 99, teacher_error: float = 0.0, task: str = "addition") -> list[dict]:
    """The records {prompt, answer, demo} of a split, in a fixed order: every (a, b) pair of
    the split (`addition`), or a fixed sample of `CARRY_TRAIN_SIZE` pairs (`carry` train).

    `answer` is the truth (what the reward checks); `demo` is what the warm start imitates."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    _check_task(task)
    if task == "carry":
        return carry_problems(split, CARRY_TRAIN_SIZE, teacher_error, seed=0)
    want_eval = split == "eval"
    return [{"prompt": f"{a}+{b}=", "answer": str(a + b), "demo": teacher_answer(a, b, teacher_error)}
            for a in range(max_operand + 1) for b in range(max_operand + 1) if is_eval_pair(a, b) == want_eval]


def eval_problems(max_operand: int, size: int, seed: int = 1234, task: str = "addition") -> list[dict]:
    """A fixed random subset of the held-out pairs (the same for every run)."""
    _check_task(task)
    if task == "carry":
        return carry_problems("eval", size, 0.0, seed=seed)
    recs = problems("eval", max_operand)
    random.Random(seed).shuffle(recs)
    return recs[:size]


def toy_reward(prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str]) -> list[float]:
    """1.0 when the completion is exactly the sum (whitespace ignored), else 0.0."""
    return [1.0 if c.strip() == a.strip() else 0.0 for c, a in zip(completions, answers)]


# ---------------------------------------------------------------------------------------------
# The `carry` task: written-out column addition
# ---------------------------------------------------------------------------------------------

def carry_solution(a: int, b: int, forget_carries: bool = False) -> str:
    """`7+5+0=12;4+8+1=13;0+2+1=03;332` for 047+285: columns from the right, each with its
    carry-in and a two-digit sum, then the result. With `forget_carries` every carry-in is
    written as 0 (the sloppy teacher's mistake), and the result follows that working."""
    da, db = f"{a:0{CARRY_DIGITS}d}"[::-1], f"{b:0{CARRY_DIGITS}d}"[::-1]
    carry, columns, units = 0, [], []
    for x, y in zip(da, db):
        c = 0 if forget_carries else carry
        s = int(x) + int(y) + c
        columns.append(f"{x}+{y}+{c}={s:02d}")
        units.append(str(s % 10))
        carry = s // 10
    result = str(int(("1" if carry else "") + "".join(reversed(units))))
    return ";".join(columns) + ";" + result


def carry_problems(split: str, size: int, teacher_error: float, seed: int) -> list[dict]:
    """`size` distinct pairs of the split drawn by a seeded generator (a fixed list)."""
    rng = random.Random(f"carry:{split}:{seed}")
    top = 10 ** CARRY_DIGITS
    want_eval = split == "eval"
    seen, recs = set(), []
    while len(recs) < size:
        a, b = rng.randrange(top), rng.randrange(top)
        if (a, b) in seen or is_eval_pair(a, b, "carry") != want_eval:
            continue
        seen.add((a, b))
        forget = _uniform(f"teacher:carry:{a}+{b}") < teacher_error
        recs.append({"prompt": f"{a:0{CARRY_DIGITS}d}+{b:0{CARRY_DIGITS}d}=", "answer": carry_solution(a, b),
                     "demo": carry_solution(a, b, forget_carries=forget)})
    return recs
