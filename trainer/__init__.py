"""The training loop: Lightning module, run plan, checkpoints, metrics, callbacks, loggers."""
