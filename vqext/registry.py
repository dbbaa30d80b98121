"""Discovery of architectures and positional encodings through Python entry points.

Three entry-point groups, ``vqext.architectures`` (``ForecastModel`` subclasses),
``vqext.positional_encodings`` (``vqext.pe.PositionalEncoding`` subclasses) and ``vqext.baselines``
(factories of reference forecasters for ``vqext backtest``, see ``vqext.baselines``). vqext's own
entries are declared in its ``pyproject.toml`` exactly like a plugin's.

Rules:

* Lazy: names come from package metadata; a module is imported only when its entry is used
  (``get_arch``/``get_pe``/``create_model``) or described (``describe``, ``vqext list``).
* The same entry point seen twice (same name and target, e.g. after an editable install) is one.
* A real conflict (same name, different targets): vqext's built-in wins; among plugins the
  distribution whose name sorts first wins. The losers are reported in ``describe()``.
* A plugin that fails to import, or whose object is not the right kind of class, is recorded with
  its error; using it raises ``PluginError`` with that error, listing it shows it; nothing else is
  affected.
* ``VQEXT_DISABLE_PLUGINS=1`` (or ``true``/``yes``; anything else leaves them on) ignores every entry point not provided by vqext itself.
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib
import importlib.metadata as md
import os
import traceback
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, PluginError, Terminated

ARCH_GROUP = "vqext.architectures"
PE_GROUP = "vqext.positional_encodings"
BASELINE_GROUP = "vqext.baselines"
GROUPS = {"arch": ARCH_GROUP, "pe": PE_GROUP, "baseline": BASELINE_GROUP}
_KIND_WORD = {"arch": "architecture", "pe": "positional encoding", "baseline": "baseline"}
BUILTIN_DIST = "vqext"


def _normalise(dist_name: str) -> str:
    return dist_name.lower().replace("_", "-").replace(".", "-")


def plugins_disabled() -> bool:
    return os.environ.get("VQEXT_DISABLE_PLUGINS", "").strip().lower() in ("1", "true", "yes")


@dataclass
class Entry:
    """One registered name: where it comes from, and (once loaded) the class or the error."""

    kind: str  # "arch" | "pe"
    name: str
    target: str  # "module:attr"
    package: str
    version: str | None
    builtin: bool
    shadowed: list[str] = field(default_factory=list)  # conflicting providers that lost
    obj: Any = None
    error: str | None = None
    traceback: str | None = None  # of the load error, for --debug style reporting
    loaded: bool = False

    def load(self):
        if not self.loaded:
            self.loaded = True
            try:
                module_name, _, attr = self.target.partition(":")
                obj = importlib.import_module(module_name.strip())
                for part in attr.strip().split(".") if attr.strip() else []:
                    obj = getattr(obj, part)
                self._check_kind(obj)
                self.obj = obj
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - a broken plugin never breaks the rest
                if isinstance(exc, Terminated):
                    raise
                self.error = f"{type(exc).__name__}: {exc}"
                self.traceback = traceback.format_exc()
        if self.error:
            raise PluginError(f"{_KIND_WORD[self.kind]} {self.name!r} from {self.package} ({self.target}) "
                              f"failed to load: {self.error}")
        return self.obj

    def _check_kind(self, obj) -> None:
        if self.kind == "baseline":  # a factory: season -> forecaster (vqext.baselines)
            if not callable(obj):
                raise TypeError(f"{self.target} is {obj!r}, not callable (a baseline entry point is a factory "
                                f"taking the season length)")
            return
        from .models.base import ForecastModel
        from .pe.encodings import PositionalEncoding

        base = ForecastModel if self.kind == "arch" else PositionalEncoding
        if not (isinstance(obj, type) and issubclass(obj, base)):
            raise TypeError(f"{self.target} is {obj!r}, not a subclass of {base.__module__}.{base.__qualname__}")


_state: dict[str, dict[str, Entry]] = {}


def _source_entry_points(group: str):
    """Built-ins declared in pyproject.toml when vqext runs from a source tree without metadata."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")
    try:
        import tomllib

        with open(path, "rb") as fh:
            table = tomllib.load(fh)["project"]["entry-points"].get(group, {})
    except Exception:  # noqa: BLE001 - no pyproject next to the package: nothing to add
        return []
    return [md.EntryPoint(name=n, value=v, group=group) for n, v in table.items()]


def _discover(kind: str) -> dict[str, Entry]:
    group = GROUPS[kind]
    skip_plugins = plugins_disabled()
    candidates: dict[str, list[Entry]] = {}
    seen: set[tuple[str, str, str]] = set()
    found_builtin = False
    for ep in md.entry_points(group=group):
        dist = getattr(ep, "dist", None)
        package = dist.metadata["Name"] if dist is not None else "unknown"
        version = dist.version if dist is not None else None
        builtin = _normalise(package) == BUILTIN_DIST
        found_builtin |= builtin
        if skip_plugins and not builtin:
            continue
        key = (ep.name, ep.value.replace(" ", ""), _normalise(package))
        if key in seen:  # the same entry point listed twice (editable installs)
            continue
        seen.add(key)
        candidates.setdefault(ep.name, []).append(Entry(kind, ep.name, ep.value, package, version, builtin))
    if not found_builtin:
        from . import __version__

        for ep in _source_entry_points(group):
            candidates.setdefault(ep.name, []).append(
                Entry(kind, ep.name, ep.value, BUILTIN_DIST, __version__, True))
    entries = {}
    for name, options in candidates.items():
        # Identical targets from different distributions are one entry; the winning rule below.
        unique: dict[str, Entry] = {}
        for entry in sorted(options, key=lambda e: (not e.builtin, _normalise(e.package), e.target)):
            unique.setdefault(entry.target.replace(" ", ""), entry)
        winner, *losers = unique.values()
        winner.shadowed = [f"{e.package} {e.version or ''} ({e.target})".replace("  ", " ") for e in losers]
        entries[name] = winner
    return dict(sorted(entries.items()))


def _entries(kind: str) -> dict[str, Entry]:
    if kind not in _state:
        _state[kind] = _discover(kind)
    return _state[kind]


def refresh() -> None:
    """Forget what was discovered and loaded (after installing a plugin, or changing the env)."""
    _state.clear()
    importlib.invalidate_caches()


def _lookup(kind: str, name: str) -> Entry:
    entries = _entries(kind)
    if not isinstance(name, str) or name not in entries:
        known = ", ".join(entries) or "(none)"
        close = difflib.get_close_matches(str(name), list(entries), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"unknown {_KIND_WORD[kind]} {name!r}{hint} known: {known}"
                          + ("; plugins are disabled (VQEXT_DISABLE_PLUGINS)" if plugins_disabled() else ""))
    return entries[name]


#: ``vqext run`` without ``--arch`` or ``--horizon``: the log protocol's recommended model.
DEFAULT_ARCH = "vqformer"
#: With a horizon (``--horizon``, backtests, ``bench_m4``): the recommended forecaster (docs/results.md).
DEFAULT_FORECAST_ARCH = "vqpatch"


def default_arch(horizon=None) -> str:
    """The recommended forecaster for a run with a horizon, the log's recommended model without one."""
    return DEFAULT_FORECAST_ARCH if horizon else DEFAULT_ARCH


def get_arch(name: str):
    """The ``ForecastModel`` subclass registered as ``name`` (ConfigError/PluginError otherwise)."""
    return _lookup("arch", name).load()


def get_pe(name: str):
    """The ``PositionalEncoding`` subclass registered as ``name``."""
    return _lookup("pe", name).load()


def get_baseline(name: str):
    """The factory registered as baseline ``name`` (see ``vqext.baselines``)."""
    return _lookup("baseline", name).load()


def list_baselines(pattern: str = "*") -> list[str]:
    """Registered baseline names matching a shell-style wildcard (imports nothing)."""
    return [n for n in _entries("baseline") if fnmatch.fnmatchcase(n, pattern)]


def list_archs(pattern: str = "*") -> list[str]:
    """Registered architecture names matching a shell-style wildcard (imports nothing)."""
    return [n for n in _entries("arch") if fnmatch.fnmatchcase(n, pattern)]


def list_pes(pattern: str = "*") -> list[str]:
    """Registered positional-encoding names matching a shell-style wildcard (imports nothing)."""
    return [n for n in _entries("pe") if fnmatch.fnmatchcase(n, pattern)]


def accepts(arch_cls, pe: str) -> bool:
    accepted = tuple(getattr(arch_cls, "accepted_pes", ("*",)))
    return any(fnmatch.fnmatchcase(pe, pattern) for pattern in accepted)


def resolve_hparams(arch: str, pe: str = "none", **hparams) -> dict:
    """The architecture's defaults overridden by ``hparams``, validated for this encoding.

    Raises ``ConfigError`` saying what to change: an unknown name, an encoding the architecture
    does not accept, or an invalid combination (e.g. rope with an odd head size).
    ``create_model(arch, pe, **resolve_hparams(arch, pe, ...))`` rebuilds the same model.
    """
    cls = get_arch(arch)
    pe_cls = get_pe(pe)  # noqa: F841 - raises for an unknown or broken encoding
    if not accepts(cls, pe):
        raise ConfigError(f"architecture {arch!r} does not accept the positional encoding {pe!r}; "
                          f"it accepts: {', '.join(cls.accepted_pes)}")
    defaults = dict(getattr(cls, "defaults", {}))
    unknown = sorted(set(hparams) - set(defaults))
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, list(defaults), n=1, cutoff=0.6)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"architecture {arch!r} has no hyper-parameter {', '.join(hints)}; "
                          f"it accepts: {', '.join(defaults) or '(none)'}")
    resolved = {**defaults, **hparams}
    cls.validate(pe, **resolved)
    return resolved


def create_model(arch: str, pe: str = "none", **hparams):
    """Build a registered architecture with a registered positional encoding.

    The model gets ``vqext_config = {"arch", "pe", "hparams"}`` (hparams resolved) for checkpoints.
    """
    resolved = resolve_hparams(arch, pe, **hparams)
    model = get_arch(arch)(pe=pe, **resolved)
    model.vqext_config = {"arch": arch, "pe": pe, "hparams": dict(resolved)}
    return model


def describe() -> dict:
    """Everything ``vqext list`` shows: every entry (loaded to learn what it accepts), its source
    package and version, load errors and name conflicts."""
    out: dict[str, Any] = {"architectures": [], "positional_encodings": [], "errors": [], "conflicts": [],
                           "plugins_disabled": plugins_disabled()}
    for kind, key in (("arch", "architectures"), ("pe", "positional_encodings")):
        for entry in _entries(kind).values():
            try:
                obj = entry.load()
            except PluginError:
                obj = None
            info: dict[str, Any] = {"name": entry.name, "package": entry.package, "version": entry.version,
                                    "builtin": entry.builtin, "target": entry.target, "error": entry.error}
            if obj is not None and kind == "arch":
                info["accepts"] = list(getattr(obj, "accepted_pes", ("*",)))
                info["supports_cache"] = bool(getattr(obj, "supports_cache", False))
                info["supports_direct"] = bool(getattr(obj, "supports_direct", False))
                info["defaults"] = dict(getattr(obj, "defaults", {}))
            elif obj is not None:
                info["mode"] = obj.mode
                info["any_position"] = bool(obj.any_position)
            out[key].append(info)
            if entry.error:
                out["errors"].append({"kind": _KIND_WORD[kind], "name": entry.name, "package": entry.package,
                                      "version": entry.version, "target": entry.target, "error": entry.error})
            if entry.shadowed:
                out["conflicts"].append({"kind": _KIND_WORD[kind], "name": entry.name,
                                         "used": f"{entry.package} ({entry.target})", "ignored": entry.shadowed})
    return out


__all__ = ["get_arch", "get_pe", "get_baseline", "list_archs", "list_pes", "list_baselines", "resolve_hparams", "create_model", "describe",
           "refresh", "accepts", "Entry", "ARCH_GROUP", "PE_GROUP", "BASELINE_GROUP"]
