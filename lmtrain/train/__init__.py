"""Training: state, optimizer, objectives (loss functions), the one jitted step, loop, checkpoints."""
