"""Drop-in use of the VIMPO loss and the fused kernels from other trainers.

    vimpo.integrations.trl   `VIMPOTrainer` / `VIMPOTRLConfig` (VIMPO inside TRL's GRPOTrainer)
                             and `FusedGRPOTrainer` (TRL's own GRPO/DAPO loss on our kernels).
    vimpo.integrations.verl  `register()`: a VIMPO policy loss and advantage estimator in verl's
                             registries, and a forward patch returning token stats from our kernels.

Each module imports its trainer on import and fails with a clear message when that trainer is
missing or outside the supported version range; this package imports neither.
See docs/integrations.md.
"""
