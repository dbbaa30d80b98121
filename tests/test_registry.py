"""Registry: discovery through entry points, laziness, conflicts, broken plugins, validation."""
import json
import subprocess
import sys

import pytest
import torch

import vqext
from vqext import registry
from vqext.errors import ConfigError, PluginError
from vqext.models.base import next_value

from _dists import activate, forget_modules, pythonpath_env, write_dist

BUILTIN_ARCHS = ["mhvqlnmlp", "vqformer", "vqlnmlp", "vqpatch"]
BUILTIN_PES = ["none", "randn", "rope", "sinpe"]


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch):
    monkeypatch.delenv("VQEXT_DISABLE_PLUGINS", raising=False)
    registry.refresh()
    yield
    registry.refresh()


def test_builtins_are_found_through_entry_points():
    assert set(BUILTIN_ARCHS) <= set(vqext.list_archs())
    assert set(BUILTIN_PES) <= set(vqext.list_pes())
    info = registry.describe()
    for e in info["architectures"] + info["positional_encodings"]:
        if e["name"] in BUILTIN_ARCHS + BUILTIN_PES:
            assert e["package"] == "vqext" and e["builtin"] and e["error"] is None
            assert e["version"] == vqext.__version__


def test_wildcards():
    assert vqext.list_archs("*vqlnmlp") == ["mhvqlnmlp", "vqlnmlp"]
    assert vqext.list_pes("r*") == ["randn", "rope"]
    assert vqext.list_archs("nothing*") == []


def test_listing_names_imports_no_architecture_module():
    code = ("import sys, vqext; names = vqext.list_archs() + vqext.list_pes(); "
            "assert 'vqlnmlp' in names; "
            "loaded = [m for m in ('vqext.models.log20241223', 'vqext.models.vqformer', 'vqext.pe.encodings') if m in sys.modules]; "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_names_list_known_and_near_matches():
    with pytest.raises(ConfigError, match=r"unknown architecture 'vqlnmpl'; did you mean 'vqlnmlp'.*known: .*vqformer"):
        vqext.create_model("vqlnmpl")
    with pytest.raises(ConfigError, match=r"unknown positional encoding 'ropee'; did you mean 'rope'"):
        vqext.create_model("vqlnmlp", pe="ropee")


def test_resolve_hparams_rebuilds_the_same_model():
    resolved = registry.resolve_hparams("mhvqlnmlp", "rope", heads=8, vocab_size=16)
    assert resolved == dict(vocab_size=16, d_model=64, heads=8, time_steps=96, quantizer="soft",
                            freeze_codebook=True, codebook_scale=None, commitment_weight=0.25)
    torch.manual_seed(3)
    a = vqext.create_model("mhvqlnmlp", "rope", heads=8, vocab_size=16)
    torch.manual_seed(3)
    b = vqext.create_model("mhvqlnmlp", "rope", **resolved)
    assert a.vqext_config == b.vqext_config == {"arch": "mhvqlnmlp", "pe": "rope", "hparams": resolved}
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_arch_lists_its_hparams_in_defaults():
    for name in vqext.list_archs():
        cls = registry.get_arch(name)
        assert "time_steps" in cls.defaults, name
        resolved = registry.resolve_hparams(name, "none")
        assert set(resolved) == set(cls.defaults)


@pytest.mark.parametrize("arch, pe, hparams, message", [
    ("mhvqlnmlp", "rope", dict(d_model=12, heads=4),
     r"mhvqlnmlp: rope needs an even width, got 3: d_model 12 / heads 4 gives head size 3"),
    ("vqformer", "rope", dict(d_model=24, heads=8),
     r"vqformer: rope needs an even width, got 3: d_model 24 / heads 8 gives head size 3"),
    ("vqlnmlp", "rope", dict(d_model=7), r"vqlnmlp: rope needs an even width, got 7: it encodes d_model 7"),
    ("mhvqlnmlp", "none", dict(d_model=64, heads=3),
     r"d_model 64 is not divisible by heads 3; choose heads among \[1, 2, 4, 8, 16, 32, 64\]"),
    ("vqlnmlp", "none", dict(heads=2), r"vqlnmlp' has no hyper-parameter 'heads'"),
    ("mhvqlnmlp", "none", dict(head=2), r"no hyper-parameter 'head' \(did you mean 'heads'\?\)"),
    ("vqformer", "none", dict(quantizer="medium"), r"quantizer must be 'soft'.*or 'hard'"),
    ("vqformer", "none", dict(heads=4, kv_heads=3), r"heads 4 must be a multiple of kv_heads 3"),
    ("vqformer", "none", dict(depth=0), r"depth must be a positive integer, got 0"),
    ("vqlnmlp", "none", dict(freeze_codebook="yes"), r"freeze_codebook must be true or false"),
    ("vqlnmlp", "none", dict(codebook_scale=-1.0), r"codebook_scale must be a positive number"),
])
def test_rejected_combinations_say_what_to_change(arch, pe, hparams, message):
    with pytest.raises(ConfigError, match=message):
        registry.resolve_hparams(arch, pe, **hparams)
    with pytest.raises(ConfigError, match=message):
        vqext.create_model(arch, pe, **hparams)


def _plugin(tmp_path, name, archs=None, pes=None, modules=None, version="1.0"):
    groups = {}
    if archs:
        groups[registry.ARCH_GROUP] = archs
    if pes:
        groups[registry.PE_GROUP] = pes
    return write_dist(tmp_path / name, name, version, groups, modules)


TINY_ARCH = '''
from vqext.models.log20241223 import VQLNMLP

class Tiny(VQLNMLP):
    accepted_pes = ("none",)
'''


def test_identical_duplicates_are_merged(tmp_path, monkeypatch):
    mod = {"dupmod.py": TINY_ARCH}
    a = _plugin(tmp_path, "dup-a", archs={"tiny": "dupmod:Tiny"}, modules=mod)
    b = write_dist(tmp_path / "dup-a-again", "dup-a", "1.0", {registry.ARCH_GROUP: {"tiny": "dupmod:Tiny"}})
    activate(monkeypatch, a, b)
    assert vqext.list_archs("tiny") == ["tiny"]
    assert not registry.describe()["conflicts"]
    model = vqext.create_model("tiny", d_model=8, vocab_size=4, time_steps=5)
    assert model(torch.randn(2, 5, 1)).shape == (2, 5, 1)
    forget_modules("dupmod")


def test_conflicts_builtin_wins_then_first_distribution(tmp_path, monkeypatch):
    mod = {"conflictmod.py": TINY_ARCH + "\nclass Other(Tiny):\n    pass\n"}
    zed = _plugin(tmp_path, "zed-plugin", archs={"vqlnmlp": "conflictmod:Tiny", "shared": "conflictmod:Tiny"},
                  modules=mod)
    abc = _plugin(tmp_path, "abc-plugin", archs={"shared": "conflictmod:Other"})
    activate(monkeypatch, zed, abc)
    from vqext.models.log20241223 import VQLNMLP

    assert registry.get_arch("vqlnmlp") is VQLNMLP
    assert registry.get_arch("shared").__name__ == "Other"  # abc-plugin sorts before zed-plugin
    conflicts = {c["name"]: c for c in registry.describe()["conflicts"]}
    assert conflicts["vqlnmlp"]["used"].startswith("vqext") and "zed-plugin" in conflicts["vqlnmlp"]["ignored"][0]
    assert conflicts["shared"]["used"].startswith("abc-plugin") and "zed-plugin" in conflicts["shared"]["ignored"][0]
    out = subprocess.run([sys.executable, "-m", "vqext", "list"], capture_output=True, text=True, check=True,
                         env=pythonpath_env(zed, abc)).stdout
    assert "Name conflicts" in out and "'shared': using abc-plugin" in out
    forget_modules("conflictmod")


BROKEN = dict(archs={"broken": "vqext_no_such_module:Model", "notamodel": "json:dumps",
                     "raises": "raisingmod:Model", "exits": "exitingmod:Model"},
              pes={"brokenpe": "vqext_no_such_module:PE"},
              modules={"raisingmod.py": "raise RuntimeError('plugin bug at import time')\n",
                       "exitingmod.py": "import sys\nsys.exit(3)\n"})


def test_broken_plugin_is_listed_with_its_error_and_the_rest_works(tmp_path, monkeypatch):
    broken = _plugin(tmp_path, "vqext-broken", **BROKEN)
    activate(monkeypatch, broken)
    assert {"broken", "notamodel", "raises"} <= set(vqext.list_archs())
    info = registry.describe()
    errors = {e["name"]: e for e in info["errors"]}
    assert "ModuleNotFoundError" in errors["broken"]["error"] and errors["broken"]["package"] == "vqext-broken"
    assert "not a subclass of vqext.models.base.ForecastModel" in errors["notamodel"]["error"]
    assert "plugin bug at import time" in errors["raises"]["error"]
    assert "ModuleNotFoundError" in errors["brokenpe"]["error"]
    assert errors["exits"]["error"] == "SystemExit: 3"
    with pytest.raises(PluginError, match=r"architecture 'broken' from vqext-broken .* failed to load"):
        vqext.create_model("broken")
    # Everything else still works.
    for arch in BUILTIN_ARCHS:
        extra = dict(heads=2) if arch != "vqlnmlp" else {}
        extra.update(direct_horizon=3, patch_len=2) if arch == "vqpatch" else None
        model = vqext.create_model(arch, "rope", d_model=8, vocab_size=4, time_steps=6, **extra)
        assert next_value(model, torch.randn(1, 6, 1)).shape == (1, 1, 1)

    env = pythonpath_env(broken)
    data = json.loads(subprocess.run([sys.executable, "-m", "vqext", "list", "--json"], capture_output=True,
                                     text=True, check=True, env=env).stdout)
    assert {e["name"] for e in data["errors"]} == {"broken", "notamodel", "raises", "exits", "brokenpe"}
    assert {"vqlnmlp", "vqformer"} <= {e["name"] for e in data["architectures"] if not e["error"]}
    text = subprocess.run([sys.executable, "-m", "vqext", "list"], capture_output=True, text=True, check=True,
                          env=env).stdout
    assert "Plugin errors:" in text and "plugin bug at import time" in text and "LOAD ERROR" in text


def test_disable_plugins_skips_third_party_entry_points(tmp_path, monkeypatch):
    broken = _plugin(tmp_path, "vqext-broken", **BROKEN)
    activate(monkeypatch, broken)
    assert "broken" in vqext.list_archs()
    monkeypatch.setenv("VQEXT_DISABLE_PLUGINS", "1")
    registry.refresh()
    assert vqext.list_archs() == BUILTIN_ARCHS and vqext.list_pes() == BUILTIN_PES
    info = registry.describe()
    assert not info["errors"] and info["plugins_disabled"]
    with pytest.raises(ConfigError, match="plugins are disabled"):
        vqext.create_model("broken")


def test_list_json_on_the_builtins():
    env = pythonpath_env()
    env.pop("VQEXT_DISABLE_PLUGINS", None)
    env["VQEXT_DISABLE_PLUGINS"] = "1"  # whatever else is installed, the built-ins alone
    data = json.loads(subprocess.run([sys.executable, "-m", "vqext", "list", "--json"], capture_output=True,
                                     text=True, check=True, env=env).stdout)
    archs = {e["name"]: e for e in data["architectures"]}
    pes = {e["name"]: e for e in data["positional_encodings"]}
    assert list(archs) == BUILTIN_ARCHS and list(pes) == BUILTIN_PES
    assert archs["vqformer"]["supports_cache"] is True and archs["vqformer"]["accepts"] == ["*"]
    assert archs["mhvqlnmlp"]["defaults"]["heads"] == 2
    assert pes["rope"]["mode"] == "rotate" and pes["randn"]["any_position"] is False
    assert all(e["package"] == "vqext" and e["version"] == vqext.__version__ for e in data["architectures"])
    assert data["errors"] == [] and data["plugins_disabled"] is True
    text = subprocess.run([sys.executable, "-m", "vqext", "list", "mh*"], capture_output=True, text=True,
                          check=True, env=env).stdout
    assert "mhvqlnmlp" in text and "vqformer" not in text
