"""The pieces a training step is made of: the sharded model (parallelize, build), the optimizer and its
schedule (and its host-memory variant), and evaluation."""
