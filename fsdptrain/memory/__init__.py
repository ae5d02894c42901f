"""Memory, in three parts that do not import one another (tests/test_layers.py keeps them apart):

- at run time: stats.py (the record schema: CUDA allocator or CPU RSS), snapshot.py (CUDA allocation
  history, snapshot files and their classification), tracker.py (per-phase records, the per-log-step
  gather across ranks, the OOM post-mortem);
- offline tools that read a run's files: report.py (`fsdptrain mem report`), diff.py (`fsdptrain mem diff`);
  they share snapshot.py's reader with the post-mortem;
- the analytic estimator: estimate.py (`fsdptrain estimate`, and the activation_checkpointing `auto` planner).
"""
