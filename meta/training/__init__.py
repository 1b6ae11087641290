"""Training: structured configs, builders, run logs and checkpoints for scripts/train_maml.py."""
