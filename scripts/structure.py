"""Measures of the code's shape (issue 20): import cycles, the largest module and function, the most parameters,
and the strings outside the command line that phrase a `--flag` (messages; docstrings do not count).

    python scripts/structure.py [PACKAGE_DIR]      # default: ckptavg/ beside this script

Import cycles are found over every import statement, at module level and inside functions (a lazy import
still ties two modules together), as strongly connected components of the module graph.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]+")
# Flags of other programs that a message may quote (`hf upload ... --revision R`).
OTHER_TOOLS = ("--revision",)
# The command line: it parses flags and renders messages (render/ prints what cli/ hands it).
COMMAND_LINE = ("cli", "__main__.py", "render")


def on_the_command_line(path: Path, root: Path) -> bool:
    """Whether the file is part of the command line (COMMAND_LINE names files and folders of the package)."""
    return path.relative_to(root).parts[0] in COMMAND_LINE


def flag_texts(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, text) of each string in the code that phrases a --flag: messages, not docstrings or comments."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            flags = [f for f in FLAG.findall(node.value) if f not in OTHER_TOOLS]
            if flags:
                found.append((node.lineno, node.value))
    return found


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for the package at `root`."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        name = ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
        found[name] = path
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """Each module's imports of other modules of the package."""
    mods = modules(root)
    graph: dict[str, set[str]] = {name: set() for name in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in mods and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "ckptavg"
    sizes, functions, flags = [], [], 0
    for name, path in modules(root).items():
        text = path.read_text()
        sizes.append((len(text.splitlines()), name))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                params = len(node.args.posonlyargs) + len(node.args.args) + len(node.args.kwonlyargs)
                functions.append((node.end_lineno - node.lineno + 1, params, f"{name}.{node.name}", name))
        if not on_the_command_line(path, root):
            flags += len(flag_texts(ast.parse(text)))
    print(f"largest module: {max(sizes)[1]} ({max(sizes)[0]} lines)")
    longest = max(functions)
    print(f"longest function: {longest[2]} ({longest[0]} lines, {longest[1]} parameters)")
    most = max(functions, key=lambda f: f[1])
    print(f"most parameters: {most[2]} ({most[1]})")
    # Internal: neither a command (its flags are its parameters) nor the public API (its keywords): the functions of
    # ckptavg/__init__.py and those it loads by name (_LAZY).
    lazy = ast.literal_eval(re.search(r"_LAZY = (\{.*?\})", (root / "__init__.py").read_text(), re.S).group(1))
    public = {f"{module}.{name}" for name, module in lazy.items()}
    internal = [f for f in functions if f[3] != root.name and not f[3].startswith(f"{root.name}.cli") and f[2] not in public]
    longest, most = max(internal), max(internal, key=lambda f: f[1])
    print(f"internal: longest function {longest[2]} ({longest[0]} lines), most parameters {most[2]} ({most[1]})")
    print(f"strings phrasing a --flag outside the command line ({', '.join(COMMAND_LINE)}): {flags}")
    found = cycles(import_graph(root))
    print(f"import cycles: {len(found)}" + "".join(f"\n  {' -> '.join(c)}" for c in found))


if __name__ == "__main__":
    main()
