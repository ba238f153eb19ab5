"""Every error the package raises for the user derives from one base class, which decides how the CLI shows it."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import qk_sniffer
from qk_sniffer.errors import ConfigError, QkSnifferError, exit_code, is_expected

CONTROL_FLOW = {"StopForward"}  # raised and caught inside the capture, never shown to anyone


def _exception_classes():
    for info in pkgutil.walk_packages(qk_sniffer.__path__, "qk_sniffer."):
        if info.name in ("qk_sniffer.__main__", "qk_sniffer.tiny_checkpoints"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name:
                yield f"{info.name}.{name}", obj


def test_every_error_of_the_package_has_the_one_base():
    classes = dict(_exception_classes())
    assert len(classes) >= 15
    stray = [name for name, cls in classes.items()
             if not issubclass(cls, QkSnifferError) and name.rsplit(".", 1)[1] not in CONTROL_FLOW]
    assert stray == []


@pytest.mark.parametrize("exc, expected, code", [
    (ConfigError("dataset.split: ..."), True, 2),
    (QkSnifferError("x"), True, 1),
    (FileNotFoundError(2, "No such file", "a.yaml"), True, 1),
    (KeyError("bug"), False, 1),
])
def test_how_an_error_is_shown(exc, expected, code):
    assert is_expected(exc) is expected and exit_code(exc) == code


def test_the_cli_shows_a_package_error_without_a_traceback(tmp_path, capsys):
    from qk_sniffer.cli import main

    (tmp_path / "cfg.yaml").write_text("dataset: {path: json}\nmodell: {}\n", encoding="utf-8")
    assert main(["merge", "--config", str(tmp_path / "cfg.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid config file") and "'modell'" in err and "Traceback" not in err
