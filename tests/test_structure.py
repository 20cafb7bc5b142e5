"""The import arrows of the package and the one home of the shared model operations, read from the source.

- evaluation code (``sdd/evaluation/``) never imports training code (``sdd.modules``, ``sdd.datamodules``);
- a defense module imports no other defense module: only the shared pieces of ``sdd/modules/``;
- each shared operation is defined once (``sdd/losses.py`` or ``sdd/modules/ops.py``), never copied.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SDD = Path(__file__).resolve().parents[1] / "sdd"
# The parts of sdd/modules that every objective may build on; every other file there is a defense.
SHARED_MODULES = {"sdd.modules", "sdd.modules.ops", "sdd.modules.common", "sdd.modules.sft"}
SHARED_OPERATIONS = {
    "answer_logprobs": "sdd/losses.py",
    "masked_mean": "sdd/losses.py",
    "answer_cross_entropy": "sdd/losses.py",
    "model_cross_entropy": "sdd/modules/ops.py",
    "final_norm": "sdd/modules/ops.py",
    "logit_lens_cross_entropy": "sdd/modules/ops.py",
    "decoder_layers": "sdd/modules/ops.py",
    "forward_hooks": "sdd/modules/ops.py",
    "main_output": "sdd/modules/ops.py",
    "trainable_parameters": "sdd/modules/ops.py",
    "restored": "sdd/modules/ops.py",
    "global_norm": "sdd/modules/ops.py",
}


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function (``from a import b`` gives a and a.b)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (the package uses absolute ones)"
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(SDD.parent).with_suffix("").parts)


def defense_modules() -> list[Path]:
    return [
        p
        for p in sorted((SDD / "modules").glob("*.py"))
        if module_name(p) not in SHARED_MODULES and p.name != "__init__.py"
    ]


def test_the_checks_see_the_files():
    assert len(list((SDD / "evaluation").glob("*.py"))) >= 5
    assert {"seam", "booster", "vaccine", "repnoise", "tar"} <= {p.stem for p in defense_modules()}
    assert "sdd.modules.ops.decoder_layers" in imported_modules(SDD / "modules" / "vaccine.py")


@pytest.mark.parametrize("path", sorted((SDD / "evaluation").glob("*.py")), ids=lambda p: p.name)
def test_evaluation_does_not_import_training_code(path):
    wrong = sorted(
        m for m in imported_modules(path) if m.split(".")[:2] in (["sdd", "modules"], ["sdd", "datamodules"])
    )
    assert not wrong, (
        f"{path.relative_to(SDD.parent)} imports {wrong}: move the shared piece out of modules/datamodules"
    )


@pytest.mark.parametrize("path", defense_modules(), ids=lambda p: p.name)
def test_a_defense_imports_no_other_defense(path):
    own = module_name(path)
    others = sorted(
        m
        for m in imported_modules(path)
        if m.startswith("sdd.modules.") and ".".join(m.split(".")[:3]) not in SHARED_MODULES | {own}
    )
    assert not others, f"{own} imports {others}: shared operations belong in sdd.modules.ops"


def test_shared_operations_are_defined_once():
    definitions: dict[str, list[str]] = {}
    for path in sorted(SDD.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in tree.body:  # module level; methods of the same name (a module's own step) are fine
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in SHARED_OPERATIONS:
                definitions.setdefault(node.name, []).append(str(path.relative_to(SDD.parent)))
    assert definitions == {name: [home] for name, home in SHARED_OPERATIONS.items()}


@pytest.mark.parametrize("defense", sorted(p.stem for p in (SDD.parent / "conf" / "defense").glob("*.yaml")))
def test_every_defense_config_provides_the_streams_its_module_reads(defense, tmp_path):
    from conftest import compose_config
    from hydra.utils import instantiate

    from sdd.datamodules.streams import batch_streams

    cfg = compose_config("train", [f"defense={defense}"], output_dir=tmp_path, cache_dir=tmp_path / "cache")
    module = instantiate(cfg.module, backbone=None)  # the model is loaded later, in configure_model
    module.check_streams(batch_streams(instantiate(cfg.data)))
    if module.streams:  # the data config the module names exists
        assert (SDD.parent / "conf" / "data" / f"{module.data_config}.yaml").exists()
