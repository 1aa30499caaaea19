"""Strict, explained loading of every file kdplan reads (JSON, TOML, YAML).

Every failure becomes one ``InputError`` line that names the file and the field. YAML is read
with ``safe_load`` only; nothing user-supplied is ever unpickled or executed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
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
        # Devices, FIFOs and sockets could block forever or never end (/dev/zero): regular files only.
        if not stat.S_ISREG(p.stat().st_mode):
            raise InputError(f"{p}: not a regular file")
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            raise InputError(f"{p}: file is {size} bytes, larger than the {MAX_FILE_BYTES} byte limit")
        with open(p, "rb") as f:  # bounded even if the file grows while we read it
            data = f.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise InputError(f"{p}: file is larger than the {MAX_FILE_BYTES} byte limit")
        return data.decode("utf-8")
    except FileNotFoundError:
        raise InputError(f"{p}: no such file") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except PermissionError:
        raise InputError(f"{p}: permission denied") from None
    except OSError as e:
        raise InputError(f"{p}: cannot read ({e.strerror or e})") from None
    except ValueError as e:  # e.g. an embedded NUL byte in the path
        raise InputError(f"{str(p)!r}: not a usable path ({e})") from None


MAX_VALUES = 1_000_000
"""Most values (scalars and containers, counted with YAML aliases expanded) a file may hold:
a few aliases nested in each other expand exponentially ("billion laughs")."""


def _reject_nonfinite(obj: Any, path: str, where: str = "", _seen: list[int] | None = None,
                      _open: set[int] | None = None) -> None:
    seen = [0] if _seen is None else _seen
    open_ids = set() if _open is None else _open
    seen[0] += 1
    if seen[0] > MAX_VALUES:
        raise InputError(f"{path}: more than {MAX_VALUES} values (YAML aliases expanding too far?)")
    if isinstance(obj, float) and not math.isfinite(obj):
        raise InputError(f"{path}: field '{where or '<root>'}' is {obj}, expected a finite number")
    if isinstance(obj, (dict, list)):
        if id(obj) in open_ids:  # a YAML alias inside its own anchor
            raise InputError(f"{path}: field '{where or '<root>'}' contains itself (recursive YAML alias)")
        open_ids.add(id(obj))
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for k, v in items:
            sub = (f"{where}.{k}" if where else str(k)) if isinstance(obj, dict) else f"{where}[{k}]"
            _reject_nonfinite(v, path, sub, seen, open_ids)
        open_ids.discard(id(obj))


def parse_data(text: str, path: str | os.PathLike, fmt: str | None = None) -> Any:
    """Parse JSON, TOML or YAML by extension, or as ``fmt`` (".json"...) when the name has none
    that fits (YAML also accepts JSON). Errors name ``path`` as the user gave it."""
    path = str(path)
    suffix = fmt or Path(path).suffix.lower()
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
    except ValueError as e:  # Python refuses integers of more than 4300 digits
        what = "a number has too many digits" if "digits" in str(e) else str(e)
        raise InputError(f"{path}: unreadable value ({what})") from None
    try:
        _reject_nonfinite(data, path)
    except RecursionError:
        raise InputError(f"{path}: nesting too deep") from None
    return data


def explain_validation(e: ValidationError, path: str | os.PathLike) -> InputError:
    """First pydantic error as one line: ``file: field 'a.b': message``."""
    err = e.errors()[0]
    if err.get("type") == "schema_version":  # kdplan.schema.common.Versioned: a whole-file refusal
        return InputError(f"{path}: {err.get('msg')}")
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
    """Write a file atomically (temporary name in the same folder, then rename), mode 0644.

    An output path that cannot be written (missing permission, a directory, a full disk) is
    the user's input at fault: one InputError line, not a traceback."""
    p = Path(path)
    try:
        mode = p.stat().st_mode if p.exists() else None
        if mode is not None and stat.S_ISDIR(mode):
            raise InputError(f"{p}: is a directory, expected a file name")
        if mode is not None and not stat.S_ISREG(mode):
            # /dev/null, /dev/stdout, a FIFO: write into it. Renaming over it would replace
            # the device node itself (as root, -o /dev/null once turned it into a plain file).
            with open(p, "w", encoding="utf-8") as f:
                f.write(text)
            return
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    except (OSError, ValueError) as e:
        raise InputError(f"{p}: cannot write ({getattr(e, 'strerror', None) or e})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, p)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise InputError(f"{p}: cannot write ({e.strerror or e})") from None
        raise


def write_model(path: str | os.PathLike, obj: BaseModel) -> None:
    write_atomic(path, obj.model_dump_json(indent=2) + "\n")


def relative_to_file(name: str, file_path: str | None) -> str:
    """A path named in a file (a job file, a plan) is relative to that file; preset names stay as
    they are. Relative paths that do not exist next to the file are returned unchanged."""
    if file_path and ("/" in name or name.endswith((".json", ".yaml", ".yml"))):
        p = Path(name)
        if not p.is_absolute():
            cand = Path(file_path).parent / p
            if cand.exists():
                return str(cand)
    return name
