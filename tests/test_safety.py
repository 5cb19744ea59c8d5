"""No code path unpickles files (other than through an Unpickler that allow-lists classes), turns on remote
code, or logs a token (a static check of the sources)."""

import ast
import re
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(
    [*(ROOT / "rose_trl").rglob("*.py"), *(ROOT / "recipes").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]
)
UNPICKLERS = {"pickle", "cPickle", "dill", "joblib", "cloudpickle", "shelve"}
SECRET = re.compile(r"(^|_)(hf_|hub_|auth_|api_|access_)?token$", re.IGNORECASE)
LOGGERS = {"print", "info", "warning", "warn", "debug", "error", "exception", "critical", "log", "write"}


def _name(node) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _restricted_unpicklers(tree) -> set[int]:
    """ids of the `pickle.Unpickler` base-class nodes of classes that override find_class (an allow-list)."""
    allowed = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(
            isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in node.body
        ):
            allowed |= {id(b) for b in node.bases if _name(b) == "pickle.Unpickler"}
    return allowed


def violations(source: str, filename: str = "<src>") -> list[str]:
    found = []
    tree = ast.parse(source)
    restricted = _restricted_unpicklers(tree)
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            )
            roots = {n.split(".")[0] for n in names}
            # A plain `import pickle` is allowed: its uses are checked below (only a restricted Unpickler subclass
            # passes).
            plain_pickle = isinstance(node, ast.Import) and all(a.asname is None for a in node.names)
            if roots & (UNPICKLERS - {"pickle"}) or ("pickle" in roots and not plain_pickle):
                found.append(f"{where}: imports an unpickler")
        if isinstance(node, ast.Attribute) and _name(node.value) == "pickle" and node.attr != "UnpicklingError":
            if not (node.attr == "Unpickler" and id(node) in restricted):
                found.append(
                    f"{where}: pickle.{node.attr} (only an Unpickler subclass with an allow-listing find_class)"
                )
        if not isinstance(node, ast.Call):
            continue
        func = _name(node.func)
        if func == "torch.load":
            value = _kw(node, "weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                found.append(f"{where}: torch.load without weights_only=True")
        if func in ("np.load", "numpy.load"):
            value = _kw(node, "allow_pickle")
            if not (isinstance(value, ast.Constant) and value.value is False):
                found.append(f"{where}: np.load without allow_pickle=False")
        value = _kw(node, "trust_remote_code")
        if isinstance(value, ast.Constant) and value.value is True:
            found.append(f"{where}: trust_remote_code=True hard-coded")
        if func.split(".")[-1] in LOGGERS:
            for arg in ast.walk(ast.Module(body=[ast.Expr(a) for a in node.args], type_ignores=[])):
                ident = arg.attr if isinstance(arg, ast.Attribute) else arg.id if isinstance(arg, ast.Name) else ""
                if ident and SECRET.search(ident):
                    found.append(f"{where}: logs {ident}")
    return found


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\ntorch.load('x.pt')",
        "import torch\ntorch.load('x.pt', weights_only=False)",
        "import numpy as np\nnp.load('x.npy', allow_pickle=True)",
        "import numpy as np\nnp.load('x.npy')",
        "import pickle\npickle.load(f)",
        "import pickle\npickle.Unpickler(f).load()",
        "import pickle\nclass U(pickle.Unpickler):\n    pass",
        "from pickle import loads",
        "import pickle as p\np.load(f)",
        "import dill",
        "from joblib import load",
        "AutoModel.from_pretrained('m', trust_remote_code=True)",
        "print(f'using {args.hub_token}')",
        "logger.info('token %s', token)",
    ],
)
def test_the_check_catches(snippet):
    assert violations(snippet)


def test_the_check_passes_safe_code():
    assert not violations(
        "torch.load(p, map_location='cpu', weights_only=True)\nnp.load(f, allow_pickle=False)\n"
        "print(tokenizer.pad_token_id, len(input_ids))\nAutoModel.from_pretrained(m, trust_remote_code=flag)"
    )
    assert not violations(
        "import pickle\nclass U(pickle.Unpickler):\n    def find_class(self, m, n):\n"
        "        raise pickle.UnpicklingError(n)\nU(f).load()"
    )


def test_package_recipes_and_benchmarks_are_safe():
    assert SOURCES
    found = [v for path in SOURCES for v in violations(path.read_text(), str(path.relative_to(ROOT)))]
    assert not found, "\n".join(found)


def test_trust_remote_code_is_off_by_default():
    import dataclasses

    from trl import SFTConfig

    # The pipeline passes SFTConfig's to from_pretrained (trl's ModelConfig has none).
    assert {f.name: f.default for f in dataclasses.fields(SFTConfig)}["trust_remote_code"] is False
