"""How a model's layers are split over pipeline stages: the one rule the planner, the cost model
and the executor share (a plan's stages carry the split; this is the split when none is given)."""

from __future__ import annotations


def split_layers(num_layers: int, stages: int) -> tuple[int, ...]:
    """Layers per stage, in stage order: even, the remainder to the middle stages first, then to
    the first and last stages (they also carry the embedding and the vocabulary projection with
    the loss). 70 layers on 12 stages: 5, 6 x 10, 5 (BLOOM-176B's split)."""
    if not 1 <= stages <= num_layers:
        raise ValueError(f"{stages} pipeline stages for {num_layers} layers")
    base, extra = divmod(num_layers, stages)
    counts = [base] * stages
    order = list(range(1, stages - 1)) + [0, stages - 1] if stages > 2 else list(range(stages))
    for i in order[:extra]:
        counts[i] += 1
    return tuple(counts)


def layer_ranges(counts: tuple[int, ...] | list[int]) -> list[tuple[int, int]]:
    """[first, last) layer range of each stage, from its layer count."""
    out, first = [], 0
    for n in counts:
        out.append((first, first + n))
        first += n
    return out
