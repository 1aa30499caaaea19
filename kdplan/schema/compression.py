"""Teacher-output formats (shared by planner and executor through the schema).

``dense``            the full distribution, V values per token at the compute precision;
``topk:K``           the K largest teacher log-probabilities (16-bit values) + their indices,
                     plus the remaining probability mass as a tail bucket;
``topk:K:BITS``      the same with values quantised to 16, 8 or 4 bits with one fp32 scale per row;
                     BITS may also be written ``int8`` / ``int4`` / ``fp16`` / ``bf16`` (design.md
                     writes ``topk:64:int8``).
``sample:N``         N ids drawn per position by systematic resampling of the teacher's distribution
                     at the KD temperature (one uniform offset, N evenly spaced points on its CDF;
                     every id's count is floor or ceil of N*p): the N ids, sorted and bit-packed,
                     counts implied by repeats. Target p_hat = counts / N, unbiased for p.
``topk:M+sample:N``  the exact top-M head (values as ``topk:M:8`` encodes them), the tail mass, and N
                     systematic draws from the renormalised tail: p_hat = head + tail * counts / N.
Indices are packed in ceil(log2 V) bits each. The sampled formats are only unbiased under forward KL
(the loss is linear in the target); reverse KL and JSD are refused with them (``SAMPLED_LOSSES``).

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

from pydantic import BaseModel, ConfigDict, PlainSerializer, PlainValidator, WithJsonSchema, field_validator

VALUE_BITS = (16, 8, 4)
_BITS_ALIASES = {"int8": 8, "int4": 4, "fp16": 16, "bf16": 16, "16": 16, "8": 8, "4": 4}
MAX_K = 1_000_000


@dataclass(frozen=True)
class Compression:
    kind: str  # "dense" | "topk" | "sample" (sample:N, or topk:M+sample:N when k = M > 0)
    k: int = 0
    bits: int = 16
    samples: int = 0  # N, the systematic draws per position of "sample"

    @property
    def sampled(self) -> bool:
        """The target is a sampled estimate (p_hat), not the teacher's values."""
        return self.kind == "sample"

    def head(self) -> "Compression":
        """The exact top-M part of ``topk:M+sample:N`` (``topk:M:8``); raises for other formats."""
        if not (self.sampled and self.k > 0):
            raise ValueError(f"{self} has no exact top-k head")
        return Compression("topk", self.k, 8)

    def __str__(self) -> str:
        if self.kind == "dense":
            return "dense"
        if self.sampled:
            return f"topk:{self.k}+sample:{self.samples}" if self.k else f"sample:{self.samples}"
        return f"topk:{self.k}" if self.bits == 16 else f"topk:{self.k}:{self.bits}"

    def bytes_per_token(self, vocab_size: int, dense_value_bytes: int = 2) -> float:
        """Payload bytes per token position."""
        if self.kind == "dense":
            return float(vocab_size * dense_value_bytes)
        index_bits = max(1, math.ceil(math.log2(vocab_size)))
        if self.sampled:  # N packed ids (+ the head, priced as topk:M:8, with its scale and tail mass)
            head = self.head().bytes_per_token(vocab_size) if self.k else 0.0
            return head + self.samples * index_bits / 8
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


def _count(text: str, arg: str, name: str) -> int:
    try:
        n = int(arg)
    except ValueError:
        raise ValueError(f"compression {text!r}: {name} must be an integer") from None
    if not 1 <= n <= MAX_K:
        raise ValueError(f"compression {text!r}: {name} must be between 1 and {MAX_K}")
    return n


def _parse_sample(text: str, args: list[str]) -> Compression:
    if len(args) != 1:
        raise ValueError(f"compression {text!r} is not one of {SPELLINGS}")
    return Compression("sample", 0, 16, _count(text, args[0], "N"))


def _parse_hybrid(text: str, s: str) -> Compression:
    """``topk:M+sample:N`` (the head's values are always 8-bit: one spelling)."""
    head, _, tail = s.partition("+")
    h, t = head.split(":"), tail.split(":")
    if len(h) != 2 or h[0] != "topk" or len(t) != 2 or t[0] != "sample":
        raise ValueError(f"compression {text!r} is not one of {SPELLINGS} (the head's values are always 8-bit)")
    return Compression("sample", _count(text, h[1], "M"), 8, _count(text, t[1], "N"))


# head word -> parser of the colon-separated arguments after it
_FORMATS: dict[str, Callable[[str, list[str]], Compression]] = {"dense": _parse_dense, "topk": _parse_topk,
                                                                "sample": _parse_sample}
SPELLINGS = "dense, topk:K, topk:K:BITS, sample:N, topk:M+sample:N"
SAMPLED_LOSSES = ("forward_kl",)
"""KD losses a sampled target (``sample:N``, ``topk:M+sample:N``) may be used with: p_hat is
unbiased for p and forward KL is linear in the target, so its gradient is unbiased; reverse KL
and JSD are not linear in p and would be biased."""


def sampled_loss_error(compression: Compression, loss: str) -> str | None:
    """Why ``loss`` cannot be used with ``compression`` (None when it can)."""
    if compression.sampled and loss not in SAMPLED_LOSSES:
        return (f"kd.loss {loss!r} with the sampled teacher target {compression}: only forward_kl is unbiased "
                f"with a sampled target (reverse KL and JSD are not linear in p); use kd.loss forward_kl or a "
                f"dense / topk format")
    return None
"""The accepted spellings, for help texts and error messages."""


def parse_compression(text: str | Compression) -> Compression:
    """Parse ``dense`` | ``topk:K`` | ``topk:K:BITS`` (BITS 16/8/4 or int8/int4/fp16/bf16) |
    ``sample:N`` | ``topk:M+sample:N``; raises
    ValueError with a clear message. A ``Compression`` passes through unchanged."""
    if isinstance(text, Compression):
        return text
    if not isinstance(text, str):
        raise ValueError(f"compression must be a string ({SPELLINGS}), got {type(text).__name__}")
    s = text.strip().lower()
    if "+" in s:
        return _parse_hybrid(text, s)
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


# ---- measured fidelity curve (benchmarks/compression_quality.py --write) ------------------------


class FidelityProvenance(BaseModel):
    """Where a fidelity curve was measured (like a hardware profile's provenance)."""

    model_config = ConfigDict(extra="allow")
    kind: str
    date: str
    command: str
    device: str
    teacher: str
    student: str
    vocab_size: int
    seeds: int
    steps: int


class FormatFidelity(BaseModel):
    """One format's measurement: ``fidelity`` is what the planner's --min-fidelity compares."""

    model_config = ConfigDict(extra="allow")
    bytes_per_token: float
    fidelity: float
    """Share of dense KD's gain kept: the lower end of its 95% interval over seeds (the smaller of
    the held-out CE and KL shares); dense is 1 by definition."""


class FidelityCurve(BaseModel):
    """The measured fidelity per teacher-output format (a file under profiles/fidelity/)."""

    model_config = ConfigDict(extra="forbid")
    provenance: FidelityProvenance
    formats: dict[str, FormatFidelity]

    @field_validator("formats")
    @classmethod
    def _canonical(cls, v: dict[str, FormatFidelity]) -> dict[str, FormatFidelity]:
        return {str(parse_compression(k)): x for k, x in v.items()}  # refuses an unknown spelling

    def fidelity(self, c: Compression) -> float | None:
        """The measured share for ``c`` (dense: 1.0, measured or not); None when unmeasured."""
        if c.kind == "dense":
            return 1.0
        m = self.formats.get(str(c))
        return None if m is None else m.fidelity
