"""Hand-made examples whose target counts differ a lot between the two ranks' halves of each batch."""

from fsdptrain.data.encode import IGNORE, Example


def uneven_examples(n_groups: int = 8) -> list[Example]:
    out = []
    for g in range(n_groups):
        for j in range(4):
            long = j < 2  # with shuffle off and 2 ranks x micro 2, rank 0 gets the long-target pair
            n_prompt = 5 + (g + j) % 3
            n_target = 40 + g if long else 1
            ids = [(7 * g + 3 * j + k) % 90 + 4 for k in range(n_prompt + n_target)]
            labels = [IGNORE] * n_prompt + ids[n_prompt:]
            out.append(Example(ids, labels))
    return out
