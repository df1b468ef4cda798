"""Fixtures and helpers shared by the integration tests, imported by name (a conftest.py here
would shadow the `conftest` module that the top-level tests import).

Offline: a tiny Qwen2 built from a config and saved to disk (TRL loads the policy and the
reference from that path), a word-level tokenizer built with `tokenizers`, an in-memory prompt
set and a reward that varies between completions.
"""

import importlib
import os

import pytest
import torch

VOCAB = ["<pad>", "<eos>", *"abcdefghij "]


def require_module(name: str):
    """Import `name`; skip locally when it is missing, fail in CI (which installs the extras)."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        msg = f"{name} is not importable ({exc}); install the integration extras"
        if os.environ.get("CI"):
            pytest.fail(msg + " (CI must run the integration tests)")
        pytest.skip(msg)


def hashed_text_reward(completions, **_):
    """Outcome reward in [0, 1) that differs between almost any two completions, so group
    baselines and advantages are not all equal (a test on constant rewards could not catch a
    wrong grouping)."""
    return [(sum(ord(c) for c in text if c != " ") % 7) / 7.0 for text in completions]


def trl_common_args(tmp_path, **overrides):
    """Arguments shared by every TRL test: CPU, fp32, no logging backends, nothing saved."""
    return dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                max_completion_length=5, use_cpu=True, bf16=False, report_to=[], logging_steps=1,
                save_strategy="no", learning_rate=1e-2, temperature=0.9, seed=0, **overrides)


@pytest.fixture(scope="session")
def tokenizer():
    require_module("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    word_level = Tokenizer(models.WordLevel({tok: i for i, tok in enumerate(VOCAB)}, unk_token="<pad>"))
    word_level.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    tok = PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", eos_token="<eos>")
    tok.padding_side = "left"  # TRL left-pads prompts
    return tok


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """H=24 (not a power of 2), V=13 (odd), 2 layers, untied head."""
    require_module("transformers")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=len(VOCAB), hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=False, eos_token_id=1, pad_token_id=0, bos_token_id=None)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_qwen2")
    Qwen2ForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def prompt_dataset():
    datasets = require_module("datasets")
    return datasets.Dataset.from_dict({"prompt": ["abc", "hij", "dd", "jab"]})
