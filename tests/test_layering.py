"""Imports inside src/slimtune flow down the layers below, and there are no import circles.

The checker (tests/import_graph.py) reads the sources with ``ast``; nothing here imports slimtune.
Every import counts, including ones inside functions and under ``if TYPE_CHECKING:``.
"""
import textwrap
from pathlib import Path

from import_graph import ROOT_UNIT, check, find_cycles, module_imports, unit_graph

# Unit (first path component under slimtune/: a package folder or a top-level module file) -> layer.
# A module may import its own layer or lower ones. A new package goes at the lowest layer above
# everything it imports; if something at that layer or below would need to import it, the layering
# is wrong, so move code rather than the number. ROOT_UNIT is slimtune/__init__.py itself.
LAYERS = {
    ROOT_UNIT: 0,
    "weights": 0,
    "layers": 1,
    "registry": 1,
    "targets": 1,
    "progress": 1,
    "models": 2,
    "data": 2,
    "io": 2,
    "calib": 3,
    "evaluate": 3,
    "compress": 4,
    "adapt": 4,
    "analyze": 4,
    "export": 4,
    "merge": 4,
    "train": 5,
    "cli": 6,
    "demo": 6,
}


def test_slimtune_imports_flow_down():
    problems = check(Path(__file__).parents[1] / "src", "slimtune", LAYERS)
    assert problems == [], "\n".join(problems)


# --- the checker itself, on fake packages written as text (never imported) ---

FAKE_LAYERS = {ROOT_UNIT: 0, "base": 0, "mid": 1, "top": 2}


def write_tree(root: Path, files: dict[str, str]) -> Path:
    """Write {relative path: source} under root; returns root (the src dir)."""
    for relative, source in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return root


def test_clean_layered_package_has_no_problems(tmp_path):
    src = write_tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/base/__init__.py": "from .core import thing\n",
        "pkg/base/core.py": "import os\nthing = 1\n",
        "pkg/mid.py": "import numpy\nfrom pkg.base import core\nfrom . import base\n",
        "pkg/top/__init__.py": "",
        "pkg/top/run.py": """
            from typing import TYPE_CHECKING
            import pkg.mid
            from ..base.core import thing
            if TYPE_CHECKING:
                from pkg.mid import helper
            def main():
                from pkg import base
        """,
    })
    assert check(src, "pkg", FAKE_LAYERS) == []


def test_two_module_circle_is_reported(tmp_path):
    src = write_tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/base/__init__.py": "",
        "pkg/base/a.py": "import pkg.base.b\n",
        "pkg/base/b.py": "from pkg.base import a\n",
    })
    assert find_cycles(module_imports(src, "pkg")) == [["pkg.base.a", "pkg.base.b"]]
    [problem] = check(src, "pkg", FAKE_LAYERS)
    assert "module cycle" in problem and "pkg.base.a" in problem and "pkg.base.b" in problem


def test_circle_through_function_level_import_is_reported(tmp_path):
    src = write_tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "def f():\n    from pkg.b import g\n    return g()\n",
        "pkg/b.py": "import typing\nif typing.TYPE_CHECKING:\n    from pkg.a import f\n",
    })
    assert find_cycles(module_imports(src, "pkg")) == [["pkg.a", "pkg.b"]]


def test_three_module_circle_across_relative_imports_is_reported(tmp_path):
    src = write_tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/pkg1/__init__.py": "",
        "pkg/pkg1/a.py": "from .b import x\n",
        "pkg/pkg1/b.py": "from ..pkg2 import c\nx = 1\n",
        "pkg/pkg2/__init__.py": "",
        "pkg/pkg2/c.py": "from ..pkg1.a import y\n",
    })
    graph = module_imports(src, "pkg")
    assert graph["pkg.pkg1.a"] == {"pkg.pkg1.b"}
    assert graph["pkg.pkg1.b"] == {"pkg.pkg2.c"}
    assert graph["pkg.pkg2.c"] == {"pkg.pkg1.a"}
    assert find_cycles(graph) == [["pkg.pkg1.a", "pkg.pkg1.b", "pkg.pkg2.c"]]


def test_upward_import_is_one_violation_naming_both_sides(tmp_path):
    src = write_tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/base/__init__.py": "",
        "pkg/base/x.py": "from pkg.top.y import z\n",
        "pkg/top/__init__.py": "",
        "pkg/top/y.py": "z = 1\n",
    })
    assert check(src, "pkg", FAKE_LAYERS) == [
        "pkg.base.x imports pkg.top.y: layer 0 (base) -> layer 2 (top)"
    ]


def test_unit_missing_from_layer_table_is_reported(tmp_path):
    src = write_tree(tmp_path, {"pkg/__init__.py": "", "pkg/extra.py": "from pkg import base\n"})
    [problem] = check(src, "pkg", FAKE_LAYERS)
    assert problem.startswith("pkg.extra: unit 'extra' has no layer")
    assert "add it to LAYERS in tests/test_layering.py" in problem


def test_unit_level_cycle_without_module_cycle_is_reported(tmp_path):
    src = write_tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/fam_a/__init__.py": "",
        "pkg/fam_a/x.py": "import pkg.fam_b.y\n",
        "pkg/fam_a/w.py": "",
        "pkg/fam_b/__init__.py": "",
        "pkg/fam_b/y.py": "",
        "pkg/fam_b/z.py": "from pkg.fam_a import w\n",
    })
    graph = module_imports(src, "pkg")
    assert find_cycles(graph) == []
    assert find_cycles(unit_graph(graph, "pkg")) == [["fam_a", "fam_b"]]
    layers = {ROOT_UNIT: 0, "fam_a": 1, "fam_b": 1}
    [problem] = check(src, "pkg", layers)
    assert problem.startswith("unit cycle among fam_a, fam_b")
    assert "pkg.fam_a.x imports pkg.fam_b.y" in problem
    assert "pkg.fam_b.z imports pkg.fam_a.w" in problem


def test_from_import_of_a_name_points_at_the_module_that_defines_it(tmp_path):
    src = write_tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/sub/__init__.py": "def name():\n    pass\n",
        "pkg/sub/helper.py": "",
        "pkg/user.py": """
            import json
            from pkg.sub import name, helper
            import pkg.sub.nope  # not a module: falls back to pkg.sub
        """,
    })
    assert module_imports(src, "pkg") == {
        "pkg": set(),
        "pkg.sub": set(),
        "pkg.sub.helper": set(),
        "pkg.user": {"pkg.sub", "pkg.sub.helper"},
    }


def test_init_importing_submodules_that_import_siblings_is_not_a_cycle(tmp_path):
    src = write_tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/fam/__init__.py": "import pkg.fam.method\nfrom . import registry\n",
        "pkg/fam/registry.py": "METHODS = {}\n",
        "pkg/fam/method.py": "from pkg.fam import registry\n",
    })
    graph = module_imports(src, "pkg")
    assert graph["pkg.fam"] == {"pkg.fam.method", "pkg.fam.registry"}
    assert graph["pkg.fam.method"] == {"pkg.fam.registry"}
    assert find_cycles(graph) == []


def test_submodule_importing_a_name_from_its_own_package_init_is_a_cycle(tmp_path):
    src = write_tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/fam/__init__.py": "METHODS = {}\nfrom pkg.fam import method\n",
        "pkg/fam/method.py": "from pkg.fam import METHODS\n",
    })
    assert find_cycles(module_imports(src, "pkg")) == [["pkg.fam", "pkg.fam.method"]]


def test_find_cycles_is_iterative_on_a_long_ring():
    size = 5000  # far beyond the default recursion limit
    ring = {f"m{i:05d}": {f"m{(i + 1) % size:05d}"} for i in range(size)}
    ring["tail"] = {"m00000"}
    assert find_cycles(ring) == [sorted(ring.keys() - {"tail"})]


def test_import_of_a_module_that_does_not_exist_is_reported(tmp_path):
    src = write_tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/base/__init__.py": "",
        "pkg/base/a.py": "def f():\n    from pkg.gone import x\n",
        "pkg/mid/b.py": "import pkg.base.a\nfrom pkg.base.a import f\n",
    })
    problems = check(src, "pkg", FAKE_LAYERS)
    assert problems == ["pkg.base.a imports pkg.gone, which is not a module of pkg"], problems
