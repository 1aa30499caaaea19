"""Teacher-output formats (shared by planner and executor through the schema).

``dense``            the full distribution, V values per token at the compute precision;
``topk:K``           the K largest teacher log-probabilities (16-bit values) + their indices,
                     plus the remaining probability mass as a tail bucket;
``topk:K:BITS``      the same with values quantised to 16, 8 or 4 bits with one fp32 scale per row;
                     BITS may also be written ``int8`` / ``int4`` / ``fp16`` / ``bf16`` (design.md
                     writes ``topk:64:int8``).
Indices are packed in ceil(log2 V) bits each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

VALUE_BITS = (16, 8, 4)
_BITS_ALIASES = {"int8": 8, "int4": 4, "fp16": 16, "bf16": 16, "16": 16, "8": 8, "4": 4}


@dataclass(frozen=True)
class Compression:
    kind: str  # "dense" | "topk"
    k: int = 0
    bits: int = 16

    def __str__(self) -> str:
        if self.kind == "dense":
            return "dense"
        return f"topk:{self.k}" if self.bits == 16 else f"topk:{self.k}:{self.bits}"

    def bytes_per_token(self, vocab_size: int, dense_value_bytes: int = 2) -> float:
        """Payload bytes per token position."""
        if self.kind == "dense":
            return float(vocab_size * dense_value_bytes)
        index_bits = max(1, math.ceil(math.log2(vocab_size)))
        values = self.k * self.bits / 8
        indices = self.k * index_bits / 8
        scale = 4 if self.bits < 16 else 0  # fp32 per-row scale for quantised values
        tail = 4  # fp32 tail mass (1 - sum of top-k probabilities)
        return values + indices + scale + tail


def parse_compression(text: str) -> Compression:
    """Parse ``dense`` | ``topk:K`` | ``topk:K:BITS`` (BITS 16/8/4 or int8/int4/fp16/bf16); raises
    ValueError with a clear message."""
    s = str(text).strip().lower()
    if s == "dense":
        return Compression("dense")
    parts = s.split(":")
    if parts[0] != "topk" or len(parts) not in (2, 3):
        raise ValueError(f"compression {text!r} is not one of dense, topk:K, topk:K:BITS")
    try:
        k = int(parts[1])
    except ValueError:
        raise ValueError(f"compression {text!r}: K must be an integer") from None
    bits = _BITS_ALIASES.get(parts[2]) if len(parts) == 3 else 16
    if bits is None:
        raise ValueError(f"compression {text!r}: BITS must be one of 16, 8, 4 (or int8, int4, fp16, bf16)")
    if not 1 <= k <= 1_000_000:
        raise ValueError(f"compression {text!r}: K must be between 1 and 1000000")
    if bits not in VALUE_BITS:
        raise ValueError(f"compression {text!r}: BITS must be one of 16, 8, 4")
    return Compression("topk", k, bits)
