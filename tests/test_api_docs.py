"""Every public class and function of ``captum_inn`` is documented in the API reference.

What counts as public:

* the public modules: every module of the package whose dotted path has no component starting
  with ``_`` (found by walking the package, so a new module is checked without editing this file);
* in each, the names of its ``__all__`` (or, without ``__all__``, the functions and classes
  defined in the module whose names do not start with ``_``), keeping classes and functions
  (constants and type aliases are documented with ``#:`` comments, which carry no docstring);
* the public methods and properties that :class:`~captum_inn.LayerInvariance` and
  :class:`~captum_inn.LayerConcepts` define themselves (``attribute``, ``sample``, ...).

An object re-exported by several modules (``captum_inn.inn.ActNorm`` is
``captum_inn.inn.actnorm.ActNorm``) is checked once. For each object:

(a) **docstring**: it has its own, non-empty docstring.

(b) **example**: the docstring has an example: an ``Example``/``Examples`` section, a ``>>>``
    line, or a ``::`` literal block (a line ending in ``::`` followed by an indented line).

(c) **shapes**: tensors are the package's currency, so their shapes must be written down.
    A parameter is a tensor argument when its annotation mentions ``Tensor`` (``Tensor``,
    ``Optional[Tensor]``, ``Union[Tensor, Tuple[Tensor, ...]]``, Captum's
    ``TensorOrTupleOfTensorsGeneric``), unless it is a ``Callable`` (a function of tensors is not
    a tensor). For a function or method, each tensor argument must have
    its own entry in the ``Args`` section and that entry must state a shape; when the return
    annotation mentions ``Tensor``, the ``Returns``/``Yields`` section (or, without one, the
    summary paragraph) must state a shape. For a class, the same holds for the tensor arguments of
    its constructor (described under ``Args`` or ``Attributes``), and if it defines a ``forward``
    with tensor arguments, the class's or ``forward``'s docstring must state a shape.
    "States a shape" means it contains a shape tuple whose first entry is a dimension name in
    capitals (with an optional ``_subscript``), a number or a snake_case name (``(N, C, H, W)``,
    ``(N,)``, ``(3, H, W)``, ``(N_train, d)``, ``(n_samples, d)``) or the word ``shape``/``shapes``/``shaped`` (``same shape as inputs``). The rule
    reads annotations, so a tensor argument annotated ``Any`` is not checked.

(d) **API reference**: ``docs/api.rst`` documents it, either with an explicit
    ``autoclass``/``autofunction``/``autoexception`` directive naming it (under any of the paths
    it is reachable by), or with an ``automodule`` directive of a module whose ``__all__`` holds
    it and that has no ``:no-members:`` option (``docs/conf.py`` turns ``members`` on by
    default). A method of the attribution classes counts when its class's ``autoclass``
    directive lists it under ``:members:`` (or has ``:members:`` with no list).

Each check collects every offender and fails once, listing them all.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Set, Tuple

import pytest
from torch import Tensor

import captum_inn

API_RST = Path(__file__).resolve().parents[1] / "docs" / "api.rst"

#: Modules that must be among the public ones found (a guard against the walk finding nothing).
EXPECTED_MODULES = {
    "captum_inn", "captum_inn.attr", "captum_inn.inn", "captum_inn.capture", "captum_inn.datasets",
    "captum_inn.concepts", "captum_inn.compare", "captum_inn.analysis", "captum_inn.autoencoders",
    "captum_inn.training", "captum_inn.training.classifier", "captum_inn.training.dynamics",
    "captum_inn.training.disk", "captum_inn.training.distributed", "captum_inn.training.cache",
    "captum_inn.training.checkpoint", "captum_inn.training.loop", "captum_inn.metrics",
    "captum_inn.visualization", "captum_inn.models", "captum_inn.demo", "captum_inn.photo_demo",
    "captum_inn.cli",
}

#: Classes whose own public methods and properties are checked as well.
METHOD_CLASSES = ("captum_inn.LayerInvariance", "captum_inn.LayerConcepts")

SECTION_RE = re.compile(r"^(\s*)([A-Z][A-Za-z ]*):{1,2}\s*$")
ARG_SECTIONS = {"args", "arguments", "parameters", "params", "keyword args", "keyword arguments",
                "other parameters", "attributes"}
RETURN_SECTIONS = {"returns", "return", "yields", "yield"}
_DIM = r"(?:[A-Z][A-Z0-9']*(?:_\w+)?|\d+|[a-z][a-z0-9]*_[a-z0-9_]+|\.\.\.|\*\w*)"
SHAPE_RE = re.compile(r"\(\s*" + _DIM + r"\s*[,)]|\bshape[sd]?\b")
DIRECTIVE_RE = re.compile(r"^\.\.\s+(auto\w+)::\s*(\S+)\s*$")
OPTION_RE = re.compile(r"^\s+:([\w-]+):\s*(.*?)\s*$")


# --------------------------------------------------------------------------------------------
# Docstring reading (pure functions, tested below on made-up docstrings)
# --------------------------------------------------------------------------------------------


def has_example(doc: str) -> bool:
    """Whether ``doc`` holds an example section, a ``>>>`` line or a ``::`` literal block."""
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith(">>>"):
            return True
        if re.fullmatch(r"Examples?::?", stripped) or stripped.endswith("::"):
            indent = len(line) - len(line.lstrip())
            rest = [ln for ln in lines[i + 1:] if ln.strip()]
            if rest and len(rest[0]) - len(rest[0].lstrip()) > indent:
                return True
    return False


def states_shape(text: str) -> bool:
    """Whether ``text`` writes down a tensor shape (see the module docstring, rule (c))."""
    return bool(SHAPE_RE.search(text))


def sections(doc: str) -> Dict[str, str]:
    """Google-style sections of ``doc`` (lower-cased title -> body); ``""`` is the summary."""
    doc = inspect.cleandoc(doc)
    out: Dict[str, List[str]] = {"": []}
    current, indent = "", 0
    for line in doc.splitlines():
        m = SECTION_RE.match(line)
        if m and m.group(2).lower() in ARG_SECTIONS | RETURN_SECTIONS | {"example", "examples",
                                                                          "raises", "note", "notes"}:
            current, indent = m.group(2).lower(), len(m.group(1))
            out.setdefault(current, [])
            continue
        if current and line.strip() and len(line) - len(line.lstrip()) <= indent:
            current = "~"  # back to free text after a section
            out.setdefault(current, [])
        out[current].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


def arg_entries(doc: str) -> Dict[str, str]:
    """``name -> description`` of every entry of the ``Args``-like sections of ``doc``."""
    entries: Dict[str, str] = {}
    for title, body in sections(doc).items():
        if title not in ARG_SECTIONS:
            continue
        lines = [ln for ln in body.splitlines() if ln.strip()]
        if not lines:
            continue
        base = min(len(ln) - len(ln.lstrip()) for ln in lines)
        name: Optional[str] = None
        for ln in lines:
            if len(ln) - len(ln.lstrip()) == base:
                m = re.match(r"\s*\**([\w, ]+?)\s*(\(.*?\))?\s*:(.*)", ln)
                if m:
                    names = [n.strip() for n in m.group(1).split(",")]
                    name = names[0]
                    for n in names:
                        entries[n] = m.group(3)
                    continue
            if name is not None:
                entries[name] += "\n" + ln
    return entries


def returns_text(doc: str) -> str:
    """The ``Returns``/``Yields`` section of ``doc``, or its summary paragraph without one."""
    secs = sections(doc)
    found = [body for title, body in secs.items() if title in RETURN_SECTIONS]
    return "\n".join(found) if found else secs[""]


def _mentions_tensor(annotation: object) -> bool:
    if annotation is inspect.Parameter.empty:
        return False
    text = annotation if isinstance(annotation, str) else repr(annotation)
    return "Tensor" in text and not re.match(r"(typing\.)?(Optional\[)?Callable\b", text)


def shape_problems(doc: str, func: Callable, *, check_return: bool = True) -> List[str]:
    """What ``doc`` fails to say about the shapes of ``func``'s tensor arguments and result."""
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return []
    problems = []
    entries = arg_entries(doc)
    for p in sig.parameters.values():
        if p.name in ("self", "cls") or not _mentions_tensor(p.annotation):
            continue
        if p.name not in entries:
            problems.append(f"tensor argument `{p.name}` has no Args entry")
        elif not states_shape(entries[p.name]):
            problems.append(f"the Args entry of tensor argument `{p.name}` states no shape")
    if check_return and _mentions_tensor(sig.return_annotation) and not states_shape(returns_text(doc)):
        problems.append("returns a tensor but Returns states no shape")
    return problems


# --------------------------------------------------------------------------------------------
# Collecting the public API
# --------------------------------------------------------------------------------------------


@dataclass
class Public:
    """A public object and every dotted path it is reachable by."""

    obj: object
    paths: List[str] = field(default_factory=list)
    owner: Optional[type] = None  # set for methods: the class defining them

    @property
    def name(self) -> str:
        return self.paths[0]


def public_modules() -> List[str]:
    names = ["captum_inn"]
    for info in pkgutil.walk_packages(captum_inn.__path__, "captum_inn."):
        parts = info.name.split(".")
        if any(p.startswith("_") for p in parts):
            continue
        names.append(info.name)
    return sorted(names)


def module_public_names(module) -> List[str]:
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [
        n for n, obj in vars(module).items()
        if not n.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj))
        and getattr(obj, "__module__", None) == module.__name__
    ]


def _unwrap_member(obj: object) -> object:
    return obj.fget if isinstance(obj, property) else obj


def collect() -> Tuple[List[Public], Dict[str, List[int]]]:
    """The public classes/functions/methods, and ``module -> ids of its __all__ objects``."""
    by_id: Dict[int, Public] = {}
    module_members: Dict[str, List[int]] = {}
    for modname in public_modules():
        module = importlib.import_module(modname)
        ids = []
        for name in module_public_names(module):
            obj = getattr(module, name)
            ids.append(id(obj))
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            by_id.setdefault(id(obj), Public(obj)).paths.append(f"{modname}.{name}")
        if hasattr(module, "__all__"):
            module_members[modname] = ids
    items = list(by_id.values())
    for dotted in METHOD_CLASSES:
        modname, clsname = dotted.rsplit(".", 1)
        cls = getattr(importlib.import_module(modname), clsname)
        for name, member in vars(cls).items():
            member = _unwrap_member(member)
            if name.startswith("_") or not inspect.isfunction(member):
                continue
            items.append(Public(member, [f"{dotted}.{name}"], owner=cls))
    return items, module_members


@dataclass
class ApiReference:
    """What ``docs/api.rst`` documents."""

    explicit: Set[int] = field(default_factory=set)  # ids of objects named by a directive
    modules: Set[str] = field(default_factory=set)  # automodule with members
    class_members: Dict[int, Optional[Set[str]]] = field(default_factory=dict)  # None: all
    unresolved: List[str] = field(default_factory=list)


def resolve(dotted: str) -> object:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def read_api_reference(text: str) -> ApiReference:
    ref = ApiReference()
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = DIRECTIVE_RE.match(line)
        if not m:
            continue
        kind, target = m.groups()
        options: Dict[str, str] = {}
        for opt_line in lines[i + 1:]:
            om = OPTION_RE.match(opt_line)
            if not om:
                break
            options[om.group(1)] = om.group(2)
        try:
            obj = resolve(target)
        except (ImportError, AttributeError):
            ref.unresolved.append(f"{kind}:: {target}")
            continue
        if kind == "automodule":
            if "no-members" not in options:
                ref.modules.add(target)
            continue
        ref.explicit.add(id(obj))
        if kind == "autoclass" and "no-members" not in options:
            listed = options.get("members", "")
            ref.class_members[id(obj)] = (
                {n.strip() for n in listed.split(",") if n.strip()} if listed else None
            )
    return ref


def is_documented(item: Public, ref: ApiReference, module_members: Dict[str, List[int]]) -> bool:
    if item.owner is not None:
        method = item.name.rsplit(".", 1)[1]
        if id(item.owner) not in ref.class_members:
            return False
        listed = ref.class_members[id(item.owner)]
        return listed is None or method in listed
    if id(item.obj) in ref.explicit:
        return True
    return any(id(item.obj) in module_members.get(m, ()) for m in ref.modules)


def own_doc(obj: object) -> str:
    """The docstring written for ``obj`` itself (not one inherited from a base class)."""
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if doc else ""


# --------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api():
    return collect()


def _report(what: str, problems: List[str]) -> None:
    if problems:
        pytest.fail(f"{len(problems)} public name(s) {what}:\n  " + "\n  ".join(sorted(problems)),
                    pytrace=False)


def test_public_modules_are_found():
    found = set(public_modules())
    assert EXPECTED_MODULES <= found, f"public modules not found: {sorted(EXPECTED_MODULES - found)}"


def test_public_names_exist(api):
    items, _ = api
    assert len(items) > 50, f"only {len(items)} public objects found"
    for modname in public_modules():
        module = importlib.import_module(modname)
        missing = [n for n in getattr(module, "__all__", ()) if not hasattr(module, n)]
        assert not missing, f"{modname}.__all__ names missing attributes: {missing}"


def test_every_public_name_has_a_docstring(api):
    items, _ = api
    _report("without a docstring", [item.name for item in items if not own_doc(item.obj)])


def test_every_docstring_has_an_example(api):
    items, _ = api
    _report(
        "whose docstring has no example (Examples:: section, >>> line or :: block)",
        [item.name for item in items if own_doc(item.obj) and not has_example(own_doc(item.obj))],
    )


def test_every_docstring_states_tensor_shapes(api):
    items, _ = api
    problems = []
    for item in items:
        doc = own_doc(item.obj)
        if not doc:
            continue
        obj = item.obj
        found: List[str] = []
        if inspect.isclass(obj):
            if "__init__" in vars(obj) or "__dataclass_fields__" in vars(obj):
                found += shape_problems(doc, obj, check_return=False)
            forward = vars(obj).get("forward")
            if forward is not None and any(
                _mentions_tensor(p.annotation) for p in inspect.signature(forward).parameters.values()
            ) and not (states_shape(doc) or states_shape(own_doc(forward))):
                found.append("forward takes tensors but no shape is stated")
        else:
            found += shape_problems(doc, obj)
        problems += [f"{item.name}: {p}" for p in found]
    _report("with tensor shapes missing", problems)


def test_every_public_name_is_in_the_api_reference(api):
    items, module_members = api
    ref = read_api_reference(API_RST.read_text(encoding="utf-8"))
    assert not ref.unresolved, f"docs/api.rst names objects that do not exist: {ref.unresolved}"
    _report(
        "missing from docs/api.rst",
        [item.name for item in items if not is_documented(item, ref, module_members)],
    )


# --------------------------------------------------------------------------------------------
# The checks can fail: the readers on made-up docstrings and a made-up api.rst
# --------------------------------------------------------------------------------------------


def _good(x: Tensor, k: int) -> Tensor:
    """Doubles.

    Args:
        x: ``(N, C, H, W)`` images.
        k: How many.

    Returns:
        ``(N, C, H, W)``.

    Examples::

        y = _good(torch.ones(1, 3, 2, 2), 1)
    """


def _bad(x: Tensor, y: Tensor) -> Tensor:
    """Doubles.

    Args:
        x: Images (e.g., photos).

    Returns:
        The doubled images.
    """


def test_readers_accept_a_good_docstring():
    assert has_example(_good.__doc__)
    assert shape_problems(_good.__doc__, _good) == []


def test_readers_reject_a_bad_docstring():
    assert not has_example(_bad.__doc__)
    assert shape_problems(_bad.__doc__, _bad) == [
        "the Args entry of tensor argument `x` states no shape",
        "tensor argument `y` has no Args entry",
        "returns a tensor but Returns states no shape",
    ]


@pytest.mark.parametrize("text, shape", [
    ("``(N, C, H, W)`` images", True), ("``(N,)``", True), ("``(n_samples, d)``", True),
    ("same shape as ``inputs``", True), ("``(3, H, W)``", True), ("``(N_train, 3, size, size)``", True),
    ("images (e.g., photos)", False), ("a tensor (However, see below)", False), ("codes", False),
])
def test_shape_rule(text, shape):
    assert states_shape(text) is shape


def test_example_rule():
    assert has_example("Sum.\n\nExamples::\n\n    y = f(x)\n")
    assert has_example("Sum.\n\n>>> f(1)\n")
    assert has_example("Sum. Use it so::\n\n    f(x)\n")
    assert not has_example("Sum.\n\nExamples::\n")
    assert not has_example("Sum of ``x``.")


def test_api_reference_reader():
    items, module_members = collect()
    by_name = {p: item for item in items for p in item.paths}
    ref = read_api_reference(
        ".. automodule:: captum_inn.metrics\n\n"
        ".. automodule:: captum_inn.inn\n   :no-members:\n\n"
        ".. autofunction:: captum_inn.inn.mlp\n\n"
        ".. autoclass:: captum_inn.LayerInvariance\n   :members: attribute\n"
    )
    doc = lambda name: is_documented(by_name[name], ref, module_members)  # noqa: E731
    assert doc("captum_inn.metrics.probe_r2")
    assert doc("captum_inn.inn.mlp") and doc("captum_inn.inn.coupling.mlp")
    assert not doc("captum_inn.inn.ActNorm")
    assert doc("captum_inn.LayerInvariance.attribute")
    assert not doc("captum_inn.LayerInvariance.sample")
    assert not doc("captum_inn.LayerConcepts")
