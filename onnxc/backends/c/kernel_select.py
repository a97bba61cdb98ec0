"""Only the kernel functions a model calls: each kernel file is written without the top-level
functions nothing uses, so flash holds only what runs even without `--gc-sections`.

A kernel file is a sequence of top-level chunks: a function definition starts at column 0 with
its return type and name and ends at the `}` in column 0 (the comment block right above it goes
with it); everything else (includes, comments, types) is kept as it is. A public function is
dropped when the program does not call it and no other kept code names it; a static helper
when no kept function names it. A file this reader does not understand is written unchanged.
"""

from __future__ import annotations

import re

DEFINITION = re.compile(r"^(?:static\s+)?(?:inline\s+)?(?:const\s+)?[A-Za-z_][\w\s\*]*?\b([A-Za-z_]\w*)\s*\([^;]*$")

ONE_LINE = re.compile(r"^(?:static\s+)?(?:inline\s+)?[A-Za-z_][\w\s\*]*?\b([A-Za-z_]\w*)\s*\([^;{]*\)\s*\{.*\}\s*$")


def _chunks(text: str) -> list[tuple[str | None, str]] | None:
    """(function name or None, text) chunks; None when a definition does not close."""
    lines = text.splitlines(keepends=True)
    out: list[tuple[str | None, str]] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        top = line[:1] not in ("", " ", "\t", "#", "/", "*", "}", "\n")
        one = ONE_LINE.match(line) if top else None
        if one is not None:  # a whole definition on one line
            out.append((one.group(1), line))
            i += 1
            continue
        m = DEFINITION.match(line) if top else None
        if m is None:
            out.append((None, line))
            i += 1
            continue
        j = i
        while j < len(lines) and lines[j].rstrip("\n") != "}":
            j += 1
        if j == len(lines):
            return None
        comment: list[str] = []  # the comment block directly above belongs to the function
        if out and out[-1][0] is None and out[-1][1].rstrip().endswith("*/"):
            k = len(out) - 1
            while k >= 0 and out[k][0] is None and not out[k][1].startswith("/*"):
                k -= 1
            if k >= 0 and out[k][0] is None and out[k][1].startswith("/*"):
                comment = [c for _, c in out[k:]]
                del out[k:]
        out.append((m.group(1), "".join(comment + lines[i:j + 1])))
        i = j + 1
    return out


def select(text: str, used: set[str]) -> str | None:
    """`text` without the functions nothing reaches from `used`; None when no function is left."""
    chunks = _chunks(text)
    if chunks is None:
        return text
    functions = {name: body for name, body in chunks if name}
    keep = {name for name in functions if name in used}
    frontier = list(keep)
    while frontier:
        body = functions[frontier.pop()]
        for name in functions:
            if name not in keep and re.search(rf"\b{name}\b", body.split("{", 1)[-1]):
                keep.add(name)
                frontier.append(name)
    if not keep:
        return None
    return "".join(body for name, body in chunks if name is None or name in keep)


def defined(text: str) -> set[str]:
    """Names of the functions a kernel file defines."""
    chunks = _chunks(text) or []
    return {name for name, _ in chunks if name}
