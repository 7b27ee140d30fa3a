"""Reading files that may be damaged or hostile: YAML with limits, JSON of the type the caller
expects, JSON lines. Every failure is one UserError naming the file, what is wrong with it and what
to do (`fix`), whatever the bytes: empty, cut short, binary, another JSON type, an alias bomb."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

from ..errors import UserError

MAX_BYTES = 8 << 20       # a recipe or a manifest is kilobytes
MAX_NODES = 100_000       # values in the YAML once its aliases are expanded (a "billion laughs" has 10^9)
MAX_DEPTH = 64            # nesting of the YAML, aliases expanded
STAGE_FIX = "delete the stage folder and rerun the stage"


class _Refused(yaml.YAMLError):
    pass


try:        # libyaml's scanner and parser (events), PyYAML's composer (below): 6x faster than all-Python
    from yaml._yaml import CParser as _Parser
except ImportError:
    from yaml.parser import Parser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _Parser(Reader, Scanner, Parser):
        def __init__(self, stream):
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            Parser.__init__(self)


class _LimitedLoader(Composer, _Parser, SafeConstructor, Resolver):
    """PyYAML's safe loader that counts what its aliases expand to while it composes the document:
    a node's `expanded` values and `height` are known before its parent is built, so a document
    that would expand beyond MAX_NODES or nest beyond MAX_DEPTH stops at once, in linear time."""

    def __init__(self, stream):
        _Parser.__init__(self, stream)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        Composer.__init__(self)
        self.depth = 0

    def compose_node(self, parent, index):
        node = Composer.compose_node(self, parent, index)
        if not hasattr(node, "expanded"):          # an alias returns its anchored node, already counted
            children = (node.value if isinstance(node, yaml.SequenceNode) else
                        [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
            node.expanded = 1 + sum(c.expanded for c in children)
            node.height = 1 + max((c.height for c in children), default=0)
        if node.expanded > MAX_NODES or node.height > MAX_DEPTH:
            raise _Refused(f"it expands to more than {MAX_NODES:,} values or nests deeper than {MAX_DEPTH} "
                           f"levels (YAML aliases?)")
        return node

    def compose_sequence_node(self, anchor):
        with self._deeper():
            return Composer.compose_sequence_node(self, anchor)

    def compose_mapping_node(self, anchor):
        with self._deeper():
            return Composer.compose_mapping_node(self, anchor)

    @contextlib.contextmanager
    def _deeper(self):
        # the composer recurses once a level: refuse before Python's recursion limit is met
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Refused(f"it nests deeper than {MAX_DEPTH} levels")
        try:
            yield
        finally:
            self.depth -= 1


def read_text(path: Path, what: str, fix: str) -> str:
    """The file's text: UTF-8, at most MAX_BYTES; else one line."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_BYTES:
            raise UserError(f"{what} {path} is {path.stat().st_size:,} bytes, too large to be one; {fix}")
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist; {fix}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                        f"{fix}") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror}; {fix}") from None


def parse_yaml(text: str):
    """YAML text as Python values, within the limits above; yaml.YAMLError when not valid or too big."""
    loader = _LimitedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: Path, what: str, fix: str):
    """The YAML file's values (None when it holds none); damage is one line."""
    text = read_text(path, what, fix)
    try:
        return parse_yaml(text)
    except yaml.YAMLError as e:
        raise UserError(f"{what} {path} is not valid YAML: {str(e).splitlines()[0]}; {fix}") from None


def kind(value) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(value), "a number")


def read_json(path: Path, expect: type = dict, what: str = "", fix: str = STAGE_FIX):
    """The JSON file's value, which must be of type `expect`; damage is one line."""
    path = Path(path)
    text = read_text(path, what or "file", fix).lstrip("\ufeff")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); {fix}") from None
    except RecursionError:
        raise UserError(f"{path} nests too deeply to be ours; {fix}") from None
    if not isinstance(value, expect):
        raise UserError(f"{path} holds {kind(value)}, not {kind(expect())}; {fix}")
    return value


def read_json_lines(path: Path) -> list[dict]:
    """The JSON objects of a JSON-lines file (metrics.jsonl), one a line; a line that is not one (being
    written, or damaged) is left out, so a reader shows what it can. A missing file has none."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return []
    rows = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
