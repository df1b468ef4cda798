"""Run by test_distributed.py under `torch.distributed.run --nproc-per-node 2` (gloo, CPU).

Every rank builds the same tiny policy/reference pair and the same batch of responses. Rank 0
first computes the single-process loss and gradients on the whole batch. Then the model is
sharded with FSDP2 (`vimpo.model.shard`), each rank takes its half of the prompt groups, and the
loss is computed with the trainer's global normalisers. The sum of the rank losses and the
gathered gradients must equal the single-process ones. With the adaptive actor coefficient
(`vimpo-adaptive`), each rank's statistics pass covers its own rows and the sums are
all-reduced, so the coefficient must equal the single-process one too. Results go to argv[1]
(rank 0).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from vimpo import adaptive
from vimpo.model import PolicyWithReference, frozen_copy, load_policy, shard
from vimpo.rollout import Rollouts
from vimpo.train_config import load_config
from vimpo.trainer import build_batch
from vimpo_kernels.vimpo_loss import group_mean, grpo_advantages


def make_batch(tok, n_groups=4, n=4, seed=0):
    """Fixed responses of varied lengths (1..4 tokens, some ending in EOS), fixed 0/1 rewards."""
    g = torch.Generator().manual_seed(seed)
    prompts, responses = [], []
    for j in range(n_groups):
        prompt = tok(f"{j * 7}+{j + 3}=").input_ids
        for _ in range(n):
            length = int(torch.randint(1, 5, (1,), generator=g))
            resp = torch.randint(3, 13, (length,), generator=g).tolist()
            if torch.rand(1, generator=g) < 0.5:
                resp[-1] = tok.eos_token_id
            prompts.append(prompt)
            responses.append(resp)
    rewards = torch.randint(0, 2, (n_groups * n,), generator=g).float()
    groups = torch.arange(n_groups).repeat_interleave(n)
    return Rollouts(prompts, responses, [], []), rewards, groups


def adaptive_coeff(net, roll, rows, rewards, groups, cfg, extra, num_tokens, num_sequences, group):
    """The trainer's statistics pass on this process's rows, sums all-reduced, one EMA step."""
    batch = build_batch(roll, rows, 0, "cpu")
    idx = torch.tensor(rows)
    stats = net(batch, config=cfg, backend="torch", token_stats=True)
    sums = adaptive.micro_batch_sums(stats, batch.mask, rewards[idx], groups[idx], cfg, num_tokens=num_tokens,
                                     num_sequences=num_sequences, process_group=group,
                                     **{k: v[idx] for k, v in extra.items()})
    if group is not None:
        dist.all_reduce(sums, group=group)
    return adaptive.AdaptiveCoeff().update(sums, cfg)[0]


def loss_and_grads(net, roll, rows, rewards, groups, cfg, extra, num_tokens, num_sequences, world, group):
    batch = build_batch(roll, rows, 0, "cpu")
    idx = torch.tensor(rows)
    if cfg.adaptive_actor_coeff:
        cfg = adaptive.fixed(cfg, adaptive_coeff(net, roll, rows, rewards, groups, cfg, extra, num_tokens,
                                                 num_sequences, group))
        loss_and_grads.coeff = cfg.actor_coeff
    loss, _ = net(batch, rewards[idx], groups[idx], config=cfg, backend="torch",
                  num_tokens=num_tokens, num_sequences=num_sequences, process_group=group,
                  **{k: v[idx] for k, v in extra.items()})
    (loss * world).backward()
    return loss.detach()


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for case in ("vimpo", "vimpo-adaptive", "grpo"):
        algorithm = case.split("-")[0]
        cfg = load_config(None, ["data.toy_task=addition", "reward.noise_flip_prob=0.0", "model.toy_hidden_size=64", "model.toy_layers=2", "model.toy_heads=2",
                                 f"algorithm.name={algorithm}",
                                 f"algorithm.recipe={'default' if case == 'vimpo-adaptive' else 'paper'}"])
        loss_cfg = cfg.loss_config(beta=0.1 if case == "vimpo-adaptive" else None)
        assert loss_cfg.adaptive_actor_coeff == (case == "vimpo-adaptive")
        policy, tok = load_policy(cfg.model, seed=0)
        with torch.no_grad():  # make the reference differ from the policy, so the KL is non-zero
            reference = frozen_copy(policy)
            for p in reference.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        roll, rewards, groups = make_batch(tok)
        extra = ({"advantages": grpo_advantages(rewards, groups, norm_by_std=True)} if loss_cfg.is_grpo_family
                 else {"baseline": group_mean(rewards, groups)})
        all_rows = list(range(len(roll.response_ids)))
        num_tokens = float(sum(len(r) for r in roll.response_ids))

        single = PolicyWithReference(policy, reference)
        ref_loss = loss_and_grads(single, roll, all_rows, rewards, groups, loss_cfg, extra, num_tokens,
                                  float(len(all_rows)), 1, None)
        ref_grads = {k: p.grad.clone() for k, p in single.policy.named_parameters()}
        single.policy.zero_grad(set_to_none=True)
        single_coeff = getattr(loss_and_grads, "coeff", None)

        net = shard(PolicyWithReference(policy, reference), mesh=init_device_mesh("cpu", (world,)))
        half = len(all_rows) // world  # whole prompt groups per rank (4 groups of 4)
        mine = all_rows[rank * half:(rank + 1) * half]
        loss = loss_and_grads(net, roll, mine, rewards, groups, loss_cfg, extra, num_tokens,
                              float(len(all_rows)), world, dist.group.WORLD)
        dist.all_reduce(loss)
        grads = {k: p.grad.full_tensor() for k, p in net.policy.named_parameters()}
        if rank == 0:
            results[case] = {"single_loss": ref_loss, "fsdp_loss": loss, "single_grads": ref_grads,
                             "fsdp_grads": grads}
            if case == "vimpo-adaptive":
                results[case]["coeffs"] = torch.tensor([single_coeff, loss_and_grads.coeff], dtype=torch.float64)
    if rank == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
