"""Random ragged VIMPO batches for tests (float64 unless told otherwise)."""

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    logits: torch.Tensor      # (B, T, V)
    ref_logits: torch.Tensor  # (B, T, V)
    targets: torch.Tensor     # (B, T)
    mask: torch.Tensor        # (B, T) bool, contiguous prefix
    rewards: torch.Tensor     # (B,)
    group_ids: torch.Tensor   # (B,)
    old_logprobs: torch.Tensor  # (B, T)


def random_batch(lengths, group_ids, V=23, T=None, seed=0, dtype=torch.float64, rewards=None,
                 off_policy_scale=0.3) -> Batch:
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    T = T or max(max(lengths), 1)
    logits = torch.randn(B, T, V, generator=g, dtype=dtype) * 2.0
    ref_logits = logits + 0.5 * torch.randn(B, T, V, generator=g, dtype=dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    targets = targets.masked_fill(~mask, 0)
    if rewards is None:
        rewards = torch.randint(0, 2, (B,), generator=g).to(dtype)
    logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    old = (logp + off_policy_scale * torch.randn(B, T, generator=g, dtype=dtype)).masked_fill(~mask, 0.0)
    return Batch(logits, ref_logits, targets, mask, torch.as_tensor(rewards, dtype=dtype),
                 torch.as_tensor(group_ids), old)


def pad_to(b: Batch, T: int) -> Batch:
    """The same batch with extra padding columns (garbage logits there, mask 0)."""
    extra = T - b.mask.shape[1]
    B, _, V = b.logits.shape
    junk = torch.full((B, extra, V), 7.0, dtype=b.logits.dtype)
    return Batch(torch.cat([b.logits, junk], 1), torch.cat([b.ref_logits, -junk], 1),
                 torch.cat([b.targets, torch.zeros(B, extra, dtype=b.targets.dtype)], 1),
                 torch.cat([b.mask, torch.zeros(B, extra, dtype=torch.bool)], 1), b.rewards, b.group_ids,
                 torch.cat([b.old_logprobs, torch.zeros(B, extra, dtype=b.old_logprobs.dtype)], 1))


def permute(b: Batch, order) -> Batch:
    o = torch.as_tensor(order)
    return Batch(b.logits[o], b.ref_logits[o], b.targets[o], b.mask[o], b.rewards[o], b.group_ids[o],
                 b.old_logprobs[o])


def run_ranks(worker, world: int, args: tuple, timeout_s: float = 300.0) -> None:
    """Run `worker(rank, world, init_file, out_dir, *args)` in `world` spawned processes over a
    gloo process group rendezvoused through a file in `out_dir` (no port to collide on).

    Each child's stderr (and the traceback of any exception) goes to `<out_dir>/<rank>.err`;
    on a failure or a timeout the AssertionError carries every rank's stderr, so a flaky
    failure is never reported without its cause.
    """
    import os
    import torch.multiprocessing as mp

    out_dir = args[0]
    ctx = mp.start_processes(_rank_main, args=(worker, world, args), nprocs=world, join=False,
                             start_method="spawn")
    try:
        import time
        deadline = time.monotonic() + timeout_s
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"ranks still running after {timeout_s:.0f} s")
    except Exception as exc:
        logs = []
        for rank in range(world):
            path = os.path.join(out_dir, f"{rank}.err")
            text = open(path).read()[-4000:] if os.path.exists(path) else "(no stderr file)"
            logs.append(f"--- rank {rank} stderr ---\n{text}")
        raise AssertionError(f"{type(exc).__name__}: {exc}\n" + "\n".join(logs)) from exc


def _rank_main(rank, worker, world, args):
    import os
    import sys
    import traceback

    out_dir = args[0]
    err = open(os.path.join(out_dir, f"{rank}.err"), "w", buffering=1)
    os.dup2(err.fileno(), 2)  # C++ (gloo, c10) messages too, not only Python's
    sys.stderr = err
    try:
        worker(rank, world, os.path.join(out_dir, "rendezvous"), *args)
    except BaseException:
        traceback.print_exc()
        raise
