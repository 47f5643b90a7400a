"""The simulator: rounds, sampling, executors, evaluation, checkpoints."""
