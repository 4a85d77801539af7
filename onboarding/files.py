"""Reading an operator's files safely (profiles, rosters, templates' folders, the brand file):
only under the allowed folder, only regular files of a bounded size, YAML without aliases and
of bounded depth and size, and every failure an InputError that names the file and line without
quoting what the file holds. Used by the settings (the brand file) and the inputs alike."""

from __future__ import annotations

import difflib
import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from yaml.composer import Composer

from onboarding.errors import InputError, Problem

# Bounds on any YAML the core reads (profiles, YAML rosters, the brand file): no aliases at all
# (an alias bomb expands a few hundred bytes into millions of values), at most MAX_YAML_DEPTH
# levels of nesting (deeper would exhaust the stack) and `max_nodes` values (each costs memory).
MAX_YAML_DEPTH = 32

# libyaml's scanner and parser where installed (several times faster), with this module's own
# composer on top, which is where aliases, depth and size are refused.
_ParserBase: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Refused(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


class _BoundedLoader(_ParserBase):  # type: ignore[misc]
    def __init__(self, stream: str, max_nodes: int) -> None:
        super().__init__(stream)
        Composer.__init__(self)
        self._depth = 0
        self._nodes = 0
        self._max_nodes = max_nodes
        self.at: Any = None

    def get_single_node(self) -> Any:
        return Composer.get_single_node(self)

    def compose_document(self) -> Any:
        return Composer.compose_document(self)

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(line, "uses a YAML alias (*name), which is not accepted; write it out")
        self._nodes += 1
        if self._nodes > self._max_nodes:
            raise _Refused(line, f"has more than {self._max_nodes:,} values")
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise _Refused(line, f"is nested more than {MAX_YAML_DEPTH} levels deep")
        try:
            return Composer.compose_node(self, parent, index)
        finally:
            self._depth -= 1

    def compose_scalar_node(self, anchor: Any) -> Any:
        return Composer.compose_scalar_node(self, anchor)

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        self.at = node  # where a constructor's ValueError (a 5,000-digit int) came from
        return super().construct_object(node, deep)

    def compose_sequence_node(self, anchor: Any) -> Any:
        return Composer.compose_sequence_node(self, anchor)

    def compose_mapping_node(self, anchor: Any) -> Any:
        return Composer.compose_mapping_node(self, anchor)


_QUOTED = re.compile(r"'[^'\n]*'|\"[^\"\n]*\"")
_KEPT = re.compile(
    r"^['\"](<[a-z ]+>|\\[tnr0]|\\x[0-9a-f]{2}|\\u[0-9a-f]{4}|[ -/:-@\[-`{-~])['\"]$"
)


def without_quotes(message: str) -> str:
    """A parser's message without the pieces of input it quotes (a tag, an anchor, a scalar),
    keeping token names ('<scalar>') and single punctuation or control characters."""
    return _QUOTED.sub(lambda m: m.group(0) if _KEPT.match(m.group(0)) else "…", message)


def _yaml_reason(err: BaseException) -> tuple[int | None, str]:
    """(line, what is wrong) for a YAML error, never the snippet of the file PyYAML's own
    message carries."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    line = mark.line + 1 if mark is not None else None
    if isinstance(err, yaml.MarkedYAMLError):
        parts = [p for p in (err.context, err.problem) if p]
        reason = without_quotes(", ".join(parts)) if parts else "cannot parse it"
    elif isinstance(err, RecursionError):
        reason = "nested too deeply"
    elif isinstance(err, ValueError) and "digits" in str(err):
        reason = "a number too long"
    else:
        reason = "a value of the wrong form"
    return line, f"not valid YAML: {reason}"


def resolve_under(path: Path, root: str | Path | None, source: str, what: str) -> Path:
    """The path itself, or, with a root, the path with symlinks resolved, refused unless it
    lies in root. Checked before the file is looked at, so the answer is the same whether or
    not it exists."""
    if root is None:
        return path
    real = Path(path).resolve()
    if not real.is_relative_to(Path(root).resolve()):
        raise InputError(
            f"{source}: outside the folder runs may read ({root}, ONBOARD_FILES_ROOT); "
            f"put the {what} there"
        )
    return real


def read_bounded_text(path: Path, source: str, max_bytes: int, what: str = "file") -> str:
    """A regular file's text (UTF-8, BOM dropped), refused past max_bytes."""
    try:
        # O_NONBLOCK: opening a named pipe no writer holds returns at once (then is refused
        # below) instead of waiting for ever; a regular file reads as it always does.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise InputError(f"{source}: not a regular file; give the {what} file")
            data = f.read(max_bytes + 1)
    except FileNotFoundError as err:
        raise InputError(f"{source}: file not found") from err
    except IsADirectoryError as err:
        raise InputError(f"{source}: is a folder; give the {what} file") from err
    except OSError as err:
        raise InputError(f"{source}: cannot read it ({err.strerror})") from err
    if len(data) > max_bytes:
        raise InputError(f"{source}: larger than {max_bytes} bytes; this is not a {what}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(
            [Problem(source, None, "", f"not UTF-8 text (byte {err.start}); save it as UTF-8")]
        ) from err


def load_yaml_with_lines(
    path: Path,
    source: str | None = None,
    *,
    max_bytes: int,
    max_nodes: int,
    what: str = "file",
) -> tuple[Any, dict[tuple[str | int, ...], int]]:
    """Parse YAML and map each key path to its 1-based line, so errors can say where.

    Bounded (no aliases, MAX_YAML_DEPTH, max_bytes, max_nodes), and every failure is an
    InputError naming `source` (default: the path) and the line, never quoting the file."""
    source = str(path) if source is None else source
    text = read_bounded_text(path, source, max_bytes, what)
    loader = _BoundedLoader(text, max_nodes)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except _Refused as err:
        raise InputError([Problem(source, err.line, "", err.message)]) from None
    except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError) as err:
        line, reason = _yaml_reason(err)
        if line is None and loader.at is not None:
            line = loader.at.start_mark.line + 1
        raise InputError([Problem(source, line, "", reason)]) from None
    finally:
        loader.dispose()
    lines: dict[tuple[str | int, ...], int] = {}

    def walk(n: Any, at: tuple[str | int, ...]) -> None:
        # A mapping value keeps its key's line: "additional_params: ..." names the key's line,
        # not the line its block value starts on.
        lines.setdefault(at, n.start_mark.line + 1)
        if isinstance(n, yaml.MappingNode):
            for key, value in n.value:
                if not isinstance(key, yaml.ScalarNode):
                    continue
                lines[(*at, key.value)] = key.start_mark.line + 1
                walk(value, (*at, key.value))
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                walk(item, (*at, i))

    if node is not None:
        walk(node, ())
    return data, lines


def problems_from_validation(
    err: ValidationError,
    source: str,
    lines: dict[tuple[str | int, ...], int],
    model: type[BaseModel] | None = None,
) -> list[Problem]:
    out = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        line = None
        for n in range(len(loc), -1, -1):
            if loc[:n] in lines:
                line = lines[loc[:n]]
                break
        field = ".".join(str(p) for p in loc)
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            message = unknown_key(str(loc[-1]), model if len(loc) == 1 else None)
        value = e.get("input")
        if isinstance(value, str) and value and repr(value) in message:
            message = message.replace(repr(value), "the value")  # never quote the file
        out.append(Problem(source, line, field, message))
    return out


def unknown_key(key: str, model: type[BaseModel] | None) -> str:
    """What a typo'd key is told: "unknown key `scope`; did you mean `scopes`?", naming the
    field (or alias) of `model` closest to it, if one is close."""
    fields = model.model_fields if model is not None else {}
    known = [*fields, *(f.alias for f in fields.values() if f.alias)]
    close = difflib.get_close_matches(key, known, n=1)
    return f"unknown key `{key}`" + (f"; did you mean `{close[0]}`?" if close else "")
