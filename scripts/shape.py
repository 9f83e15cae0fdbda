#!/usr/bin/env python3
"""The project's shape, checked from its source alone (ast only: nothing of the package is imported or run).

usage: python3 scripts/shape.py [PROJECT_DIR]      (default: the directory above this script)

What it refuses, one line each (``path:line: rule: what``), with exit status 1:

- **cycle**: an import cycle between the package's modules. Every import counts, wherever it is written:
  at the top, inside a function (a lazy import), under ``if TYPE_CHECKING:``.
- **isinstance**: ``isinstance``/``issubclass`` (or ``type(x) is …``) against a concrete plugin class outside
  that plugin's home. Plugins are the classes the project registers under its entry points (strategies,
  transports, layouts, stores); a plugin's concrete classes are every class defined in its home, except in
  the modules named as interfaces. Names are resolved through each module's imports, aliases included.
- **name**: a plugin's registered name compared as a string literal outside its home (``== "chunks"``,
  ``in ("backup", …)``, ``case "s3":``). Image formats and export kinds share words with plugin names
  (``qcow2``, ``file``): a comparison whose other side is named like one (``not-names``) is not a plugin's.
- **url**: a store's URL form (``"s3://"``, ``"s3:/"``, ``"s3:"``) as a literal outside the store's home,
  or a literal starting with it passed to a string method (``startswith``, ``removeprefix``, …) or compared.
- **size**: a file over ``max-lines`` lines (a file that long is two concerns).
- **home**: an entry point whose module is not in a home declared for it (a new plugin declares its home).

Configuration: ``[tool.shape]`` in the project's pyproject.toml (``package``, ``max-lines``, ``sized``,
``interfaces``, ``named``, ``not-names``, and ``[tool.shape.homes]``: entry point group, or
``group:name``, → the files and directories (ending in ``/``) that are that plugin's home). The last line
sums up.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

STRING_METHODS = frozenset(
    {
        "startswith",
        "endswith",
        "removeprefix",
        "removesuffix",
        "partition",
        "rpartition",
        "split",
        "find",
        "index",
    }
)


@dataclass(frozen=True)
class Plugin:
    group: str
    name: str
    module: str
    cls: str
    home: tuple[str, ...]

    @property
    def kind(self) -> str:
        """``strategy`` for the group ``vmsnap.strategies``, ``store`` for ``vmsnap.stores``."""
        plural = self.group.rpartition(".")[2]
        return plural[:-3] + "y" if plural.endswith("ies") else plural.removesuffix("s")


@dataclass
class Module:
    name: str
    path: Path
    rel: str
    tree: ast.Module
    lines: int
    is_package: bool
    imports: dict[str, str] = field(
        default_factory=dict
    )  # local name -> dotted target (module or module.attr)


@dataclass
class Config:
    root: Path
    package: str
    max_lines: int
    sized: tuple[str, ...]
    interfaces: frozenset[str]
    named: frozenset[str]
    not_names: re.Pattern[str]
    homes: dict[str, tuple[str, ...]]
    entry_points: dict[str, dict[str, str]]


def load_config(root: Path) -> Config:
    data = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    shape = data.get("tool", {}).get("shape", {})
    return Config(
        root=root,
        package=shape.get("package", "vmsnap"),
        max_lines=int(shape.get("max-lines", 700)),
        sized=tuple(shape.get("sized", [shape.get("package", "vmsnap")])),
        interfaces=frozenset(shape.get("interfaces", [])),
        named=frozenset(shape.get("named", [])),
        not_names=re.compile(shape.get("not-names", r"(?!)")),
        homes={key: tuple(value) for key, value in shape.get("homes", {}).items()},
        entry_points=data.get("project", {}).get("entry-points", {}),
    )


def in_home(rel: str, home: Sequence[str]) -> bool:
    return any(rel == place or (place.endswith("/") and rel.startswith(place)) for place in home)


def load_modules(config: Config) -> dict[str, Module]:
    modules: dict[str, Module] = {}
    base = config.root / config.package
    for path in sorted(base.rglob("*.py")):
        rel = path.relative_to(config.root).as_posix()
        parts = list(path.relative_to(config.root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text, filename=rel)
        modules[".".join(parts)] = Module(
            ".".join(parts), path, rel, tree, len(text.splitlines()), is_package
        )
    for module in modules.values():
        module.imports = local_imports(module, modules)
    return modules


def absolute(module: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.name.split(".")
    if not module.is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def local_imports(module: Module, modules: dict[str, Module]) -> dict[str, str]:
    """Local name -> what it names (a module, or ``module.attribute``), from every import in the module."""
    names: dict[str, str] = {}
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = alias.name
                else:
                    names[alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            target = absolute(module, node)
            for alias in node.names:
                names[alias.asname or alias.name] = f"{target}.{alias.name}"
    return names


def import_edges(module: Module, modules: dict[str, Module]) -> Iterator[tuple[str, int]]:
    """The package modules ``module`` imports (each import statement, anywhere), with the line."""
    for node in ast.walk(module.tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = absolute(module, node)
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names
            ]
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != module.name:
                yield target, node.lineno


def cycles(modules: dict[str, Module]) -> list[str]:
    edges: dict[str, dict[str, int]] = {name: {} for name in modules}
    for name, module in modules.items():
        for target, line in import_edges(module, modules):
            edges[name].setdefault(target, line)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges[v]:
                found.append(sorted(component))

    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))
    for v in sorted(edges):
        if v not in index:
            strong(v)
    lines = []
    for component in found:
        members = set(component)
        first = component[0]
        links = [
            f"{a} -> {b} (line {edges[a][b]})" for a in component for b in sorted(edges[a]) if b in members
        ]
        lines.append(f"{modules[first].rel}:1: cycle: {', '.join(links)}")
    return lines


def plugins(config: Config, modules: dict[str, Module]) -> tuple[list[Plugin], list[str]]:
    found: list[Plugin] = []
    problems: list[str] = []
    for group, entries in sorted(config.entry_points.items()):
        if not group.startswith(config.package + "."):
            continue
        for name, value in sorted(entries.items()):
            module, _, cls = value.partition(":")
            home = config.homes.get(f"{group}:{name}") or config.homes.get(group)
            rel = modules[module].rel if module in modules else module
            if home is None or not in_home(rel, home):
                problems.append(
                    f"pyproject.toml:1: home: {group} {name!r} ({value}) is not in a home declared for it "
                    "under [tool.shape.homes]"
                )
                continue
            found.append(Plugin(group, name, module, cls, home))
    return found, problems


def concrete_classes(config: Config, modules: dict[str, Module], found: list[Plugin]) -> dict[str, Plugin]:
    """``module.Class`` -> the plugin whose home defines it (interfaces excluded)."""
    classes: dict[str, Plugin] = {}
    for module in modules.values():
        if module.rel in config.interfaces:
            continue
        for plugin in found:
            if in_home(module.rel, plugin.home):
                for node in module.tree.body:
                    if isinstance(node, ast.ClassDef):
                        classes.setdefault(f"{module.name}.{node.name}", plugin)
    return classes


def resolve(module: Module, node: ast.expr, modules: dict[str, Module]) -> str | None:
    """The dotted name ``node`` refers to in ``module`` (through its imports), or None."""
    if isinstance(node, ast.Name):
        if node.id in module.imports:
            return module.imports[node.id]
        return f"{module.name}.{node.id}"
    if isinstance(node, ast.Attribute):
        base = resolve(module, node.value, modules)
        return f"{base}.{node.attr}" if base is not None else None
    return None


def canonical(dotted: str, modules: dict[str, Module]) -> str:
    """``a.b.C`` where ``a.b`` re-exports ``C`` from ``a.b.c``: followed through the re-export."""
    for _ in range(10):
        head, _, attr = dotted.rpartition(".")
        module = modules.get(head)
        if module is None or attr not in module.imports:
            return dotted
        dotted = module.imports[attr]
    return dotted


def isinstance_leaks(modules: dict[str, Module], classes: dict[str, Plugin]) -> list[str]:
    leaks = []
    for module in modules.values():
        for node in ast.walk(module.tree):
            checked: list[ast.expr] = []
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("isinstance", "issubclass")
                and len(node.args) == 2
            ):
                second = node.args[1]
                checked = list(second.elts) if isinstance(second, ast.Tuple) else [second]
            elif isinstance(node, ast.Compare) and any(
                isinstance(op, (ast.Is, ast.IsNot, ast.Eq, ast.NotEq)) for op in node.ops
            ):
                operands = [node.left, *node.comparators]
                if any(
                    isinstance(o, ast.Call) and isinstance(o.func, ast.Name) and o.func.id == "type"
                    for o in operands
                ):
                    checked = [o for o in operands if not isinstance(o, ast.Call)]
            for target in checked:
                dotted = resolve(module, target, modules)
                if dotted is None:
                    continue
                plugin = classes.get(canonical(dotted, modules))
                if plugin is not None and not in_home(module.rel, plugin.home):
                    leaks.append(
                        f"{module.rel}:{node.lineno}: isinstance: {ast.unparse(node)[:90]} tests for the "
                        f"{plugin.kind} plugin {plugin.name!r}'s class "
                        f"{dotted.rpartition('.')[2]} outside its home"
                    )
    return leaks


def identifier(node: ast.expr) -> str:
    """What an operand is called: a name, an attribute, a subscript's or ``.get``'s string key."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
        return str(node.slice.value)
    if isinstance(node, ast.Call):
        if (
            isinstance(node.func, ast.Attribute)
            and node.func.attr == "get"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            return str(node.args[0].value)
        return identifier(node.func)
    return ""


def strings(node: ast.expr) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    return []


def pattern_strings(pattern: ast.pattern) -> list[str]:
    if isinstance(pattern, ast.MatchValue):
        return strings(pattern.value)
    if isinstance(pattern, ast.MatchOr):
        return [s for p in pattern.patterns for s in pattern_strings(p)]
    if isinstance(pattern, ast.MatchAs) and pattern.pattern is not None:
        return pattern_strings(pattern.pattern)
    return []


def name_leaks(config: Config, modules: dict[str, Module], found: list[Plugin]) -> list[str]:
    by_name: dict[str, list[Plugin]] = {}
    url_forms: dict[str, Plugin] = {}
    for plugin in found:
        if plugin.group in config.named:
            by_name.setdefault(plugin.name, []).append(plugin)
        if plugin.group.endswith(".stores"):
            for form in (f"{plugin.name}://", f"{plugin.name}:/", f"{plugin.name}:"):
                url_forms[form] = plugin
    leaks = []

    def named(module: Module, line: int, values: list[str], others: list[ast.expr], text: str) -> None:
        if any(config.not_names.search(identifier(o)) for o in others):
            return
        for value in values:
            for plugin in by_name.get(value, []):
                if not in_home(module.rel, plugin.home):
                    leaks.append(
                        f"{module.rel}:{line}: name: {text[:90]} compares the {plugin.kind} name {value!r} "
                        "outside its home: ask the plugin (its capabilities, traits, methods) instead"
                    )

    def url(module: Module, line: int, value: str, text: str) -> None:
        for form, plugin in url_forms.items():
            if (value == form or value.startswith(f"{plugin.name}://")) and not in_home(
                module.rel, plugin.home
            ):
                leaks.append(
                    f"{module.rel}:{line}: url: {text[:90]} parses the store {plugin.name!r}'s URLs outside "
                    "its home: ask the stores' registry (scheme_of, is_url, open_store)"
                )
                return

    for module in modules.values():
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                for operand in operands:
                    values = strings(operand)
                    if values:
                        others = [o for o in operands if o is not operand]
                        named(module, node.lineno, values, others, ast.unparse(node))
                        for value in values:
                            url(module, node.lineno, value, ast.unparse(node))
            elif isinstance(node, ast.Match):
                for case in node.cases:
                    named(
                        module,
                        case.pattern.lineno,
                        pattern_strings(case.pattern),
                        [node.subject],
                        f"case {ast.unparse(case.pattern)}",
                    )
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in STRING_METHODS
            ):
                for arg in node.args:
                    for value in strings(arg):
                        url(module, node.lineno, value, ast.unparse(node))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in url_forms:
                url(module, node.lineno, node.value, repr(node.value))
    seen: set[tuple[str, str]] = set()
    unique = []
    for leak in leaks:  # a literal inside a call or comparison is one leak, not two
        where, rule = leak.split(": ", 2)[:2]
        if (where, rule) not in seen:
            seen.add((where, rule))
            unique.append(leak)
    return unique


def sizes(config: Config) -> tuple[list[str], tuple[int, str]]:
    leaks = []
    longest = (0, "")
    for top in config.sized:
        base = config.root / top
        for path in sorted(base.rglob("*.py")) if base.is_dir() else []:
            if ".venv" in path.parts or "build" in path.parts:
                continue
            count = len(path.read_text(encoding="utf-8").splitlines())
            rel = path.relative_to(config.root).as_posix()
            longest = max(longest, (count, rel))
            if count > config.max_lines:
                leaks.append(
                    f"{rel}:{config.max_lines + 1}: size: {count} lines, over {config.max_lines}: split it"
                )
    return leaks, longest


def check(root: Path) -> tuple[list[str], str]:
    """Every leak of the project at ``root`` (one line each) and the summary line."""
    config = load_config(root)
    modules = load_modules(config)
    found, homeless = plugins(config, modules)
    cycle_lines = cycles(modules)
    classes = concrete_classes(config, modules, found)
    typed = isinstance_leaks(modules, classes)
    named = name_leaks(config, modules, found)
    big, (most, longest) = sizes(config)
    leaks = [*homeless, *cycle_lines, *typed, *named, *big]
    summary = (
        f"shape: {len(modules)} modules, {len(found)} plugins, {len(cycle_lines)} import cycles, "
        f"{len(typed)} isinstance leaks, {len(named)} plugin names or URLs in the core, "
        f"{len(big)} files over {config.max_lines} lines (longest: {longest} {most}), "
        f"{len(homeless)} homeless plugins: " + ("FAIL" if leaks else "ok")
    )
    return leaks, summary


def main(argv: Sequence[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent
    leaks, summary = check(root.resolve())
    for line in leaks:
        print(line)
    print(summary)
    return 1 if leaks else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
