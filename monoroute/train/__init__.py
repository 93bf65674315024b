"""Training: run config and presets, trainer, checkpoints and run directories, DDP/FSDP2, optimizers."""
