"""The Python API: what ``import lmsmith`` and its subpackages export."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import lmsmith

PACKAGES = ["lmsmith", "lmsmith.distill", "lmsmith.debias", "lmsmith.dialog"]


@pytest.mark.parametrize("name", PACKAGES)
def test_every_export_resolves_to_its_module_object(name):
    pkg = importlib.import_module(name)
    exports = pkg._EXPORTS
    assert set(pkg.__all__) == set(exports) | set(getattr(pkg, "_SUBPACKAGES", ()))
    for attr, module in exports.items():
        assert getattr(pkg, attr) is getattr(importlib.import_module(module), attr)
    with pytest.raises(AttributeError):
        pkg.no_such_name  # noqa: B018


def test_the_core_and_the_subsystems_import_from_the_top():
    from lmsmith import EvalConfig, debias, dialog, distill, evaluate_rows, generate, load_lm

    assert callable(load_lm) and callable(generate) and callable(evaluate_rows)
    assert EvalConfig().engine == "hf"
    assert distill.DistillConfig().train.method == "switch" and callable(distill.run)
    assert callable(distill.DistillTrainer.setup)
    assert callable(debias.run_pipeline) and debias.DebiasConfig
    assert callable(dialog.build_retriever) and callable(dialog.Pipeline)
    assert "generate" in dir(lmsmith) and "run" in dir(distill)


def test_import_lmsmith_is_light():
    code = "import sys, lmsmith, lmsmith.distill, lmsmith.dialog; sys.exit('torch' in sys.modules)"
    src = str(Path(lmsmith.__file__).parents[1])
    assert subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": src}).returncode == 0


def test_the_package_is_typed():
    assert (Path(lmsmith.__file__).parent / "py.typed").is_file()
