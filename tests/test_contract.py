"""The client contract is declared once: every command of the message table is a method of both
transports and of the client role, has a handler in the client process and a check for its reply, and
the cost model prices every kind of bytes it names; strategies reach clients only through it; the
strategy registry lists without importing and takes plug-ins (the README's worked example)."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from splitlora import strategies
from splitlora.contract import COMMANDS, DOWN_KINDS, UP_KINDS, ClientHandle
from splitlora.cost import ROUND_KINDS, STEP_KINDS
from splitlora.roles import Client
from splitlora.transport.checks import REPLY_CHECKS
from splitlora.transport.client import HANDLERS
from splitlora.transport.local import LinkedClient
from splitlora.transport.server import RemoteClient

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = [n for n, v in vars(ClientHandle).items() if callable(v) and not n.startswith("_")]


def test_every_command_is_one_method_everywhere():
    assert set(HANDLERS) == set(COMMANDS)
    assert {c.reply for c in COMMANDS.values()} <= set(REPLY_CHECKS)
    for name in set(COMMANDS) - {"reset"}:   # reset: a new run, the client process's own initial state
        assert callable(getattr(Client, name, None)), name
    assert set(PROTOCOL) == set(COMMANDS) - {"reset"}
    for transport in (LinkedClient, RemoteClient):
        for name in PROTOCOL:   # the same signature as the contract's
            got = list(inspect.signature(getattr(transport, name)).parameters)
            assert got == list(inspect.signature(getattr(ClientHandle, name)).parameters), (transport, name)


def test_the_cost_model_prices_every_kind_of_the_table():
    assert set(UP_KINDS) | set(DOWN_KINDS) <= set(STEP_KINDS) | set(ROUND_KINDS)
    assert not set(UP_KINDS) & set(DOWN_KINDS)


def test_strategies_reach_clients_only_through_the_contract():
    for path in (ROOT / "splitlora" / "strategies").glob("*.py"):
        assert not re.search(r"\.client\b|\bc\._\w", path.read_text()), path   # no c.client, no c._private


def test_listing_strategies_imports_nothing_heavy():
    code = ("import sys; from splitlora.strategies import available; names = available(); "
            "print(names, [m for m in ('torch', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("[]") and "hsplitlora" in out


def test_every_strategy_declares_itself():
    classes = strategies.all_strategies()
    assert set(classes) == {"cenlora", "fedlora", "sl", "splitlora", "dlora", "hsplitlora", "hetlora"}
    assert [n for n, c in classes.items() if not c.deployable] == ["cenlora"]
    for name, cls in classes.items():
        assert cls.name == name and cls.__doc__ and inspect.getmodule(cls).__doc__


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(r"```python\n# my_strategies/locallora\.py\n(.*?)```", text, re.S).group(1)


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """The README's example strategy, installed as a plug-in (a module and an entry point on sys.path)."""
    (tmp_path / "my_strategies").mkdir()
    (tmp_path / "my_strategies" / "__init__.py").write_text("")
    (tmp_path / "my_strategies" / "locallora.py").write_text(_readme_example())
    info = tmp_path / "my_strategies-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-strategies\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[splitlora.strategies]\nlocallora = my_strategies.locallora:LocalLoRA\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_a_plugin_strategy_is_one_file_and_an_entry_point(plugin, make_config, tmp_path):
    from conftest import run_training

    assert "locallora" in strategies.available()
    cls = strategies.get("locallora")
    assert cls.name == "locallora" and cls.__module__ == "my_strategies.locallora"
    summary = run_training(make_config({"strategy.name": "locallora", "strategy.aggregation_interval": 1,
                                        "train.max_steps": 2}), tmp_path / "run")
    assert summary["round"] == 0 and summary["strategy"] == "locallora"   # it never aggregated
    with pytest.raises(KeyError, match="unknown strategy 'nope'"):
        strategies.get("nope")
