"""MkDocs hooks (``hooks:`` in mkdocs.yml).

- The key reference of configuration.md is generated from the schema (``distill.recipes.describe``,
  the dataclasses of ``distill/config.py``), so no key is written twice.
- Pages link to ``../benchmarks/...`` (the right path on GitHub and in the docs test); the site
  serves a copy of ``benchmarks/`` under ``repo/benchmarks/`` and those links point at it. Its
  Markdown files are copied as files, not rendered, so --strict checks that every linked file
  exists, not the links inside the benchmarks' own Markdown.
"""
from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, Files

from distill.recipes import describe

MARKER = "<!-- config-keys -->"
ROOT = Path(__file__).resolve().parents[1]
SHARED = ("benchmarks",)  # repository folders the pages may link into
PREFIX = "repo"


class _Copied(File):
    """A file of the repository copied into the site as it is (a .md file is not rendered)."""

    def is_documentation_page(self) -> bool:
        return False


def key_reference() -> str:
    """One table per section: key, default, documentation."""
    sections: dict[str, list[tuple[str, str, str]]] = {}
    for key, default, doc in describe():
        sections.setdefault(key.split(".", 1)[0] if "." in key else "top level", []).append((key, default, doc))
    out = []
    for section, rows in sections.items():
        out += [f"### `{section}`" if section != "top level" else "### Top level", "",
                "| key | default | what |", "|---|---|---|"]
        out += [f"| `{key}` | `{_cell(default)}` | {_cell(doc)} |" for key, default, doc in rows]
        out.append("")
    return "\n".join(out)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def on_files(files: Files, config) -> Files:
    for folder in SHARED:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                uri = f"{PREFIX}/{path.relative_to(ROOT).as_posix()}"
                copied = _Copied.generated(config, uri, abs_src_path=str(path))
                files.append(copied)
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, key_reference())
    depth = page.file.src_uri.count("/")
    up = "../" * (depth + 1)
    for folder in SHARED:
        markdown = re.sub(rf"\]\({re.escape(up + folder)}/", f"]({'../' * depth}{PREFIX}/{folder}/", markdown)
    return markdown
