"""Every name README.md and docs/ (guides/, reference/, results/) show is importable, and every call they show is

What the documents show, read from them (not listed by hand): `from rose_trl... import ...` lines, dotted
`rose_trl.x.y` names, and calls or signatures of rose_trl names, inline (`name(args)`) or in python code
blocks. A call's arguments are bound to the real signature (`inspect.Signature.bind`): a keyword the function
no longer takes, or too many positional arguments, fails here, as `per_example_gradients(model, batch,
optimizer=...)` once raised TypeError for users. The public names (`rose_trl.__all__`) are also called for real.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest
import torch

import rose_trl


ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
IMPORT = re.compile(r"^[+\s]*from (rose_trl[\w.]*) import ([\w ,]+)", re.M)
DOTTED = re.compile(r"`(rose_trl(?:\.\w+)+)")
INLINE_CALL = re.compile(r"`([A-Za-z_][\w.]*(?:\[\"\w+\"\])?\()")
CODE_BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def resolve_dotted(name: str):
    """The object `rose_trl.a.b.C.d` names: the longest importable module, then attributes."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(name)


def public_index() -> dict[str, list]:
    """Bare name -> the rose_trl objects of that name (classes, functions, registries) in any module."""
    index: dict[str, list] = {}
    for info in pkgutil.walk_packages(rose_trl.__path__, "rose_trl."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if name.startswith("_"):
                continue
            home = getattr(obj, "__module__", None) or ""
            if (home.startswith("rose_trl") and (inspect.isclass(obj) or inspect.isfunction(obj))) or (
                name.isupper() and isinstance(obj, dict)
            ):
                if not any(o is obj for o in index.setdefault(name, [])):
                    index[name].append(obj)
    return index


def balanced_call(text: str, start: int) -> str | None:
    """The call expression starting at `start` (a name, then a balanced parenthesis), or None."""
    depth = 0
    for i in range(text.index("(", start), len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[start : i + 1]
        if text[i] == "`":
            return None
    return None


def shown_calls(text: str) -> list[str]:
    calls = []
    for m in INLINE_CALL.finditer(text):
        expr = balanced_call(text, m.start(1))
        if expr:
            calls.append(expr)
    for block in CODE_BLOCK.findall(text):
        try:
            tree = ast.parse(block)
        except SyntaxError:  # a signature display (`load_pool(spec, *, split=...)`): one per line
            calls += [line for line in block.splitlines() if re.match(r"^[A-Za-z_][\w.]*\(", line)]
            continue
        calls += [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Call)]
    return calls


class Unresolved(Exception):
    pass


def resolve_function(node, namespace: dict, index: dict) -> list:
    """Candidates for a call's function: a name imported in the document, else any rose_trl object of that
    name; attributes and constant subscripts of those."""
    if isinstance(node, ast.Name):
        if node.id in namespace:
            return [namespace[node.id]]
        if node.id in index:
            return index[node.id]
        raise Unresolved(node.id)
    if isinstance(node, ast.Attribute):
        if (
            isinstance(node.value, ast.Name)
            and node.value.id == "rose_trl"
            or ast.unparse(node).startswith("rose_trl.")
        ):
            return [resolve_dotted(ast.unparse(node))]
        return [
            getattr(obj, node.attr)
            for obj in resolve_function(node.value, namespace, index)
            if hasattr(obj, node.attr)
        ] or _raise(Unresolved(ast.unparse(node)))
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
        return [obj[node.slice.value] for obj in resolve_function(node.value, namespace, index)]
    raise Unresolved(ast.unparse(node))


def _raise(e):
    raise e


def check_call(expr: str, namespace: dict, index: dict) -> str | None:
    """None when the shown call binds to (one of) the real signature(s), else why not. Raises Unresolved for
    calls of names that are not rose_trl's."""
    try:
        node = ast.parse(expr.strip(), mode="eval").body
    except SyntaxError:
        node = None
    if node is None:  # a signature display: def-style parameters
        name, params = expr.strip().split("(", 1)
        candidates = resolve_function(ast.parse(name, mode="eval").body, namespace, index)
        try:
            shown = ast.parse(f"def f({params}: pass").body[0].args
        except SyntaxError:
            return None  # prose inside the parentheses: the name resolved, nothing to bind
        names = [a.arg for a in shown.posonlyargs + shown.args + shown.kwonlyargs]
        for obj in candidates:
            real = inspect.signature(obj).parameters
            takes_any = any(p.kind == p.VAR_KEYWORD for p in real.values())
            unknown = [n for n in names if n not in real and not takes_any]
            required = [
                n
                for n, p in real.items()
                if p.default is p.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                and n not in names
            ]
            if not unknown and not required:
                return None
        return f"{expr}: shown parameters do not match {[str(inspect.signature(o)) for o in candidates]}"
    if not isinstance(node, ast.Call):
        return None
    candidates = resolve_function(node.func, namespace, index)
    args = [a for a in node.args if not isinstance(a, ast.Starred)]
    # `name()` in prose names the function; `name(...)` elides its arguments: neither can miss one.
    partial = (
        len(args) != len(node.args)
        or any(k.arg is None for k in node.keywords)
        or not (node.args or node.keywords)
        or (len(node.args) == 1 and isinstance(node.args[0], ast.Constant) and node.args[0].value is Ellipsis)
    )
    kwargs = {k.arg: None for k in node.keywords if k.arg is not None}
    errors = []
    for obj in candidates:
        if not callable(obj):
            continue
        try:
            signature = inspect.signature(obj)
        except (TypeError, ValueError):
            return None  # a builtin without a signature
        try:
            (signature.bind_partial if partial else signature.bind)(*[None] * len(args), **kwargs)
            return None
        except TypeError as e:
            errors.append(f"{signature}: {e}")
    return f"{expr}: " + "; ".join(errors) if errors else None


def test_every_documented_name_imports_and_every_documented_call_binds():
    index = public_index()
    checked, failures = [], []
    for doc in DOCUMENTS:
        text = doc.read_text()
        namespace = {}
        for module, names in IMPORT.findall(text):
            for name in (n.strip() for n in names.split(",") if n.strip()):
                try:
                    namespace[name] = getattr(importlib.import_module(module), name)
                except (ImportError, AttributeError) as e:
                    failures.append(f"{doc.name}: from {module} import {name}: {e!r}")
        for name in DOTTED.findall(text):
            try:
                resolve_dotted(name)
            except (ImportError, AttributeError) as e:
                failures.append(f"{doc.name}: {name} does not resolve: {e!r}")
        for expr in shown_calls(text):
            try:
                problem = check_call(expr, namespace, index)
            except Unresolved:
                continue  # not a rose_trl name (numpy, torch, datasets, prose)
            checked.append(f"{doc.name}: {expr.split('(')[0]}")
            if problem:
                failures.append(f"{doc.name}: {problem}")
    assert not failures, "\n".join(failures)
    # The documents do show these; a parser that found nothing would pass vacuously.
    shown = {c.split(": ", 1)[1] for c in checked}
    for name in (
        "ROSECallback",
        "ROSEConfig",
        "ROSESelector",
        "select_from_checkpoints",
        "per_example_gradients",
        "load_pool",
        "load_preferences",
        "preference_metrics",
        "generate_responses",
        "push_selection",
    ):
        assert name in shown, f"no call of {name} found in README.md or docs/ (parser or documents changed)"


def test_a_wrong_call_is_caught():
    """The checker itself: a keyword the function does not take, and a missing required argument."""
    index = public_index()
    assert check_call("per_example_gradients(model, batch, optimizer=opt)", {}, index) is None
    assert "unexpected keyword" in check_call("per_example_gradients(model, batch, optimiser=opt)", {}, index)
    assert check_call("per_example_gradients(model, *, nonexistent=None)", {}, index) is not None
    with pytest.raises(Unresolved):
        check_call("np.load(path)", {}, index)


def test_the_public_names_run(planted, tiny_base, tmp_path):
    """rose_trl.__all__, called as README.md shows them, on the tiny model."""
    from peft import LoraConfig, get_peft_model

    from rose_trl import ROSECallback, ROSEConfig, ROSEDPOTrainer, ROSESelector, per_example_gradients
    from rose_trl.gradients.featurizer import Featurizer
    from rose_trl.gradients.projection import build_projector
    from rose_trl.stores.validation import validation_dpo_config
    from tests.helpers import mixed_length_batch

    assert sorted(rose_trl.__all__) == [
        "ROSECallback",
        "ROSEConfig",
        "ROSEDPOTrainer",
        "ROSESelector",
        "SelectConfig",
        "load_pool",
        "load_preferences",
        "per_example_gradients",
        "select_from_checkpoints",
    ]
    from rose_trl.data import load_pool, load_preferences
    from rose_trl.run.offline import select_from_checkpoints

    assert (rose_trl.load_pool, rose_trl.load_preferences) == (load_pool, load_preferences)
    assert rose_trl.select_from_checkpoints is select_from_checkpoints
    pool, validation, tokenizer, _ = planted
    config = ROSEConfig(selection_fraction=0.05)
    callback = ROSECallback(pool, validation, config=config)
    assert callback.config is config
    selector = ROSESelector(
        pool.select(range(8)), validation, tokenizer, ROSEConfig(), output_dir=str(tmp_path / "run")
    )
    assert len(selector.pool_tokens) == 8

    model = get_peft_model(tiny_base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    batch = mixed_length_batch([6, 4], [2, 1], vocab=tiny_base.config.vocab_size)
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    rows = per_example_gradients(model, batch, optimizer=optimizer)
    assert rows.shape == (2, sum(p.numel() for p in params)) and torch.isfinite(rows).all()

    trainer = ROSEDPOTrainer(
        model,
        validation_dpo_config(str(tmp_path / "dpo"), batch_size=2, use_cpu=True),
        validation.select_columns(["prompt", "chosen", "rejected"]),
        tokenizer,
    )
    features = trainer.pair_gradients(Featurizer(build_projector("sjlt", len(rows[0]), 64, 0)))
    assert features.shape == (len(validation), 64) and torch.isfinite(features).all()
