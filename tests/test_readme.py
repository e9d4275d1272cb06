"""The README's tables say what the code does: every make target and every server flag,
each with its environment variable, and nothing that is not there."""

from __future__ import annotations

import re
from pathlib import Path

from services.cli import build_parser
from support import ROOT

README = (ROOT / "README.md").read_text()


def makefile_targets() -> set[str]:
    """The targets `make help` lists (a `## ` description makes a target public)."""
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-z][a-z-]*):[^\n]*## ", text, flags=re.MULTILINE))


def readme_targets(text: str = README) -> set[str]:
    """The targets named in the first cell of the README's make-target table."""
    cells = re.findall(r"^\| ((?:`make [a-z-]+`(?:, )?)+) +\|", text, flags=re.MULTILINE)
    return {name for cell in cells for name in re.findall(r"`make ([a-z-]+)`", cell)}


def server_flags() -> dict[str, str]:
    """Every flag `python -m services` takes, with the variable it falls back to (what
    `parse_config` reads: ECHO_ and the flag's destination)."""
    return {
        option: "ECHO_" + action.dest.upper()
        for action in build_parser()._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }


def readme_flags(text: str = README) -> dict[str, str]:
    """The flag table's rows: `--flag`s in the first cell, `ECHO_*`s in the second."""
    found: dict[str, str] = {}
    for first, second in re.findall(r"^\| (`--[^|]+?) +\| (`ECHO_[^|]+?) +\|", text, re.M):
        flags = re.findall(r"`(--[a-z-]+)`", first)
        names = re.findall(r"`(ECHO_[A-Z_]+)`", second)
        assert len(flags) == len(names), (first, second)
        found |= dict(zip(flags, names, strict=True))
    return found


def test_the_target_table_lists_every_public_target_and_no_other() -> None:
    assert readme_targets() == makefile_targets()


def test_the_flag_table_lists_every_flag_with_its_variable_and_no_other() -> None:
    assert readme_flags() == server_flags()


def test_a_stale_table_would_be_caught() -> None:
    # The readers are not vacuous: a missing row, or a row for nothing, is seen.
    assert readme_targets("| `make ps`, `make logs` | ... |\n| `make up`  | ... |") == {
        "ps",
        "logs",
        "up",
    }
    assert "page" in makefile_targets() and "help" in readme_targets()
    row = "| `--turn-messages`, `--linger` | `ECHO_TURN_MESSAGES`, `ECHO_LINGER` | 16 | x |"
    assert readme_flags(row) == {"--turn-messages": "ECHO_TURN_MESSAGES", "--linger": "ECHO_LINGER"}
    assert readme_flags(README.replace("| `--backlog`", "| `--back-log`")) != server_flags()


def test_every_test_the_readme_names_exists() -> None:
    # The Guarantees table names the tests that prove each line: a renamed or removed
    # test must not leave a promise without its proof.
    named = set(re.findall(r"\b(test_[a-z0-9_]+)\b", README))
    modules = sorted((ROOT / "tests").glob("test_*.py"))
    defined = {path.stem for path in modules} | {
        name
        for path in modules
        for name in re.findall(r"^def (test_[a-z0-9_]+)\(", path.read_text(), flags=re.M)
    }
    assert named, "the README names no test"
    assert named <= defined, sorted(named - defined)


def relative_links(path: Path) -> list[str]:
    """Markdown links and images in `path` that point into the repository."""
    targets = re.findall(r"\]\(([^)\s]+)\)", path.read_text())
    return [t for t in targets if not re.match(r"[a-z]+:|#", t)]


def test_every_link_in_the_readme_and_docs_leads_to_a_file() -> None:
    # docs/ moved its dated runs to docs/history/: a link into the old place would
    # send a reader nowhere.
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    broken = [
        f"{page.relative_to(ROOT)}: {target}"
        for page in pages
        for target in relative_links(page)
        if not (page.parent / target.partition("#")[0]).exists()
    ]
    assert len(pages) > 5
    assert not broken, broken
