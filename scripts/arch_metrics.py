"""Architecture numbers of qwenvl_pd read from its source alone (ast; nothing is imported), so it
runs on any checkout:

    python scripts/arch_metrics.py [ROOT]      # ROOT: a checkout (default: this one)

Prints the proxy's shape (files, directories, import floors), the reach-ins (node modules using an
engine's scheduler or block manager, modules using another module's private members), concepts
defined more than once, and a request's walk from the proxy to decode (RPCs and the calls going
back and forth between the proxy's backend and its layer-wise round).
tests/unit/test_architecture.py asserts on the same functions.
"""
from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "qwenvl_pd"
NODE_PACKAGES = ("node", "decode_node", "prefill_node", "encode_node")
ENGINE_INTERNALS = ("scheduler", "blocks", "requests_total")  # what only the engine itself may touch
ENGINE_THREAD_CALLS = ("submit", "call", "settle", "send")  # what hands work to the engine thread
OWNER_PARAMS = ("service", "owner")  # an __init__ parameter so named: the helper's owner


@dataclass
class Module:
    name: str  # dotted
    path: Path
    tree: ast.Module
    imports: set[str] = field(default_factory=set)  # module-level, outside TYPE_CHECKING
    lazy_imports: set[str] = field(default_factory=set)  # inside functions

    @property
    def package(self) -> str:  # "proxy", "node", ... ("" for top-level modules)
        parts = self.name.split(".")
        return parts[1] if len(parts) > 2 else ""


def load(root: Path) -> dict[str, Module]:
    mods = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        if path.name.endswith("_pb2.py") or path.name.endswith("_pb2_grpc.py"):
            continue  # generated
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = Module(name, path, ast.parse(path.read_text(), str(path)))
    for mod in mods.values():
        _collect_imports(mod, mods)
    return mods


def _is_type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def _import_targets(node: ast.Import | ast.ImportFrom, mod: Module, mods: dict) -> Iterator[str]:
    if isinstance(node, ast.Import):
        yield from (a.name for a in node.names)
        return
    base = node.module or ""
    if node.level:  # relative: resolve against the importing module's package
        pkg = mod.name.split(".")[: -node.level + (mod.path.name == "__init__.py") or None]
        base = ".".join(pkg + ([base] if base else []))
    for a in node.names:
        yield f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base


def _collect_imports(mod: Module, mods: dict) -> None:
    def walk(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue  # never runs
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                (mod.lazy_imports if lazy else mod.imports).update(_import_targets(child, mod, mods))
            # a package's lazy __getattr__ runs only for the names it hands out, not on import
            skip = isinstance(child, ast.FunctionDef) and child.name == "__getattr__"
            if not skip:
                walk(child, lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))
    walk(mod.tree, False)


def internal(names: Iterable[str], mods: dict) -> set[str]:
    return {n for n in names if n in mods}


def closure(starts: Iterable[str], mods: dict[str, Module]) -> set[str]:
    """Every module (ours, and the top-level names of others) importing starts may load."""
    seen, todo = set(), list(starts)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in mods:
            parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
            todo += parents + list(mods[name].imports | mods[name].lazy_imports)
    return {n if n in mods else n.split(".")[0] for n in seen}


def cycles(mods: dict[str, Module]) -> list[list[str]]:
    """Strongly connected groups (more than one module) of the module-level import graph."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in internal(mods[v].imports, mods):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
                on.discard(group[-1])
            if len(group) > 1:
                out.append(sorted(group))
    sys.setrecursionlimit(10_000)
    for v in mods:
        if v not in index:
            visit(v)
    return out


def floors(mods: dict[str, Module], prefix: str) -> int:
    """Longest chain of module-level imports among the modules under prefix."""
    inside = {n for n in mods if n.startswith(prefix)}
    depth: dict[str, int] = {}

    def d(n: str, path: frozenset) -> int:
        if n not in depth:
            deps = [w for w in internal(mods[n].imports, mods) if w in inside and w not in path]
            depth[n] = 1 + max((d(w, path | {n}) for w in deps), default=0)
        return depth[n]
    return max((d(n, frozenset()) for n in inside), default=0)


def _attributes(mod: Module) -> Iterator[ast.Attribute]:
    return (n for n in ast.walk(mod.tree) if isinstance(n, ast.Attribute))


def _owner_is_self(node: ast.Attribute) -> bool:
    return isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")


def engine_reach_ins(mods: dict[str, Module]) -> list[str]:
    """x.scheduler / x.blocks in node modules, x not the module's own self."""
    return [f"{m.name}:{a.lineno} {ast.unparse(a)}" for m in mods.values() if m.package in NODE_PACKAGES
            for a in _attributes(m) if a.attr in ENGINE_INTERNALS and not _owner_is_self(a)]


def engine_closures(mods: dict[str, Module]) -> list[str]:
    """Code handed to the engine thread as a lambda (submit/call/settle/send(lambda: ...)):
    the engine thread takes typed commands (engine/commands.py) instead."""
    return [f"{m.name}:{c.lineno} {ast.unparse(c)[:70]}" for m in mods.values()
            if m.package in NODE_PACKAGES or m.name.endswith("engine.loop")
            for c in ast.walk(m.tree) if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute)
            and c.func.attr in ENGINE_THREAD_CALLS and any(isinstance(a, ast.Lambda) for a in c.args)]


def _pairs(n: ast.Assign) -> Iterator[tuple[str, str]]:
    """(target, value) of an assignment, tuples unpacked: `a, b = x, y` -> (a, x), (b, y)."""
    t, v = n.targets[0], n.value
    if isinstance(t, ast.Tuple) and isinstance(v, ast.Tuple) and len(t.elts) == len(v.elts):
        yield from ((ast.unparse(x), ast.unparse(y)) for x, y in zip(t.elts, v.elts))
    else:
        yield ast.unparse(t), ast.unparse(v)


def _owner_aliases(mod: Module) -> set[str]:
    """Names under which a helper class holds the object that made it: an __init__ parameter
    named like an owner, the self attributes and locals it is copied into."""
    aliases = {a.arg for f in ast.walk(mod.tree) if isinstance(f, ast.FunctionDef) and f.name == "__init__"
               for a in f.args.args if a.arg in OWNER_PARAMS}
    for _ in range(2):  # self.svc = service, then svc = self.svc
        aliases |= {t for n in ast.walk(mod.tree) if isinstance(n, ast.Assign) for t, v in _pairs(n)
                    if v in aliases}
    return aliases


def owner_calls(mods: dict[str, Module], packages: Iterable[str]) -> list[str]:
    """A helper's uses of the object that owns it (svc.x): hops back into the owner, where the
    helper should be handed what it needs instead."""
    packages, out = set(packages), []
    for m in (m for m in mods.values() if m.package in packages):
        aliases = _owner_aliases(m)
        out += [f"{m.name}:{a.lineno} {ast.unparse(a)}" for a in _attributes(m) if ast.unparse(a.value) in aliases]
    return out


def service_state(mods: dict[str, Module], module: str, cls: str) -> list[str]:
    """The dicts a service keeps in its __init__ (per-request state spread over them)."""
    mod = mods.get(module)
    init = next((f for c in ast.walk(mod.tree) if isinstance(c, ast.ClassDef) and c.name == cls
                 for f in c.body if isinstance(f, ast.FunctionDef) and f.name == "__init__"), None) if mod else None
    out = []
    for n in ast.walk(init) if init else ():
        target = n.target if isinstance(n, ast.AnnAssign) else (n.targets[0] if isinstance(n, ast.Assign) else None)
        shown = ast.unparse(n) if target is not None else ""
        if target is not None and ("dict[" in shown or isinstance(n.value, ast.Dict)):
            out.append(ast.unparse(target))
    return out


def repeated_config_fields(mods: dict[str, Module]) -> list[str]:
    """Fields NodeConfig declares again although StackConfig has them (it should hold one)."""
    def fields(name: str) -> set[str]:
        return {ast.unparse(s.target) for m in mods.values() for c in ast.walk(m.tree)
                if isinstance(c, ast.ClassDef) and c.name == name for s in c.body if isinstance(s, ast.AnnAssign)}
    return sorted(fields("NodeConfig") & fields("StackConfig"))


# private names of the standard library and namedtuple that are their public interface
ALLOWED_PRIVATE = {"_replace", "_asdict", "_fields", "_exit", "_getframe", "_make"}


def _own_class(a: ast.Attribute, classes: set[str]) -> bool:
    return isinstance(a.value, ast.Name) and a.value.id in classes


def private_uses(mods: dict[str, Module], packages: Iterable[str]) -> list[str]:
    """x._name where x is neither self/cls nor a class of the same module: another object's
    private member (dunders aside)."""
    packages, out = set(packages), []
    for m in (m for m in mods.values() if m.package in packages):
        classes = {c.name for c in ast.walk(m.tree) if isinstance(c, ast.ClassDef)}
        out += [f"{m.name}:{a.lineno} {ast.unparse(a)}" for a in _attributes(m)
                if a.attr.startswith("_") and not a.attr.startswith("__") and a.attr not in ALLOWED_PRIVATE
                and not _owner_is_self(a) and not _own_class(a, classes)]
    return out


def private_imports(mods: dict[str, Module]) -> list[str]:
    """from qwenvl_pd.x import _name: another module's private function or constant."""
    return [f"{m.name}:{n.lineno} {n.module}.{a.name}" for m in mods.values() for n in ast.walk(m.tree)
            if isinstance(n, ast.ImportFrom) and (n.module or "").startswith(PACKAGE)
            for a in n.names if a.name.startswith("_") and not a.name.startswith("__")]


def long_functions(mods: dict[str, Module], limit: int = 60) -> list[str]:
    return [f"{m.name}.{f.name} ({f.end_lineno - f.lineno + 1} lines)" for m in mods.values()
            for f in ast.walk(m.tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            and f.end_lineno - f.lineno + 1 > limit]


def _role_tuples(mod: Module) -> Iterator[str]:
    for n in ast.walk(mod.tree):
        if isinstance(n, ast.Assign) and isinstance(n.value, ast.Tuple):
            values = {e.value for e in n.value.elts if isinstance(e, ast.Constant)}
            if {"prefill", "decode"} <= values:
                yield f"{mod.name}.{ast.unparse(n.targets[0])}"


def _classes_with_address(mod: Module) -> Iterator[str]:
    for c in ast.walk(mod.tree):
        if isinstance(c, ast.ClassDef) and any(isinstance(s, ast.AnnAssign) and ast.unparse(s.target) == "address"
                                               for s in c.body):
            yield f"{mod.name}.{c.name}"


def _finish_reason_types(mod: Module) -> Iterator[str]:
    for n in ast.walk(mod.tree):
        if isinstance(n, ast.ClassDef) and "FinishReason" in n.name:
            yield f"{mod.name}.{n.name}"
        if isinstance(n, ast.Assign) and "FINISH_REASON" in ast.unparse(n.targets[0]):
            yield f"{mod.name}.{ast.unparse(n.targets[0])}"


def _token_builders(mod: Module) -> Iterator[str]:
    """Functions of the engine and the nodes that build a SampledToken (a sequence -> token event)."""
    if mod.package not in NODE_PACKAGES + ("engine",):
        return
    for f in ast.walk(mod.tree):
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(
                isinstance(c, ast.Call) and ast.unparse(c.func).endswith("SampledToken") for c in ast.walk(f)):
            yield f"{mod.name}.{f.name}"


CONCEPTS = {"roles tuple": _role_tuples, "proxy instance types": _classes_with_address,
            "finish-reason types": _finish_reason_types, "sequence -> SampledToken builders": _token_builders}


def duplicated_concepts(mods: dict[str, Module]) -> dict[str, list[str]]:
    found = {}
    for concept, finder in CONCEPTS.items():
        scope = [m for m in mods.values() if concept != "proxy instance types" or m.package == "proxy"]
        found[concept] = sorted(x for m in scope for x in finder(m))
    return found


def rpc_calls(mods: dict[str, Module]) -> list[tuple[str, str]]:
    """(calling package, Stub.Method) for every node RPC a module calls (health checks aside)."""
    out = []
    for m in mods.values():
        for c in ast.walk(m.tree):
            if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute) and c.func.attr[0].isupper():
                stub = re.search(r"(Prefill|Decode)Stub\(|_stub\(|^stub$", ast.unparse(c.func.value))
                if stub:
                    out.append((m.package or m.name, f"{stub.group(1) or 'Prefill|Decode'}.{c.func.attr}"))
    return sorted(set(out))


def backend_round_hops(mods: dict[str, Module]) -> tuple[int, int]:
    """(calls from the backend into the layer-wise round's functions, calls back: uses of the
    backend inside the round plus backend methods handed to it)."""
    backend = next((m for n, m in mods.items() if n.endswith("proxy.backend") or n.endswith("cluster.backend")), None)
    round_ = next((m for n, m in mods.items() if n.endswith("proxy.layerwise") or n.endswith("layerwise_round")), None)
    if backend is None or round_ is None:
        return 0, 0
    names = {f.name for f in round_.tree.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}
    calls = [c for c in ast.walk(backend.tree) if isinstance(c, ast.Call) and ast.unparse(c.func) in names]
    methods = {f.name for f in ast.walk(backend.tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}
    handed = sum(isinstance(a, ast.Attribute) and a.attr in methods for c in calls for a in c.args)
    back = sum(isinstance(a.value, ast.Name) and a.value.id == "backend" for a in _attributes(round_))
    return len(calls), back + handed


def proxy_shape(root: Path, mods: dict[str, Module]) -> dict[str, int]:
    files = [p for p in (root / PACKAGE / "proxy").rglob("*.py") if p.name != "__init__.py"]
    dirs = {p.parent for p in files}
    lines = sum(len(p.read_text().splitlines()) for p in files)
    total = sum(len(m.path.read_text().splitlines()) for m in mods.values())
    return {"files": len(files), "directories": len(dirs), "largest directory (files)":
            max(sum(p.parent == d for p in files) for d in dirs), "import floors": floors(mods, f"{PACKAGE}.proxy"),
            "lines": lines, "share of the package (%)": round(100 * lines / total)}


def proxy_torch(mods: dict[str, Module]) -> list[str]:
    """Our modules on the way from the proxy to torch (empty: the proxy never loads it)."""
    starts = [n for n in mods if n.startswith(f"{PACKAGE}.proxy")]
    return sorted(n for n in closure(starts, mods) if n in mods and "torch" in
                  {i.split(".")[0] for i in mods[n].imports | mods[n].lazy_imports})


def report(root: Path) -> None:
    mods = load(root)
    print(f"== {root}")
    for k, v in proxy_shape(root, mods).items():
        print(f"proxy {k}: {v}")
    print(f"proxy modules importing torch on the way (closure): {proxy_torch(mods) or 'none'}")
    nodes_to_proxy = sorted(f"{m.name} -> {i}" for m in mods.values() if m.package in NODE_PACKAGES
                            for i in internal(m.imports | m.lazy_imports, mods) if ".proxy" in i)
    print(f"node -> proxy imports: {len(nodes_to_proxy)} {nodes_to_proxy}")
    _listing("node -> engine.scheduler/.blocks/.requests_total reach-ins", engine_reach_ins(mods))
    _listing("closures handed to the engine thread", engine_closures(mods))
    _listing("node helpers calling back into their owner", owner_calls(mods, NODE_PACKAGES))
    _listing("private members used across objects, node packages", private_uses(mods, NODE_PACKAGES))
    _listing("private members used across objects, proxy", private_uses(mods, ["proxy"]))
    _listing("private names imported from another module", private_imports(mods))
    _listing("functions over 60 lines", long_functions(mods))
    print(f"import cycles: {cycles(mods) or 'none'}")
    for concept, where in duplicated_concepts(mods).items():
        _listing(f"definitions of {concept}", where)
    _listing("NodeConfig fields repeating StackConfig's", repeated_config_fields(mods))
    decode = next((n for n in (f"{PACKAGE}.decode_node.service", f"{PACKAGE}.decode_node.server") if n in mods), "")
    _listing("dicts of per-request state in DecodeService", service_state(mods, decode, "DecodeService"))
    calls = rpc_calls(mods)
    print(f"node RPCs called, by caller: {len(calls)} {calls}")
    into, back = backend_round_hops(mods)
    print(f"request walk, proxy -> decode: whole-KV = Prefill (proxy->P), Decode (proxy->D), Release (D->P); "
          f"layer-wise = PrefillStream (proxy->P), Decode (proxy->D), WatchKV (D->P)")
    print(f"backend <-> layer-wise round hops: {into} calls into the round, {back} calls back into the backend")
    lw = owner_calls(mods, ["decode_node"])
    print(f"decode service <-> layer-wise pull hops: {len(lw)} uses of the service inside the pull")


def _listing(title: str, items: list[str]) -> None:
    print(f"{title}: {len(items)}")
    for item in items:
        print(f"    {item}")


if __name__ == "__main__":
    report(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1])
