"""Where each key of a TOML document is (``_Locator``): line numbers for error messages.

Why a hand-written scanner: the product promises one line per error, *every* error at
once, with the file's line number and a "did you mean"; tomllib does not keep positions
and no schema library in the dependency set gives line numbers for TOML, so ``_Locator``
re-scans the already-parsed text for them.
"""

from __future__ import annotations

import bisect
import re
import tomllib

_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")

KeyPath = tuple[str | int, ...]


class _Eof(Exception):
    """The scanner ran off the end of the text inside a value that started at ``pos``."""

    def __init__(self, pos: int) -> None:
        super().__init__(pos)
        self.pos = pos


class _Locator:
    """Maps key paths to 1-based line numbers by scanning the TOML text.

    Records table headers (``[dht]``, ``[discovery.gpu_scores]``), ``key =`` lines
    (dotted keys too), keys of inline tables and elements of arrays (path + index), so
    an error in the third bootstrap entry of a multi-line array points at its own line.
    It is meant for text tomllib has accepted; on broken text it stops quietly (or
    reports where an unterminated value began, see ``_Eof``).
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.n = len(text)
        self._nl = [m.start() for m in re.finditer("\n", text)]
        self.lines: dict[KeyPath, int] = {}
        self.seen: list[tuple[KeyPath, int]] = []   # every definition, in order
        self.eof_pos: int | None = None
        try:
            self._document()
        except _Eof as e:
            self.eof_pos = e.pos
        except (IndexError, ValueError, tomllib.TOMLDecodeError):
            pass

    # -- public
    def line_of_pos(self, pos: int) -> int:
        return bisect.bisect_right(self._nl, pos - 1) + 1 if pos > 0 else 1

    def line(self, *paths: KeyPath) -> int:
        """Line of the first path (or nearest recorded parent) found; else 1."""
        for path in paths:
            if path in self.lines:
                return self.lines[path]
        for path in paths:
            for n in range(len(path) - 1, 0, -1):
                if path[:n] in self.lines:
                    return self.lines[path[:n]]
        return 1

    # -- scanner
    def _record(self, path: KeyPath, pos: int) -> None:
        line = self.line_of_pos(pos)
        self.lines.setdefault(path, line)
        self.seen.append((path, line))

    def _ws(self, i: int, newlines: bool) -> int:
        t = self.text
        while i < self.n:
            c = t[i]
            if c in " \t" or (newlines and c in "\r\n"):
                i += 1
            elif c == "#" and newlines:
                j = t.find("\n", i)
                i = self.n if j < 0 else j
            else:
                break
        return i

    def _simple_key(self, i: int) -> tuple[str, int]:
        t = self.text
        m = _BARE_KEY_RE.match(t, i)
        if m:
            return m.group(0), m.end()
        if t.startswith('"', i) or t.startswith("'", i):
            end = self._string(i, i)
            # Let tomllib decode the escapes rather than re-implementing them.
            return tomllib.loads("k = " + t[i:end])["k"], end
        raise ValueError("not a key")

    def _key(self, i: int) -> tuple[tuple[str, ...], int]:
        parts: list[str] = []
        while True:
            i = self._ws(i, False)
            k, i = self._simple_key(i)
            parts.append(k)
            i = self._ws(i, False)
            if i < self.n and self.text[i] == ".":
                i += 1
                continue
            return tuple(parts), i

    def _string(self, i: int, start: int) -> int:
        """End index (exclusive) of the string starting at ``i``."""
        t = self.text
        for q in ('"""', "'''"):
            if t.startswith(q, i):
                j = i + 3
                while True:
                    k = t.find(q, j)
                    if k < 0:
                        raise _Eof(start)
                    if q == '"""':
                        # An odd run of backslashes before k escapes the first quote.
                        b = k
                        while b > j and t[b - 1] == "\\":
                            b -= 1
                        if (k - b) % 2 == 1:
                            j = k + 1
                            continue
                    end = k + 3
                    while end < self.n and t[end] == q[0] and end - k < 5:
                        end += 1
                    return end
        q = t[i]
        j = i + 1
        while j < self.n:
            c = t[j]
            if c == "\\" and q == '"':
                j += 2
                continue
            if c == q:
                return j + 1
            if c == "\n":
                raise _Eof(start)
            j += 1
        raise _Eof(start)

    def _value(self, i: int, path: KeyPath) -> int:
        t = self.text
        if i >= self.n:
            raise _Eof(i)
        c = t[i]
        if c in "\"'":
            return self._string(i, i)
        if c == "[":
            start, i, idx = i, i + 1, 0
            while True:
                i = self._ws(i, True)
                if i >= self.n:
                    raise _Eof(start)
                if t[i] == "]":
                    return i + 1
                self._record((*path, idx), i)
                i = self._ws(self._value(i, (*path, idx)), True)
                if i < self.n and t[i] == ",":
                    i += 1
                    idx += 1
                elif i < self.n and t[i] == "]":
                    return i + 1
                else:
                    raise _Eof(start)
        if c == "{":
            start, i = i, i + 1
            while True:
                i = self._ws(i, False)
                if i >= self.n or t[i] == "\n":
                    raise _Eof(start)
                if t[i] == "}":
                    return i + 1
                if t[i] == ",":
                    i += 1
                    continue
                kpos = i
                keys, i = self._key(i)
                self._record((*path, *keys), kpos)
                i = self._ws(i, False)
                if i >= self.n or t[i] != "=":
                    raise ValueError("expected =")
                i = self._value(self._ws(i + 1, False), (*path, *keys))
        m = re.compile(r"[^,\]}\n#]*").match(t, i)
        assert m is not None
        return max(m.end(), i + 1)

    def _document(self) -> None:
        t = self.text
        table: tuple[str, ...] = ()
        i = 0
        while True:
            i = self._ws(i, True)
            if i >= self.n:
                return
            if t[i] == "[":
                hpos = i
                aot = t.startswith("[[", i)
                keys, i = self._key(i + (2 if aot else 1))
                table = keys
                self._record(table, hpos)
                i = self._ws(i, False)
                i += 2 if aot else 1
                continue
            kpos = i
            keys, i = self._key(i)
            self._record((*table, *keys), kpos)
            i = self._ws(i, False)
            if i >= self.n or t[i] != "=":
                raise ValueError("expected =")
            i = self._value(self._ws(i + 1, False), (*table, *keys))
