"""bench/RESULTS.md holds one marked section per benchmark; each benchmark rewrites only its own.

    <!-- spine:start -->
    ...
    <!-- spine:end -->
"""

from __future__ import annotations

from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def write_section(path: Path | str, name: str, markdown: str) -> str:
    """Replace section `name` of the file at `path` with `markdown` (appended if absent; file created if missing).

    Returns the whole file's new text.
    """
    path = Path(path)
    start, end = markers(name)
    block = f"{start}\n{markdown.strip()}\n{end}"
    text = path.read_text() if path.exists() else ""
    i = text.find(start)
    j = text.find(end, i + len(start)) if i >= 0 else -1
    if i >= 0 and j >= 0:
        text = text[:i] + block + text[j + len(end) :]
    else:
        if i >= 0:
            raise ValueError(f"{path}: section {name!r} has a start marker but no end marker")
        text = text.rstrip("\n") + ("\n\n" if text.strip() else "") + block + "\n"
    path.write_text(text)
    return text
