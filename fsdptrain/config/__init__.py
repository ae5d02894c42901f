"""The run's configuration: typed keys with docs, loading and validation, and LLaMA-Factory's YAML and
template names translated into them."""
