"""The import and coupling rules of COMMON.md / DESIGN.md, checked on the source (ast, via
scripts/arch_metrics.py): imports run one way, the proxy never loads torch, nodes use the engine's
methods and no one's private members, no import cycles, no function over 60 lines."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import arch_metrics as am  # noqa: E402

MODS = am.load(ROOT)
NODE_MODULES = [m for m in MODS.values() if m.package in am.NODE_PACKAGES]
PROXY_MODULES = [m for m in MODS.values() if m.package == "proxy"]


def _imports(mods, fragment: str) -> list[str]:
    return sorted(f"{m.name} -> {i}" for m in mods for i in am.internal(m.imports | m.lazy_imports, MODS)
                  if fragment in i)


def test_the_rules_see_the_code():  # a loader that found nothing would pass every rule below
    assert {"qwenvl_pd.proxy.http.app", "qwenvl_pd.decode_node.service", "qwenvl_pd.engine.llm_engine"} <= set(MODS)
    assert "qwenvl_pd.proxy.cluster.router" in MODS["qwenvl_pd.proxy.cluster.backend"].imports
    assert "torch" in {i.split(".")[0] for i in MODS["qwenvl_pd.model.processor"].imports}


def test_the_proxy_imports_neither_the_engine_nor_the_nodes():
    assert _imports(PROXY_MODULES, ".engine") + _imports(PROXY_MODULES, "_node") + \
        _imports(PROXY_MODULES, ".node.") == []


def test_the_proxys_import_closure_has_no_torch():
    assert am.proxy_torch(MODS) == []
    assert "torch" not in am.closure([m.name for m in PROXY_MODULES], MODS)


def test_importing_every_proxy_module_loads_no_torch():
    code = ("import importlib, pkgutil, sys, qwenvl_pd.proxy as p\n"
            "for m in pkgutil.walk_packages(p.__path__, 'qwenvl_pd.proxy.'): importlib.import_module(m.name)\n"
            "print(sorted(n for n in sys.modules if n.split('.')[0] in ('torch', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert (out.returncode, out.stdout.strip()) == (0, "[]"), out.stderr


def test_the_nodes_import_nothing_from_the_proxy():
    assert _imports(NODE_MODULES, ".proxy") == []


def test_nodes_never_reach_into_the_engines_scheduler_or_blocks():
    assert am.engine_reach_ins(MODS) == []


def test_the_engine_thread_takes_commands_not_closures():
    assert am.engine_closures(MODS) == []


def test_nodes_use_no_private_member_of_another_object():
    assert am.private_uses(MODS, am.NODE_PACKAGES) == []


def test_node_helpers_never_call_back_into_their_owner():
    assert am.owner_calls(MODS, am.NODE_PACKAGES) == []


def test_one_type_per_concept():
    found = am.duplicated_concepts(MODS)
    assert {k: len(found[k]) for k in ("roles tuple", "finish-reason types", "sequence -> SampledToken builders")} \
        == {"roles tuple": 1, "finish-reason types": 1, "sequence -> SampledToken builders": 1}
    assert am.repeated_config_fields(MODS) == []


def test_the_proxy_uses_no_private_member_of_another_object():
    assert am.private_uses(MODS, ["proxy"]) == []


def test_no_module_imports_another_modules_private_name():
    assert am.private_imports(MODS) == []


def test_no_import_cycles():
    assert am.cycles(MODS) == []


def test_no_function_over_60_lines():
    assert am.long_functions(MODS, 60) == []
