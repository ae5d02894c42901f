"""`python -m fsdptrain ...` (also what `torchrun ... -m fsdptrain ...` runs)."""

from .cli import main

main(prog_name="fsdptrain")
