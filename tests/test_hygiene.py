"""Tests go through jitfreeze's public surface: no test reads a private attribute of a jitfreeze object.

What a signature resolved to, the cache in use and the stored artifact are public
(``signatures()``, ``cache_location``, tests/conftest.py's helpers); a helper a test checks on its
own is public within its (internal) module. Private names are free to change without touching a
test. torch's and diskcache's private APIs (``torch._C``, ``diskcache.Cache._row_insert``) are not
jitfreeze's and are not checked.
"""

import ast
import glob
import os
import textwrap

import jitfreeze

TESTS = os.path.dirname(os.path.abspath(__file__))
PACKAGE = os.path.dirname(os.path.abspath(jitfreeze.__file__))

# Left on purpose, with the reason. Each must still occur (a stale line fails the test too).
ALLOWED = {
    # diskcache's own hook (Disk._write), which RawOnlyDisk overrides: the test of a refused
    # pickle write replaces it to see what diskcache would write.
    ("test_reliability.py", "_write"),
}


NAMEDTUPLE = {"_asdict", "_replace", "_fields", "_make"}       # namedtuple's public API (CacheInfo)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__")) and name not in NAMEDTUPLE


def _package_private_names() -> set:
    """Private attributes jitfreeze's own classes define (``self._x = ...``, ``def _x`` in a class)."""
    names = set()
    for path in glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) \
                    and isinstance(node.value, ast.Name) and node.value.id == "self" and _private(node.attr):
                names.add(node.attr)
            elif isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and _private(item.name):
                        names.add(item.name)
                    elif isinstance(item, ast.Assign):
                        names.update(t.id for t in item.targets if isinstance(t, ast.Name) and _private(t.id))
    return names


def _root(node):
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def private_accesses(source: str, instance_names: set) -> list:
    """(line, attribute) for each private attribute of a jitfreeze object in ``source``: on a name
    imported from jitfreeze (a module, class or function), on what a call of one returned (a name
    assigned from it), and any attribute in ``instance_names`` (jitfreeze's own private instance
    attributes and methods, wherever the object came from). ``monkeypatch.setattr(obj, "_x", ...)``,
    ``setattr`` and ``getattr`` with a string count as accesses too."""
    tree = ast.parse(source)
    ours = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            ours.update((a.asname or a.name).split(".")[0] for a in node.names
                        if a.name.split(".")[0] == "jitfreeze")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "jitfreeze":
            ours.update(a.asname or a.name for a in node.names)
    for _ in range(3):                                 # names assigned from calls of jitfreeze names
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None \
                    and _root(node.value) in ours:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                ours.update(t.id for t in targets if isinstance(t, ast.Name))
            elif isinstance(node, ast.withitem) and isinstance(node.optional_vars, ast.Name) \
                    and _root(node.context_expr) in ours:
                ours.add(node.optional_vars.id)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            if _root(node.value) in ours or node.attr in instance_names:
                found.append((node.lineno, node.attr))
        elif isinstance(node, ast.Call) and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) \
                and isinstance(node.args[1].value, str) and _private(node.args[1].value) \
                and ((isinstance(node.func, ast.Attribute) and node.func.attr == "setattr")
                     or (isinstance(node.func, ast.Name) and node.func.id in ("setattr", "getattr"))) \
                and (_root(node.args[0]) in ours or node.args[1].value in instance_names):
            found.append((node.lineno, node.args[1].value))
    for node in ast.walk(tree):                       # child-process scripts written as strings
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "jitfreeze" in node.value \
                and "import" in node.value:
            try:
                inner = private_accesses(textwrap.dedent(node.value), instance_names)
            except SyntaxError:
                continue
            found += [(node.lineno + line - 1, attr) for line, attr in inner]
    return found


def test_no_test_reads_a_private_attribute_of_a_jitfreeze_object():
    instance_names = _package_private_names()
    found, used = [], set()
    for path in sorted(glob.glob(os.path.join(TESTS, "*.py"))):
        name = os.path.basename(path)
        if name == os.path.basename(__file__):          # its examples are the checker's own test
            continue
        with open(path, encoding="utf-8") as f:
            for line, attr in private_accesses(f.read(), instance_names):
                if (name, attr) in ALLOWED:
                    used.add((name, attr))
                else:
                    found.append(f"{name}:{line}: .{attr}")
    assert not found, "tests reach into jitfreeze's private attributes (use signatures(), cache_location, " \
        "tests/conftest.py, or make the helper public in its module):\n" + "\n".join(found)
    assert used == ALLOWED, f"no longer used, remove from ALLOWED: {sorted(ALLOWED - used)}"


def test_the_check_finds_what_it_should_and_nothing_else():
    names = _package_private_names()
    assert {"_table", "_resolver", "_cache_for", "_last"} <= names
    flagged = private_accesses(
        "import torch\n"
        "import jitfreeze as jf\n"
        "from jitfreeze.backend import torchscript\n"
        "from jitfreeze.cache.store import DiskStore\n"
        "fast = jf.jitfreeze(f)\n"
        "fast.cache_info()._asdict()\n"                 # namedtuple's public method
        "fast._table\n"                                 # 7
        "torchscript._medians\n"                        # 8
        "DiskStore(d)._opened\n"                        # 9
        "monkeypatch.setattr(torchscript, '_timing', None)\n"   # 10
        "torch._C._get_graph_executor_optimize()\n"
        "t._version\n"
        "os._exit(0)\n"
        "other._fallbacks\n"                            # 14: a jitfreeze instance attribute, however reached
        "other.__wrapped__\n", names)
    assert sorted(flagged) == [(7, "_table"), (8, "_medians"), (9, "_opened"), (10, "_timing"), (14, "_fallbacks")]
    script = 'CHILD = """\nimport jitfreeze\nf = jitfreeze.jitfreeze(g)\nprint(f.traces, f._dyn)\n"""\n'
    assert private_accesses(script, names) == [(4, "_dyn")]          # a child script's line
