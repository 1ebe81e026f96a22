"""The type stubs cover the native module: every public class, method, property and
function it exports has a stub, so editors and type checkers see the whole API."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import shardrop
from shardrop import _shardrop

STUB = Path(shardrop.__file__).with_name("_shardrop.pyi")


def stubbed() -> dict[str, set[str]]:
    """Top-level names of the stub, and for each class the names it defines."""
    tree = ast.parse(STUB.read_text())
    out: dict[str, set[str]] = {"": set()}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            out[""].add(node.name)
            out[node.name] = {
                n.name if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) else n.target.id
                for n in node.body
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                or (isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name))
            }
        elif isinstance(node, ast.FunctionDef):
            out[""].add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[""].add(node.target.id)
    return out


def test_every_native_name_has_a_stub():
    stubs = stubbed()
    missing = []
    for name, obj in vars(_shardrop).items():
        if name.startswith("_") and name != "__version__":
            continue
        if name not in stubs[""]:
            missing.append(name)
            continue
        if inspect.isclass(obj) and not issubclass(obj, BaseException):
            for attr in dir(obj):
                if attr.startswith("_"):
                    continue
                if attr not in stubs.get(name, set()):
                    missing.append(f"{name}.{attr}")
    assert not missing, f"no stub for: {missing}"
