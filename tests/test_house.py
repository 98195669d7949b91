"""The house's rules that import-linter cannot see (its contracts are in .importlinter and run by
`make test` as `lint-imports`): torch.distributed only behind the distributed door, reached by
import or by attribute; no module over 400 lines. Each failure names the file and line."""
import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "gentrain"
MAX_LINES = 400


def modules():
    return sorted(PKG.rglob("*.py"))


def outside_door(path: Path) -> bool:
    return path.relative_to(PKG).parts[0] != "distributed"


def distributed_uses(source: str) -> list[int]:
    """Lines that import torch.distributed or reach it as an attribute (torch.distributed.X)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import) and any(a.name.startswith("torch.distributed") for a in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module and (
                node.module.startswith("torch.distributed") or (node.module == "torch" and any(a.name == "distributed" for a in node.names))):
            lines.append(node.lineno)
        elif isinstance(node, ast.Attribute) and node.attr == "distributed" and isinstance(node.value, ast.Name) and node.value.id == "torch":
            lines.append(node.lineno)
    return sorted(lines)


def test_the_check_sees_each_way_in():
    for src in ["import torch.distributed as dist", "from torch.distributed import all_reduce", "from torch import distributed",
                "import torch\nx = torch.distributed.DistError"]:
        assert distributed_uses(src), src
    assert distributed_uses("import torch\nx = torch.nn.Linear(2, 2)") == []


def test_torch_distributed_only_behind_the_door():
    found = [f"{p.relative_to(PKG.parent)}:{n}" for p in modules() if outside_door(p) for n in distributed_uses(p.read_text())]
    assert not found, f"torch.distributed outside gentrain/distributed/ (use gentrain.distributed.collectives or the backend): {found}"


def test_no_module_over_400_lines():
    long = {str(p.relative_to(PKG.parent)): n for p in modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by job): {long}"


def test_import_contracts_hold():
    """The same check `make test` runs first, here so a plain pytest run sees a broken floor."""
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    r = subprocess.run([exe, "--no-cache"], cwd=PKG.parent, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:]
    assert re.search(r"Contracts: (\d+) kept, 0 broken", r.stdout), r.stdout[-2000:]


def test_every_module_imports():
    """A moved or renamed name fails here in seconds, not in the first launch that reaches it."""
    import importlib
    import pkgutil

    import gentrain

    skip = ("gentrain.__main__", "gentrain.distributed.build_ops")   # the CLI's entry; builds DeepSpeed's ops
    names = [m.name for m in pkgutil.walk_packages(gentrain.__path__, "gentrain.") if m.name not in skip]
    assert len(names) > 80
    for name in names:
        importlib.import_module(name)


def test_tests_mirror_the_package():
    """tests/<package>/ for a package's tests, tests/launches/ for multi-process runs; nothing else."""
    tests = Path(__file__).resolve().parent
    packages = {p.name for p in PKG.iterdir() if (p / "__init__.py").exists()} | {"launches"}
    loose = [p.name for p in tests.glob("test_*.py") if p.name != "test_house.py"]
    stray = [str(p.relative_to(tests)) for p in tests.glob("*/test_*.py") if p.parent.name not in packages]
    assert not loose and not stray, f"test files outside tests/<package>/ or tests/launches/: {loose + stray}"
