"""The training loop and what it needs: optimizer and schedule, checkpoints, metrics."""
