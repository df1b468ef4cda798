"""Offline fixtures for the trainer integrations: a tiny Qwen2 built from a config and saved
to disk (TRL loads the policy and the reference from that path), a word-level tokenizer built
with `tokenizers`, an in-memory prompt set and a reward that varies between completions."""

import pytest
import torch

from integration_helpers import VOCAB, require_module


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
