"""The README and docs/ hold together: every relative link (`](docs/memory.md)`, `](#seeds)`,
`](cli.md#flags)`, an image) names a file that exists and, after `#`, a heading of that file; the
README stays a front door (at most 300 lines) and shows the test command CI runs.

Anchors are GitHub's: the heading lowercased, punctuation dropped (letters, digits, `-`, `_` and
spaces kept), spaces turned into `-`, a repeated heading suffixed `-1`, `-2`, ...
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")


def documents() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def prose(path: Path) -> list[str]:
    """The lines of `path` outside fenced code blocks."""
    out, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            out.append(line)
    return out


def slug(heading: str) -> str:
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = "".join(c for c in text.lower() if c.isalnum() or c in "-_ ")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose(path):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    found = []
    for line in prose(path):
        line = re.sub(r"`[^`]*`", "", line)  # code spans are not links
        found += LINK.findall(line)
    return [t for t in found if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]  # http:, https:, mailto: ...


def broken_links(paths, root: Path = ROOT) -> list[str]:
    bad = []
    for path in paths:
        for target in links(path):
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            name = f"{path.relative_to(root)}: ]({target})"
            if not dest.exists():
                bad.append(f"{name}: no file {file}")
            elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
                bad.append(f"{name}: no heading #{anchor} in {dest.relative_to(root)}")
    return bad


def test_every_relative_link_resolves():
    bad = broken_links(documents())
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_the_readme_is_a_front_door():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move detail to docs/ (at most 300)"
    ci = [l.strip() for l in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in l and not l.startswith("#")]
    assert ci and all(c in (l.strip() for l in lines) for c in ci), f"README.md should show CI's test command {ci}"
    assert any("](docs/" in l for l in lines), "README.md should link to docs/"


def test_the_check_catches_a_broken_link_and_anchor(tmp_path):
    (tmp_path / "a.md").write_text("# A title: `--x`\n\n## Seeds\n\n## Seeds\n\n```\n# not a heading\n```\n"
                                   "[ok](#a-title---x) [ok](#seeds-1) [ok](b.md#b) [bad](#not-a-heading) "
                                   "[bad](c.md) [bad](b.md#nope) `[code](x.md)` [web](https://example.com/x)\n")
    (tmp_path / "b.md").write_text("# B\n")
    bad = broken_links([tmp_path / "a.md"], root=tmp_path)
    assert bad == ["a.md: ](#not-a-heading): no heading #not-a-heading in a.md", "a.md: ](c.md): no file c.md",
                   "a.md: ](b.md#nope): no heading #nope in b.md"]
