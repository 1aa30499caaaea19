"""Teacher-output formats (shared by planner and executor through the schema).

``dense``            the full distribution, V values per token at the compute precision;
``topk:K``           the K largest teacher log-probabilities (16-bit values) + their indices,
                     plus the remaining probability mass as a tail bucket;
``topk:K:BITS``      the same with values quantised to 16, 8 or 4 bits with one fp32 scale per row;
                     BITS may also be written ``int8`` / ``int4`` / ``fp16`` / ``bf16`` (design.md
                     writes ``topk:64:int8``).
Indices are packed in ceil(log2 V) bits each.

This module is the one home of the format: ``parse_compression`` is the only parser,
``str(Compression)`` the only printer, and ``CompressionField`` the pydantic type of every file
field that holds a format (the plan's ``kd.compression``, the job's ``kd.allowed_compressions``):
a malformed string is refused when the file is loaded, and the field still serialises to the
canonical string. A new format is one more entry in ``_FORMATS`` (a parser of the text after its
head word) plus its ``__str__`` / ``bytes_per_token`` cases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Callable

from pydantic import PlainSerializer, PlainValidator, WithJsonSchema

VALUE_BITS = (16, 8, 4)
_BITS_ALIASES = {"int8": 8, "int4": 4, "fp16": 16, "bf16": 16, "16": 16, "8": 8, "4": 4}
MAX_K = 1_000_000


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


DENSE = Compression("dense")


def _parse_dense(text: str, args: list[str]) -> Compression:
    if args:
        raise ValueError(f"compression {text!r}: dense takes no arguments")
    return DENSE


def _parse_topk(text: str, args: list[str]) -> Compression:
    if len(args) not in (1, 2):
        raise ValueError(f"compression {text!r} is not one of {SPELLINGS}")
    try:
        k = int(args[0])
    except ValueError:
        raise ValueError(f"compression {text!r}: K must be an integer") from None
    if not 1 <= k <= MAX_K:
        raise ValueError(f"compression {text!r}: K must be between 1 and {MAX_K}")
    bits = _BITS_ALIASES.get(args[1]) if len(args) == 2 else 16
    if bits not in VALUE_BITS:
        raise ValueError(f"compression {text!r}: BITS must be one of 16, 8, 4 (or int8, int4, fp16, bf16)")
    return Compression("topk", k, bits)


# head word -> parser of the colon-separated arguments after it
_FORMATS: dict[str, Callable[[str, list[str]], Compression]] = {"dense": _parse_dense, "topk": _parse_topk}
SPELLINGS = "dense, topk:K, topk:K:BITS"
"""The accepted spellings, for help texts and error messages."""


def parse_compression(text: str | Compression) -> Compression:
    """Parse ``dense`` | ``topk:K`` | ``topk:K:BITS`` (BITS 16/8/4 or int8/int4/fp16/bf16); raises
    ValueError with a clear message. A ``Compression`` passes through unchanged."""
    if isinstance(text, Compression):
        return text
    if not isinstance(text, str):
        raise ValueError(f"compression must be a string ({SPELLINGS}), got {type(text).__name__}")
    s = text.strip().lower()
    head, *args = s.split(":")
    parse = _FORMATS.get(head)
    if parse is None:
        raise ValueError(f"compression {text!r} is not one of {SPELLINGS}")
    return parse(text, args)


CompressionField = Annotated[
    Compression,
    PlainValidator(parse_compression),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string"}),
]
"""A teacher-output format in a file: parsed on load (malformed strings are validation errors),
written back as its canonical string."""
