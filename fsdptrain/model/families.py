"""Which model families fsdptrain cannot train exactly, refused in one line before any weight is read.

FSDP2 shards per transformer block: each block is one unit whose parameters are gathered for its own forward and
backward. A module whose parameters sit in two blocks (Zamba2's shared transformer block, which every hybrid layer
calls) is sharded by the first block's unit and then again by the second's, and its weights are used while the other
unit holds them sharded: the run crashes in a DTensor operation, or loads nothing for the second copy. Such a model
is found from its structure (`shared_across_blocks`), so a family that transformers adds later is refused the same
way; `REASONS` only words the known ones in the user's terms. See docs/families.md.
"""

from __future__ import annotations

from torch import nn

from ..core.errors import UserError

# model_type -> why it cannot be trained, in the model's own terms (the structural finding is the check)
REASONS = {
    "zamba": "its shared attention block is used from several layers",
    "zamba2": "its shared transformer block is used from several layers",
}


def shared_across_blocks(model: nn.Module, blocks: list[nn.Module]) -> list[tuple[str, str, str]]:
    """(parameter name, first block, second block) for every parameter held by two blocks, by module name."""
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    owner: dict[int, str] = {}
    shared: list[tuple[str, str, str]] = []
    for block in blocks:
        block_name = names.get(id(block), type(block).__name__)
        for pname, p in block.named_parameters(remove_duplicate=False):
            first = owner.setdefault(id(p), block_name)
            if first != block_name and not any(s[0] == pname for s in shared):
                shared.append((pname, first, block_name))
    return shared


def check_trainable(model: nn.Module, blocks: list[nn.Module], model_type: str) -> None:
    """Refuse (one line, UserError) a model that per-block FSDP2 sharding cannot train exactly."""
    shared = shared_across_blocks(model, blocks)
    if shared:
        name, first, second = shared[0]
        reason = REASONS.get(model_type, "its layers share weights")
        raise UserError(f"model: {model_type}: {reason} ({first} and {second} hold the same '{name}'), which "
                        "FSDP2 per-block sharding cannot train; fsdptrain cannot train this family: use a model "
                        "whose layers do not share weights")
