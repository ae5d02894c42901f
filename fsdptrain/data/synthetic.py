"""Generated instruction data a tiny model can visibly learn: reverse, add, sort.

Deterministic for a given seed, so every rank generates the same examples.
"""

from __future__ import annotations

import random
import string


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 10)))
    return f"reverse: {word}", word[::-1]


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return f"add: {a}+{b}", str(a + b)


def _sort(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 10)))
    return f"sort: {word}", "".join(sorted(word))


TASKS = {"reverse": _reverse, "add": _add, "sort": _sort}


def generate(task: str, n: int, seed: int) -> list[list[dict]]:
    """n single-turn conversations (OpenAI-style messages) for `task`."""
    rng = random.Random(f"{task}-{seed}")
    out = []
    for _ in range(n):
        prompt, answer = TASKS[task](rng)
        out.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])
    return out
