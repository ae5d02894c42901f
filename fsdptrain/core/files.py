"""Reading the user's files: the one place where I/O, decode and parse errors become one line naming the file.

Every file fsdptrain reads on a user's behalf (configs, dataset_info.json, data files, model folders' JSON and
weights, checkpoint JSON) is read inside `reading(path, what)` or through the helpers below, so a file that is
missing, a folder, unreadable, not UTF-8, or not valid JSON/YAML/Parquet ends the run with
`fsdptrain: error: <file>: <what is wrong>; <what to do>` and exit status 2, never a traceback. The errors are
handled as classes here, not case by case where files are read.

`write_atomic` is the other half: a small result file (JSON records, best.json, a lock) written under a hidden
temporary name beside it and renamed, so a reader never sees half a file and a crash leaves the old one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import UserError


class FileError(UserError):
    """A file that cannot be read or parsed."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def describe_error(path: str | Path, e: BaseException, what: str = "", fix: str = "") -> str:
    """The one-line message for an error raised while reading `path` (as `what`, e.g. "a data file").

    `fix` replaces the generic advice for a file that is there but cannot be parsed (e.g. "the file is damaged
    or truncated; download or save it again")."""
    as_what = f" as {what}" if what else ""
    if isinstance(e, FileNotFoundError):
        return f"{path}: no such file; check the path"
    if isinstance(e, IsADirectoryError):
        return f"{path}: is a folder, not a file; give {what or 'a file'}"
    if isinstance(e, NotADirectoryError):
        return f"{path}: a part of this path is a file, not a folder; check the path"
    if isinstance(e, PermissionError):
        return f"{path}: permission denied; make it readable for this user"
    if isinstance(e, UnicodeDecodeError):
        byte = e.object[e.start] if e.start < len(e.object) else 0
        return (f"{path}: not UTF-8 text (byte 0x{byte:02x} at offset {e.start}); "
                "save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)")
    if isinstance(e, json.JSONDecodeError):
        return (f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                f"{fix or 'fix or replace the file'}")
    if isinstance(e, OSError):
        return f"{path}: cannot read{as_what} ({e.strerror or _first_line(e)})"
    return (f"{path}: cannot read{as_what} ({type(e).__name__}: {_first_line(e)}); "
            f"{fix or 'is it damaged or of another type?'}")


@contextmanager
def reading(path: str | Path, what: str = "", fix: str = "") -> Iterator[None]:
    """Any error raised while reading `path` inside the block becomes a FileError naming the file (`what` and
    `fix` as in `describe_error`)."""
    try:
        yield
    except UserError:
        raise  # already one line (e.g. a FileError of an inner read)
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 (the point: every library's parse error becomes one line)
        raise FileError(describe_error(path, e, what, fix)) from None


def read_text(path: str | Path, what: str = "") -> str:
    with reading(path, what):
        return Path(path).read_text(encoding="utf-8")


def read_json(path: str | Path, what: str = "", fix: str = "") -> Any:
    with reading(path, what, fix):
        return json.loads(Path(path).read_text(encoding="utf-8"))


def read_yaml(path: str | Path, what: str = "", base_loader: Any = None) -> Any:
    """YAML with duplicate keys refused (PyYAML would keep the later value silently); `base_loader`: a
    yaml.SafeLoader subclass with extra resolvers (default SafeLoader)."""
    text = read_text(path, what)
    with reading(path, what):  # e.g. an unhashable mapping key: still one line naming the file
        return parse_yaml(text, str(path), base_loader)


def parse_yaml(text: str, where: str, base_loader: Any = None) -> Any:
    import yaml

    class StrictLoader(base_loader or yaml.SafeLoader):
        pass

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=True)
            if key in seen:
                raise FileError(f"{where}: line {key_node.start_mark.line + 1}: key '{key}' appears twice in one "
                                f"mapping (first on line {seen[key] + 1}); keep one")
            seen[key] = key_node.start_mark.line
        return loader.construct_mapping(node, deep=True)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or _first_line(e)
        raise FileError(f"{where}: not valid YAML ({at}{problem}); fix the file") from None


def write_atomic(path: str | Path, text: str) -> None:
    """`text` to `path` through `.NAME.tmp-PID` beside it and a rename (the temporary is removed if writing fails)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
