"""A run's outputs: checkpoints and resume, the run directory, Hugging Face export, metrics and their
sinks, and plots."""
