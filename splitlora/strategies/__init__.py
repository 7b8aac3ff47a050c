"""The strategy registry. A strategy is a `Strategy` subclass (strategies/base.py) in a module of this
package named after it (`strategies/NAME.py` defining a class with `name = "NAME"`), or one that another
package declares under the entry-point group `splitlora.strategies` (`NAME = "package.module:Class"`).
Nothing registers itself on import: names are listed from the package's files and the entry points
(cheap: no torch), and a strategy's module is imported when it is asked for.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

GROUP = "splitlora.strategies"
_NOT_STRATEGIES = {"base"}


def _plugins() -> dict:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def _own() -> list[str]:
    return [m.name for m in pkgutil.iter_modules(__path__) if m.name not in _NOT_STRATEGIES and not m.name.startswith("_")]


def available() -> list[str]:
    """Every strategy name: this package's modules, then the installed plug-ins."""
    own = _own()
    return own + sorted(set(_plugins()) - set(own))


def get(name: str):
    """The strategy class called `name`; KeyError naming the known ones if there is none."""
    if name in _own():
        module = importlib.import_module(f"{__name__}.{name}")
        from .base import Strategy

        found = [c for c in vars(module).values()
                 if isinstance(c, type) and issubclass(c, Strategy) and c.name == name]
        if len(found) != 1:
            raise KeyError(f"strategies/{name}.py must define one Strategy subclass with name = {name!r}")
        return found[0]
    plugin = _plugins().get(name)
    if plugin is None:
        raise KeyError(f"unknown strategy {name!r} (known: {', '.join(available())})")
    cls = plugin.load()
    if getattr(cls, "name", None) != name:
        raise KeyError(f"strategy plug-in {name!r}: its class says name = {getattr(cls, 'name', None)!r}")
    return cls


def for_config(cfg):
    """The strategy class that runs `cfg` (its `strategy.name`, or a variant one of its options selects)."""
    return get(cfg.strategy.name).resolve(cfg)


def all_strategies() -> dict:
    """name -> class of every strategy (imports them all)."""
    return {name: get(name) for name in available()}
