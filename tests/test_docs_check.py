"""The docs quote only what exists: commands, flags, config keys, recipes, links (see ``docs_check``)."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

from distill.cli import build_parser
from docs_check import Checker, ROOT, _subcommands, doc_files

FAULTY = """\
# A page

See [the objective](distillation.md), [a missing page](nowhere.md) and ![a figure](missing.png).
`[not a link](inside-code.md)` is code, and [the web](https://example.org) is not checked.

```bash
distill train quickstart optim.lr=1e-3 train.epochs=3 --resume   # all fine
distill trian quickstart
distill train quickstart --resumee
distill train quickstart optim.lrr=1e-3
distill train quickstart train.epochs=ten
distill train no_such_recipe
distill train recipes/missing.yaml
distill export runs/x --format tflite
accelerate launch --multi_gpu -m distill eval runs/x --jsn out.json
python benchmarks/no_such_script.py --seeds 0
```

```python
distill train nothing_checked_here
```
"""


def problems_of(text: str, checker: Checker | None = None) -> list[str]:
    return [f"{line}: {p}" for line, p in (checker or Checker()).check_markdown(text, ROOT / "docs")]


def test_every_doc_file_quotes_real_commands_flags_keys_recipes_and_links():
    files = doc_files()
    assert ROOT / "README.md" in files and len(files) > 5
    problems = Checker().check_repo()
    assert problems == [], "the docs quote what the code does not have:\n" + "\n".join(problems)


def test_the_checker_reports_each_kind_of_fault_on_its_line():
    problems = problems_of(FAULTY)
    expected = {
        3: ["'nowhere.md' does not resolve", "'missing.png' does not resolve"],
        8: ["unknown command `distill trian`; did you mean 'train'?"],
        9: ["`distill train` has no option --resumee; did you mean '--resume'?"],
        10: ["unknown key 'optim.lrr'; did you mean 'optim.lr'?"],
        11: ["'train.epochs' must be an integer, got 'ten'"],
        12: ["unknown recipe 'no_such_recipe'"],
        13: ["recipe file recipes/missing.yaml does not exist"],
        14: ["takes one of ['timm', 'hf', 'onnx'], not 'tflite'"],
        15: ["`distill eval` has no option --jsn"],
        16: ["script benchmarks/no_such_script.py does not exist"],
    }
    for line, fragments in expected.items():
        on_line = [p for p in problems if p.startswith(f"{line}: ")]
        for fragment in fragments:
            assert any(fragment in p for p in on_line), (line, fragment, problems)
    # Nothing else: the fine line (7), code spans, web links and the Python block are not reported.
    assert len(problems) == sum(map(len, expected.values())), problems


def test_placeholders_and_the_readers_own_recipe_pass():
    text = ("```console\n$ distill train <recipe> train.epochs=2\noutput that is not a command\n"
            "$ OMP_WAIT_POLICY=PASSIVE distill train my_recipe.yaml \\\n    --resume\n```\n")
    assert problems_of(text) == []


def test_a_renamed_flag_in_the_cli_fails_the_real_docs():
    parser = copy.deepcopy(build_parser())
    train = _subcommands(parser)["train"]
    resume = next(a for a in train._actions if "--resume" in a.option_strings)
    resume.option_strings = ["--continue"]
    problems = Checker(parser=parser).check_repo()
    assert any("`distill train` has no option --resume" in p for p in problems), problems


def test_a_removed_recipe_fails_the_real_docs():
    checker = Checker()
    checker.recipes = {k: v for k, v in checker.recipes.items() if k != "cifar10_deit_tiny"}
    problems = checker.check_repo()
    assert any("unknown recipe 'cifar10_deit_tiny'" in p for p in problems), problems


@dataclass
class _OptimRenamed:
    learning_rate: float | None = None


@dataclass
class _ConfigRenamed:
    optim: _OptimRenamed = field(default_factory=_OptimRenamed)


def test_a_renamed_config_key_fails_the_real_docs():
    problems = Checker(config=_ConfigRenamed).check_repo()
    assert any("unknown key 'optim.lr'" in p for p in problems), problems


def test_a_broken_link_fails_the_real_docs(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("[docs](docs/index.md) ![figure](benchmarks/results/cifar10.png)\n")
    (tmp_path / "docs" / "index.md").write_text("[back](../README.md) [gone](teachers.md)\n")
    problems = Checker(root=tmp_path).check_repo()
    assert problems == ["README.md:1: link or image 'benchmarks/results/cifar10.png' does not resolve",
                        "docs/index.md:1: link or image 'teachers.md' does not resolve"]
