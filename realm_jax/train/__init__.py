"""Training: state, the jitted step, the loop, checkpoints."""
