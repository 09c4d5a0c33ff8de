"""Training: one readable loop for every stage, from one CPU to many GPUs (torchrun)."""
