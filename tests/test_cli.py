"""The command line: listings, --help from the schema, and one-line errors with exit status 2."""
from __future__ import annotations

import subprocess
import sys

import pytest

import distill
from distill.cli import main as cli


def test_listings(capsys):
    assert cli(["students"]) == 0
    listed = capsys.readouterr().out.split()
    assert {"deit_tiny", "vit_tiny", "cait_xxs24", "cmt_ti", "dhvt_tiny_cifar_p4"} <= set(listed)
    assert cli(["teachers"]) == 0
    assert {"regnety_160", "resnet50", "resnet18_cifar"} <= set(capsys.readouterr().out.split())
    assert cli(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "cifar10_deit_tiny" in out and "quickstart" in out


def test_train_help_is_the_schema(capsys):
    with pytest.raises(SystemExit) as exc:
        cli(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "distill.soft_norm" in out and "numel" in out  # key, and its docstring
    assert "optim.lr" in out and "--resume" in out


def test_print_config_resolves_recipe_and_overrides(capsys):
    assert cli(["train", "cifar10_deit_tiny", "optim.lr=1e-3", "distill.kind=soft", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.001" in out and "kind: soft" in out and "source: uoft-cs/cifar10" in out


@pytest.mark.parametrize("args, expected", [
    (["train", "cifar10_deit_tiny", "optim.lrr=1e-3"], "did you mean 'optim.lr'"),
    (["train", "cifar10_deit_tiny", "train.epochs=many"], "'train.epochs' must be an integer"),
    (["train", "cifar10_deit_tny"], "did you mean 'cifar10_deit_tiny'"),
    (["train", "cifar10_deit_tiny", "student.name=deit_tinny", "data.source=/nonexistent/data"], "/nonexistent/data"),
    (["eval", "/nonexistent/run"], "neither a run folder nor an exported student"),
    (["train", "cifar10_deit_tiny", "student.joint=mean"], "'student.joint' must be one of ['logits', 'softmax']"),
])
def test_bad_input_is_one_line_and_exit_2(args, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []  # a run that fails before it starts leaves no folder behind


def test_console_script_and_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "distill", "train", "nope_recipe"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: unknown recipe 'nope_recipe'")


# torch's OpenMP reads OMP_WAIT_POLICY once, when torch loads: the CLI must set it before that.
PROBE = ("import os, sys; import distill.cli; "
         "import torch; print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)")


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_cli_makes_openmp_threads_wait_passively_unless_told(given, expected):
    import os

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    # Importing the CLI must not load torch: the setting would come too late for OpenMP.
    loaded = subprocess.run([sys.executable, "-c", "import sys, distill.cli; print('torch' in sys.modules)"],
                            capture_output=True, text=True, env=env)
    assert loaded.stdout.split() == ["False"], loaded.stderr
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env)
    assert result.stdout.split() == [expected, "True"], result.stderr


FINALIZER_PROBE = """
import gc, signal, sys, time, weakref
from distill import cli
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background shell starts Python with SIGINT ignored
sys.unraisablehook = cli._keep_interrupts                 # as cli.main() does
class Thing: pass
def interrupted_finalizer(_):
    raise KeyboardInterrupt                               # Ctrl-C landing in a weakref callback
thing = Thing(); ref = weakref.ref(thing, interrupted_finalizer)
try:
    del thing                                             # Python reports the callback's exception as "ignored"
    deadline = time.time() + 10
    while time.time() < deadline:
        time.sleep(0.01)
    print("lost")
except KeyboardInterrupt:
    print("delivered")
"""


def test_a_ctrl_c_swallowed_by_a_finalizer_is_delivered_again():
    """Python reports a KeyboardInterrupt raised inside a weakref callback as "ignored" and drops it; the
    CLI's hook sends SIGINT again, so the interrupt reaches the loop (seen under load in CI). Run through
    Python's real unraisable path: raising it from inside the hook was lost a second time."""
    result = subprocess.run([sys.executable, "-c", FINALIZER_PROBE], capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["delivered"], result.stderr
    assert result.stderr == ""  # no "Exception ignored" traceback either


def test_the_interrupt_hook_passes_everything_else_on():
    from types import SimpleNamespace

    from distill.cli import _keep_interrupts

    seen = []
    unraisable = SimpleNamespace(exc_type=ValueError)
    _keep_interrupts(unraisable, default=seen.append)
    assert seen == [unraisable]  # handed on once, as it came


def test_a_bug_of_ours_is_a_traceback_not_a_user_error(capsys, monkeypatch):
    """A KeyError raised by our own code is a bug: its traceback, then one line saying so and where to
    report it; never the tidy `error:` line of a user's mistake (which would hide it)."""
    import students

    def broken():
        return {}["no such key"]  # a deliberate internal KeyError

    monkeypatch.setattr(students, "list_students", broken)
    assert cli(["students"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert not any(line.startswith("error:") for line in err)
    assert "Traceback (most recent call last):" in err and err[-2] == "KeyError: 'no such key'"
    assert err[-1].startswith(f"distill {distill.__version__} hit a bug (not a problem with your input): please "
                              "report it with the traceback above at https://")
    assert err[-1].endswith("/issues")


def test_every_user_error_has_the_one_root():
    """Each error class the code raises for the user derives from DistillError, which the CLI catches."""
    import ast

    from conftest import REPO
    from distill.errors import DistillError

    for package in ("distill", "students", "teachers"):
        for path in (REPO / package).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                    module = __import__(f"{package}.{path.stem}", fromlist=[node.name])
                    assert issubclass(getattr(module, node.name), DistillError), (path.name, node.name)
