"""The model files import each other one way only: sit.py and jit.py share `common.py` and never import each other
(a lazy import inside a function counts), and the zoo (`zoo.py`) that names both sits above them. The public names
stay importable from `coredi_fast.models`."""
import ast
from pathlib import Path

MODELS = Path(__file__).resolve().parents[1] / "coredi_fast" / "models"


def relative_imports(path: Path) -> set[str]:
    """The sibling modules a file imports with `from .x import ...` anywhere in it (function bodies included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
    return found


def test_sit_and_jit_import_neither_each_other_nor_the_zoo():
    sit, jit, zoo, common = (relative_imports(MODELS / f"{name}.py") for name in ("sit", "jit", "zoo", "common"))
    assert "jit" not in sit and "zoo" not in sit
    assert "sit" not in jit and "zoo" not in jit
    assert {"sit", "jit"} <= zoo
    assert "common" in sit and "common" in jit
    assert not common & {"sit", "jit", "zoo"}


def test_public_names_keep_their_import_paths():
    import coredi_fast.models as models
    from coredi_fast.models import common, sit, zoo

    assert models.create_model is zoo.create_model and models.list_models is zoo.list_models
    assert models.modulate is common.modulate and models.gated_residual is common.gated_residual
    assert sit.modulate is common.modulate  # SiTBlock's helpers are still reachable where they were
    assert models.create_model("JiT-Micro/2", input_size=8, in_channels=1, num_classes=3).__class__ is models.JiT
    assert models.create_model("SiT-Micro/2", input_size=8, num_classes=3).__class__ is models.SiT
    assert set(models.JIT_MODEL_CONFIGS) <= set(models.list_models(include_jit=True))
    assert models.model_family("JiT-B/16") == "jit" and models.model_family("SiT-XL/2") == "sit"
