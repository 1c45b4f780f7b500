"""The package layout keeps its promises: data flows one way, `import eefast.ops` needs no
transformers, modules stay small, and `eefast info` lists every registered op."""

import ast
import subprocess
import sys
from pathlib import Path

import torch

from eefast.cli.info import op_backends, registered_ops

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "eefast"
# Lower layers first; a module may import its own layer and any layer below it.
LAYERS = [
    {"_C", "io", "timing"},
    {"ops"},
    {"nn"},
    {"hf"},
    {"data"},
    {"exits", "adapters"},
    {"distributed"},
    {"train", "generation", "eval", "integrations"},
    {"cli", "__main__"},
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _top(path: Path) -> str:
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def _imported_tops(path: Path) -> set[str]:
    """The top-level eefast subpackages a module imports (relative or absolute)."""
    package = path.relative_to(PACKAGE).parent.parts  # what `from . import` means here
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            target = (*base, *(node.module.split(".") if node.module else ()))
            found |= {target[0]} if target else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("eefast."):
            found.add(node.module.split(".")[1])
    return found


def test_data_flows_one_way():
    bad = []
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "__init__.py":
            continue  # the public API re-exports every layer (lazily)
        top = _top(path)
        for other in _imported_tops(path) - {top}:
            if RANK[other] > RANK[top]:
                bad.append(f"{path.relative_to(PACKAGE)} imports {other}")
    assert not bad, bad


def test_command_modules_do_not_import_each_other():
    commands = {"exits", "generate", "adapters", "info"}
    for name in commands:
        tree = ast.parse((PACKAGE / "cli" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                assert node.module not in commands, f"cli/{name}.py imports cli/{node.module}"


def test_modules_stay_small():
    big = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 450
    }
    assert not big, big


def test_ops_import_without_transformers():
    code = "import sys, eefast.ops; assert 'transformers' not in sys.modules, 'transformers'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_public_api():
    import eefast

    for name in ("add_exits", "load_exits", "save_exits", "ee_tune", "evaluate_exits",
                 "generate", "add_adapters", "load_adapter", "save_adapter", "load_model",
                 "lora_linear", "linear_cross_entropy", "LoRALinear", "TuneConfig"):  # fmt: skip
        assert callable(getattr(eefast, name)), name
    assert "generate" in dir(eefast)


def test_info_lists_every_registered_op():
    ops = registered_ops()
    assert {"lora_linear", "decode_linear", "decode_block", "exit_stats"} <= set(ops)
    for op in ops:
        assert torch._C._dispatch_has_kernel(f"eefast::{op}")
    assert op_backends("lora_linear") == (["CPU"], "C++")
    assert op_backends("decode_linear")[1] == "Python"
    assert op_backends("exit_stats")[1] == "none"
