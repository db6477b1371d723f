"""What the docs quote must exist in the code: the checker behind ``tests/test_docs_check.py``.

It reads README.md and docs/*.md and reports, as ``file:line: problem``, without running anything:

- in fenced shell blocks (``bash``, ``sh``, ``shell``, ``console``; in ``console`` only the lines
  after a ``$ `` prompt): every ``distill <command>`` (also ``python -m distill`` and
  ``accelerate launch ... -m distill``) names a command of ``distill.cli.build_parser()``; every
  ``--flag`` is an option of that command, and a value given to an option with choices is one of
  them; every ``section.key=value`` of a command that takes overrides is applied with
  ``distill.recipes.apply_override``, the very code that checks the command line, so an unknown key
  or a value of the wrong type is reported with the CLI's own message; the recipe of ``train``,
  ``train-teacher`` and ``cache-teacher`` exists; a ``python <script>.py`` exists in the repository.
- every relative link and image of the Markdown (outside code) resolves: README.md's relative to the
  repository root, a docs page's relative to docs/. Web links and in-page anchors are not checked.

Recipes: a built-in name (``distill.recipes.list_recipes()``), a YAML path that exists relative to
the repository root, or one of two placeholders for the reader's own recipe: ``<recipe>`` (any
``<...>``) and a YAML file whose name starts with ``my_`` (``my_recipe.yaml``). Anything else is
reported, so a renamed or deleted recipe fails.

Lines are joined at a trailing backslash; ``# comments`` are dropped; commands chained with ``&&``,
``||``, ``;`` or ``|`` are checked one by one; leading ``NAME=value`` environment settings are
skipped. Running ``python <block>`` Python blocks is left to ``tests/test_docs.py``.
"""
from __future__ import annotations

import argparse
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from distill.atomic import closest
from distill.cli import build_parser
from distill.config import Config, ConfigError
from distill.recipes import apply_override, list_recipes

ROOT = Path(__file__).resolve().parents[1]
SHELL_INFOS = {"bash", "sh", "shell", "console"}
RECIPE_COMMANDS = {"train", "train-teacher", "cache-teacher", "plan"}
OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")
ENV_SETTING = re.compile(r"^[A-Z_][A-Z0-9_]*=")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^\s`]*)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")


def doc_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


@dataclass
class Checker:
    """The code the docs are checked against; tests swap in a renamed flag, key or recipe."""

    parser: argparse.ArgumentParser = field(default_factory=build_parser)
    recipes: dict[str, Any] = field(default_factory=list_recipes)
    config: Callable[[], Any] = Config
    root: Path = ROOT

    def check_file(self, path: Path) -> list[str]:
        """Problems of one Markdown file; links resolve from its folder (README.md: the root)."""
        text = path.read_text(encoding="utf-8")
        where = path.relative_to(self.root).as_posix() if path.is_relative_to(self.root) else str(path)
        return [f"{where}:{line}: {problem}" for line, problem in self.check_markdown(text, path.parent)]

    def check_markdown(self, text: str, base: Path) -> list[tuple[int, str]]:
        problems: list[tuple[int, str]] = []
        prose: list[tuple[int, str]] = []
        for kind, info, first, lines in _split_fences(text.splitlines()):
            if kind == "code":
                if info in SHELL_INFOS:
                    problems += self.check_shell(lines, first, console=info == "console")
            else:
                prose += [(first + i, line) for i, line in enumerate(lines)]
        for number, line in prose:
            for target in LINK.findall(CODE_SPAN.sub("", line)):
                problem = self.check_link(target, base)
                if problem:
                    problems.append((number, problem))
        return sorted(problems)

    def check_link(self, target: str, base: Path) -> str | None:
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
            return None  # a web address, mailto:, or an anchor of the same page
        path = target.split("#", 1)[0].split("?", 1)[0]
        if not (base / path).exists():
            return f"link or image {target!r} does not resolve"
        return None

    def check_shell(self, lines: list[str], first: int, console: bool = False) -> list[tuple[int, str]]:
        problems = []
        for number, command in _shell_commands(lines, first, console):
            try:
                tokens = _tokens(command)
            except ValueError as e:
                problems.append((number, f"cannot split the shell line: {e}"))
                continue
            for segment in _segments(tokens):
                problems += [(number, p) for p in self.check_segment(segment)]
        return problems

    def check_segment(self, words: list[str]) -> list[str]:
        while words and ENV_SETTING.match(words[0]):
            words = words[1:]
        if not words:
            return []
        if words[0] == "distill":
            return self.check_distill(words[1:])
        if "-m" in words and words.index("-m") + 1 < len(words) and words[words.index("-m") + 1] == "distill":
            return self.check_distill(words[words.index("-m") + 2:])
        if re.fullmatch(r"python3?", words[0]) and len(words) > 1 and words[1].endswith(".py"):
            if not (self.root / words[1]).is_file():
                return [f"script {words[1]} does not exist"]
        return []

    def check_distill(self, args: list[str]) -> list[str]:
        commands = _subcommands(self.parser)
        if not args:
            return ["`distill` without a command"]
        if args[0] not in commands:
            return [f"unknown command `distill {args[0]}`{_hint(args[0], commands)}"]
        command, sub = args[0], commands[args[0]]
        options = {opt: action for action in sub._actions for opt in action.option_strings}
        takes_overrides = any(a.dest == "overrides" for a in sub._actions)
        problems, positionals = [], []
        rest = args[1:]
        while rest:
            word, rest = rest[0], rest[1:]
            if word.startswith("-"):
                name, eq, value = word.partition("=")
                action = options.get(name)
                if action is None:
                    problems.append(f"`distill {command}` has no option {name}{_hint(name, options)}")
                    continue
                if not eq and action.nargs == "?" and rest and not rest[0].startswith("-") and not OVERRIDE.match(rest[0]):
                    value, rest = rest[0], rest[1:]
                elif not eq and action.nargs is None:
                    if not rest:
                        problems.append(f"`distill {command} {name}` needs a value")
                        continue
                    value, rest = rest[0], rest[1:]
                if value and action.choices is not None and value not in action.choices:
                    problems.append(f"`distill {command} {name}` takes one of {list(action.choices)}, not {value!r}")
            elif takes_overrides and OVERRIDE.match(word):
                problems += self.check_override(word)
            else:
                positionals.append(word)
        if command in RECIPE_COMMANDS and positionals:
            problems += self.check_recipe(positionals[0])
        return problems

    def check_override(self, item: str) -> list[str]:
        try:
            apply_override(self.config(), item)
        except ConfigError as e:
            return [str(e)]
        return []

    def check_recipe(self, name: str) -> list[str]:
        if name in self.recipes or (name.startswith("<") and name.endswith(">")):
            return []
        if name.endswith((".yaml", ".yml")):
            if (self.root / name).is_file() or Path(name).name.startswith("my_"):
                return []
            return [f"recipe file {name} does not exist (a reader's own recipe is named my_*.yaml)"]
        return [f"unknown recipe {name!r}{_hint(name, self.recipes)}"]

    def check_repo(self) -> list[str]:
        return [problem for path in doc_files(self.root) for problem in self.check_file(path)]


def _hint(name: str, choices) -> str:
    close = closest(name, list(choices))
    return f"; did you mean {close!r}?" if close else ""


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def _split_fences(lines: list[str]):
    """(kind, info, first line number, lines): 'text' runs and 'code' blocks with their info word."""
    out, current, start, fence, info = [], [], 1, None, ""
    for number, line in enumerate(lines, 1):
        match = FENCE.match(line)
        if fence is None and match:
            out.append(("text", "", start, current))
            fence, info, current, start = match.group(2), match.group(3).lower(), [], number + 1
        elif fence is not None and line.strip().startswith(fence) and not line.strip().strip(fence[0]):
            out.append(("code", info, start, current))
            fence, current, start = None, [], number + 1
        else:
            current.append(line)
    out.append(("code" if fence else "text", info if fence else "", start, current))
    return out


def _shell_commands(lines: list[str], first: int, console: bool):
    """(line number, command): prompts stripped, backslash continuations joined."""
    pending, pending_at = "", first
    for number, line in enumerate(lines, first):
        stripped = line.strip()
        if not pending:
            if console and not stripped.startswith("$ "):
                continue
            stripped = stripped[2:] if stripped.startswith("$ ") else stripped
            pending_at = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        yield pending_at, pending + stripped
        pending = ""
    if pending:
        yield pending_at, pending


def _tokens(command: str) -> list[str]:
    lexer = shlex.shlex(command, posix=True, punctuation_chars="|&;")
    lexer.whitespace_split = True
    return list(lexer)


def _segments(tokens: list[str]) -> list[list[str]]:
    segments, current = [], []
    for token in tokens:
        if token and set(token) <= set("|&;"):
            segments.append(current)
            current = []
        else:
            current.append(token)
    return [s for s in segments + [current] if s]
