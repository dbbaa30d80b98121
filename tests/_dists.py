"""Temporary installed distributions for registry tests: a dist-info folder on sys.path.

``importlib.metadata`` finds a distribution through a ``NAME-VERSION.dist-info`` folder (with
``METADATA`` and ``entry_points.txt``) in any ``sys.path`` entry, exactly as pip leaves it.
"""
from __future__ import annotations

import os
import sys


def write_dist(root, name: str, version: str, entry_points: dict[str, dict[str, str]],
               modules: dict[str, str] | None = None) -> str:
    """Write a distribution into folder ``root`` (created) and return ``root`` as a string."""
    root = str(root)
    info = os.path.join(root, f"{name.replace('-', '_')}-{version}.dist-info")
    os.makedirs(info, exist_ok=True)
    with open(os.path.join(info, "METADATA"), "w") as fh:
        fh.write(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    with open(os.path.join(info, "entry_points.txt"), "w") as fh:
        for group, entries in entry_points.items():
            fh.write(f"[{group}]\n")
            for ep_name, target in entries.items():
                fh.write(f"{ep_name} = {target}\n")
            fh.write("\n")
    for filename, source in (modules or {}).items():
        path = os.path.join(root, filename)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fh.write(source)
    return root


def activate(monkeypatch, *roots: str) -> None:
    """Put ``roots`` on sys.path (undone by monkeypatch) and make the registry rediscover."""
    from vqext import registry

    for root in roots:
        monkeypatch.syspath_prepend(root)
    registry.refresh()


def pythonpath_env(*roots: str) -> dict:
    """An environment for a subprocess that sees ``roots`` too."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(list(roots) + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def forget_modules(prefix: str) -> None:
    for name in [m for m in sys.modules if m == prefix or m.startswith(prefix + ".")]:
        del sys.modules[name]
