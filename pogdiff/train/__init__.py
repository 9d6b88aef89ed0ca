"""The training loop and its components: checkpoints, EMA, metrics, validation."""
