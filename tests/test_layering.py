"""The layering rule: models < inference < experiments; no package imports a layer above
its own (``benchmarks/import_graph.py`` walks the sources with ``ast``)."""

from __future__ import annotations

from benchmarks.import_graph import LAYERS, collect_imports, module_cycles, upward_imports


def test_the_walk_sees_the_imports_between_the_layers():
    pairs = {(e.src_package, e.dst_package) for e in collect_imports()}
    assert {("inference", "models"), ("experiments", "models"), ("experiments", "inference")} <= pairs


def test_no_package_imports_a_layer_above_its_own():
    upward = upward_imports(collect_imports())
    assert upward == [], f"upward imports ({' < '.join(LAYERS)}):\n" + "\n".join(e.where() for e in upward)


def test_no_module_level_import_cycles():
    cycles = module_cycles(collect_imports())
    assert cycles == [], f"module-level import cycles: {cycles}"


def test_cycles_are_found(tmp_path):
    sources = {"a": "from pkg import b\n", "b": "import pkg.a\n", "c": "def f():\n    from pkg import a\n"}
    (tmp_path / "pkg").mkdir()
    for name, body in sources.items():
        (tmp_path / "pkg" / f"{name}.py").write_text(body)
    (tmp_path / "pkg" / "__init__.py").write_text("from . import a\n")
    imports = collect_imports(tmp_path, ("pkg",))
    assert module_cycles(imports) == [["pkg.a", "pkg.b"]]  # the lazy import in c is no cycle
    assert ("pkg", "pkg.a") in {(e.src, e.dst) for e in imports}  # the relative import resolved
