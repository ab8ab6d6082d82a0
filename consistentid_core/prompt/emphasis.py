"""ComfyUI's prompt-emphasis syntax, parsed so that the official token building sees plain text.

``(word:1.3)`` weighs a span 1.3, ``(word)`` 1.1 (nested spans multiply), ``\\(`` and ``\\)`` are
literal brackets; an unmatched bracket is kept as text.
"""

from __future__ import annotations

import re

_WEIGHT = re.compile(r"^(.*):\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*$", re.S)


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """[(plain segment, weight)] in order; joining the segments gives the text without the syntax."""
    segments: list[tuple[str, float]] = []

    def emit(piece: str, weight: float):
        if piece:
            segments.append((piece, weight))

    def parse(s: str, weight: float):
        i, buf = 0, []
        while i < len(s):
            c = s[i]
            if c == "\\" and i + 1 < len(s) and s[i + 1] in "()":
                buf.append(s[i + 1])
                i += 2
                continue
            if c == "(":
                close = _matching(s, i)
                if close is None:
                    buf.append(c)
                    i += 1
                    continue
                emit("".join(buf), weight)
                buf = []
                inner = s[i + 1 : close]
                m = _WEIGHT.match(inner)
                if m:
                    parse(m.group(1), weight * float(m.group(2)))
                else:
                    parse(inner, weight * 1.1)
                i = close + 1
                continue
            buf.append(c)
            i += 1
        emit("".join(buf), weight)

    parse(text, 1.0)
    return segments


def _matching(s: str, start: int) -> int | None:
    depth, i = 0, start
    while i < len(s):
        if s[i] == "\\":
            i += 2
            continue
        if s[i] == "(":
            depth += 1
        elif s[i] == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def strip_emphasis(text: str) -> str:
    return "".join(segment for segment, _ in parse_emphasis(text))
