"""Strict, explained loading of every file kdplan reads (JSON, TOML, YAML).

Every failure becomes one ``InputError`` line that names the file and the field. YAML is read
with ``safe_load`` only; nothing user-supplied is ever unpickled or executed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import tomllib
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from .errors import InputError

M = TypeVar("M", bound=BaseModel)

MAX_FILE_BYTES = 64 * 1024 * 1024


def read_text(path: str | os.PathLike) -> str:
    p = Path(path)
    try:
        if p.is_dir():
            raise InputError(f"{p}: is a directory, expected a file")
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            raise InputError(f"{p}: file is {size} bytes, larger than the {MAX_FILE_BYTES} byte limit")
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{p}: no such file") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except PermissionError:
        raise InputError(f"{p}: permission denied") from None
    except OSError as e:
        raise InputError(f"{p}: cannot read ({e.strerror or e})") from None


def _reject_nonfinite(obj: Any, path: str, where: str = "") -> None:
    if isinstance(obj, float) and not math.isfinite(obj):
        raise InputError(f"{path}: field '{where or '<root>'}' is {obj}, expected a finite number")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _reject_nonfinite(v, path, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _reject_nonfinite(v, path, f"{where}[{i}]")


def parse_data(text: str, path: str | os.PathLike) -> Any:
    """Parse JSON, TOML or YAML by extension (YAML also accepts JSON)."""
    path = str(path)
    suffix = Path(path).suffix.lower()
    if not text.strip():
        raise InputError(f"{path}: file is empty")
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix == ".toml":
            data = tomllib.loads(text)
        else:
            data = yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: invalid TOML: {str(e).splitlines()[0]}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise InputError(f"{path}: invalid YAML{loc}: {problem}") from None
    except RecursionError:
        raise InputError(f"{path}: nesting too deep") from None
    _reject_nonfinite(data, path)
    return data


def explain_validation(e: ValidationError, path: str | os.PathLike) -> InputError:
    """First pydantic error as one line: ``file: field 'a.b': message``."""
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err.get("loc", ())) or "<root>"
    msg = err.get("msg", "invalid")
    if err.get("type") == "extra_forbidden":
        msg = "unknown key (not allowed here)"
    elif err.get("type") == "missing":
        msg = "required field is missing"
    more = f" (+{len(e.errors()) - 1} more problems)" if len(e.errors()) > 1 else ""
    return InputError(f"{path}: field '{loc}': {msg}{more}")


def validate(model: type[M], data: Any, path: str | os.PathLike) -> M:
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise explain_validation(e, path) from None
    except (ValueError, TypeError, OverflowError, RecursionError) as e:
        raise InputError(f"{path}: {e}") from None


def load_model(model: type[M], path: str | os.PathLike) -> M:
    """Read and validate a file into a pydantic model, with one-line errors."""
    return validate(model, parse_data(read_text(path), path), path)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a file atomically (temporary name in the same folder, then rename), mode 0644."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_model(path: str | os.PathLike, obj: BaseModel) -> None:
    write_atomic(path, obj.model_dump_json(indent=2) + "\n")
