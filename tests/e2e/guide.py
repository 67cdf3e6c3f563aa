"""Reading a Markdown guide as a test follows it: its files, its layout tree and its shell commands.

- a fenced block whose first line is `# file: <path>` is that file, whole (`files`);
- the first fenced block after `## Layout` is a tree of the service's files (`layout`);
- a line of a ```sh block is a command, its `# ...` tail a comment (`command`).
"""
from __future__ import annotations

import re
from pathlib import Path

FENCE = re.compile(r"^```(?P<lang>[\w-]*)\n(?P<body>.*?)^```$", re.M | re.S)
FILE_MARK = re.compile(r"# file: (?P<path>\S+)\n")


class GuideError(AssertionError):
    """The guide does not hold what the test follows; the message says what to fix in it."""


def files(text: str) -> dict[str, str]:
    """{path: content} of the blocks marked `# file: <path>` on their first line."""
    found: dict[str, str] = {}
    for block in FENCE.finditer(text):
        mark = FILE_MARK.match(block["body"])
        if mark is None:
            continue
        path = mark["path"]
        if path in found or Path(path).is_absolute() or ".." in Path(path).parts:
            raise GuideError(f"`# file: {path}` is repeated or leaves the service's folder; give each file one block")
        found[path] = block["body"][mark.end():]
    return found


def write(text: str, root: Path) -> dict[str, Path]:
    """Write the guide's files under `root`; {path in the guide: file written}."""
    written = {}
    for path, content in files(text).items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
        written[path] = target
    return written


def layout(text: str) -> set[str]:
    """The files of the tree in the first fenced block after `## Layout` (folders end with /, comments follow)."""
    section = text.split("\n## Layout\n", 1)
    block = FENCE.search(section[-1]) if len(section) == 2 else None
    if block is None:
        raise GuideError("the guide has no `## Layout` section with a fenced tree of the service's files")
    folders: list[tuple[int, str]] = []  # (indent, path) of the open folders
    named = set()
    for line in block["body"].splitlines():
        if not line.strip():
            continue
        indent, name = len(line) - len(line.lstrip()), line.split()[0]
        while folders and folders[-1][0] >= indent:
            folders.pop()
        path = (f"{folders[-1][1]}/" if folders else "") + name.rstrip("/")
        if name.endswith("/"):
            folders.append((indent, path))
        else:
            named.add(path)
    return {path.split("/", 1)[1] for path in named if "/" in path}  # below the service's own folder


def command(text: str, start: str) -> tuple[str, str]:
    """(command, comment) of the one line of a ```sh block that starts with `start`."""
    lines = [line for block in FENCE.finditer(text) if block["lang"] == "sh"
             for line in block["body"].splitlines() if line.strip().startswith(start)]
    if len(lines) != 1:
        raise GuideError(f"the guide's sh blocks have {len(lines)} lines starting with {start!r}; the test runs one")
    run, _, comment = lines[0].partition(" #")
    return run.strip(), comment.strip()
