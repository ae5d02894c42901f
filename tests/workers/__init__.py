"""Worker scripts the tests launch under torchrun (python -m tests.workers.NAME)."""
