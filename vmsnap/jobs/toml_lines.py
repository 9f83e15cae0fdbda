"""Where each key of a TOML document is: tomllib reports line numbers only for syntax errors, so a job file's
messages about valid TOML (an unknown key, a wrong type) find the line here.
"""

from __future__ import annotations

import re

TablePath = tuple[str | int, ...]
"""A table: ``()`` the top level, ``("retention",)``, ``("vm", 0)`` the first ``[[vm]]``."""


class KeyLines:
    """Where each key of a (valid) TOML document is: ``line(("vm", 1), "qmp")`` → 12.

    Tables are paths: ``()`` the top level, ``("retention",)``, ``("vm", 0)`` the first ``[[vm]]``.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.keys: dict[tuple[TablePath, str], int] = {}
        self.tables: dict[TablePath, int] = {}
        self._counts: dict[TablePath, int] = {}
        self._scan()

    def line(self, table: TablePath, key: str | None = None) -> int:
        """The line of ``key`` in ``table``; of the table itself when ``key`` is None or not found; else 1."""
        if key is not None and (table, key) in self.keys:
            return self.keys[(table, key)]
        if table in self.tables:
            return self.tables[table]
        if table and (table[:-1], str(table[-1])) in self.keys:
            return self.keys[(table[:-1], str(table[-1]))]
        return 1

    def _lineno(self, pos: int) -> int:
        return self.text.count("\n", 0, pos) + 1

    def _scan(self) -> None:
        text = self.text
        pos = 0
        table: TablePath = ()
        while pos < len(text):
            pos = self._skip_blank(pos, newlines=True)
            if pos >= len(text):
                break
            if text.startswith("[[", pos):
                end = text.index("]]", pos)
                path = self._key_path(text[pos + 2 : end])
                index = self._counts.get(path, 0)
                self._counts[path] = index + 1
                table = (*path, index)
                self.tables[table] = self._lineno(pos)
                pos = end + 2
            elif text[pos] == "[":
                end = text.index("]", pos)
                table = self._key_path(text[pos + 1 : end])
                self.tables.setdefault(table, self._lineno(pos))
                pos = end + 1
            else:
                pos = self._key_value(pos, table)
            pos = self._next_line(pos)

    def _next_line(self, pos: int) -> int:
        end = self.text.find("\n", pos)
        return len(self.text) if end < 0 else end + 1

    def _skip_blank(self, pos: int, *, newlines: bool) -> int:
        text = self.text
        while pos < len(text):
            char = text[pos]
            if char in " \t\r" or (newlines and char == "\n"):
                pos += 1
            elif char == "#":
                end = text.find("\n", pos)
                pos = len(text) if end < 0 else end
            else:
                break
        return pos

    def _key_path(self, raw: str) -> TablePath:
        parts: list[str | int] = []
        for part in re.findall(r'"(?:[^"\\]|\\.)*"|\'[^\']*\'|[A-Za-z0-9_-]+', raw):
            parts.append(part[1:-1] if part[:1] in "\"'" else part)
        return tuple(parts)

    def _key_value(self, pos: int, table: TablePath) -> int:
        """Record the key at ``pos`` (with its dotted prefix as tables) and return the end of its value."""
        equals = self._find_equals(pos)
        path = self._key_path(self.text[pos:equals])
        line = self._lineno(pos)
        for depth in range(1, len(path) + 1):  # a.b.c = 1 defines tables a and a.b at this line
            prefix = (*table, *path[: depth - 1])
            self.keys.setdefault((prefix, str(path[depth - 1])), line)
        return self._skip_value(self._skip_blank(equals + 1, newlines=False), (*table, *path))

    def _find_equals(self, pos: int) -> int:
        text = self.text
        while text[pos] != "=":
            if text[pos] in "\"'":
                pos = self._skip_string(pos)
            else:
                pos += 1
        return pos

    def _skip_string(self, pos: int) -> int:
        text = self.text
        for quote in ('"""', "'''"):
            if text.startswith(quote, pos):
                end = pos + 3
                while True:
                    end = text.index(quote, end)
                    if quote == '"""' and _escaped(text, end):
                        end += 1
                        continue
                    end += 3
                    while end < len(text) and text[end] == quote[0]:  # up to two quotes before the end
                        end += 1
                    return end
        quote = text[pos]
        end = pos + 1
        while text[end] != quote or (quote == '"' and _escaped(text, end)):
            end += 1
        return end + 1

    def _skip_value(self, pos: int, path: TablePath) -> int:
        text = self.text
        if pos >= len(text):
            return pos
        char = text[pos]
        if char in "\"'":
            return self._skip_string(pos)
        if char == "{":
            return self._inline_table(pos, path)
        if char == "[":
            pos += 1
            index = 0
            while True:
                pos = self._skip_blank(pos, newlines=True)
                if text[pos] == "]":
                    return pos + 1
                if text[pos] == ",":
                    pos += 1
                    continue
                if text[pos] == "{":
                    self.tables.setdefault((*path, index), self._lineno(pos))
                pos = self._skip_value(pos, (*path, index))
                index += 1
        match = re.compile(r"[^\s,\]}#]+").match(text, pos)
        return match.end() if match else pos + 1

    def _inline_table(self, pos: int, path: TablePath) -> int:
        text = self.text
        self.tables.setdefault(path, self._lineno(pos))
        pos += 1
        while True:
            pos = self._skip_blank(pos, newlines=True)
            if text[pos] == "}":
                return pos + 1
            if text[pos] == ",":
                pos += 1
                continue
            pos = self._key_value(pos, path)


def _escaped(text: str, pos: int) -> bool:
    """True when the character at ``pos`` is escaped by an odd number of backslashes."""
    count = 0
    while pos - count - 1 >= 0 and text[pos - count - 1] == "\\":
        count += 1
    return count % 2 == 1
