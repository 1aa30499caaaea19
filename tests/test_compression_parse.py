"""Teacher-output format strings: the design's spelling (topk:64:int8) and the numeric one agree."""

import pytest

from kdplan.schema.compression import Compression, parse_compression


@pytest.mark.parametrize("text,expected", [
    ("dense", Compression("dense")),
    ("topk:64", Compression("topk", 64, 16)),
    ("topk:64:int8", Compression("topk", 64, 8)),
    ("topk:64:8", Compression("topk", 64, 8)),
    ("TOPK:32:INT4", Compression("topk", 32, 4)),
    ("topk:16:bf16", Compression("topk", 16, 16)),
    ("sample:64", Compression("sample", 0, 16, 64)),
    ("topk:8+sample:48", Compression("sample", 8, 8, 48)),
    (" TOPK:8+SAMPLE:48 ", Compression("sample", 8, 8, 48)),
])
def test_spellings(text, expected):
    assert parse_compression(text) == expected
    assert parse_compression(str(expected)) == expected  # the canonical form round-trips


@pytest.mark.parametrize("text,msg", [
    ("topk:64:int3", "BITS must be one of"), ("topk:x", "K must be an integer"),
    ("topk:0", "K must be between"), ("sparse:4", "is not one of"), ("topk:1:2:3", "is not one of"),
    ("sample:0", "N must be between"), ("sample:x", "N must be an integer"), ("sample:4:8", "is not one of"),
    ("topk:8:4+sample:4", "always 8-bit"), ("sample:4+topk:8", "is not one of"), ("topk:0+sample:4", "M must be"),
])
def test_bad_spellings_name_the_problem(text, msg):
    with pytest.raises(ValueError, match=msg):
        parse_compression(text)
