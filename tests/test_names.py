"""Names that mean one thing: no function's parameter is named like a module its file imports,
so no flag or argument can hide that module inside the function (encode.py's *paths once hid
gpt2.paths, and --model_name was an AttributeError)."""
import ast
import glob
import os

from tests.conftest import ROOT


def _sources():
    return sorted(glob.glob(os.path.join(ROOT, 'gpt2', '*.py')) +
                  glob.glob(os.path.join(ROOT, 'encoder', '*.py')) +
                  glob.glob(os.path.join(ROOT, 'bench', '*.py')) +
                  glob.glob(os.path.join(ROOT, '*.py')))


def _imported(tree):
    # the names a file's top-level imports bind
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update((a.asname or a.name).split('.')[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.update(a.asname or a.name for a in node.names)
    return names


def _parameters(fn):
    a = fn.args
    return ([p.arg for p in a.posonlyargs + a.args + a.kwonlyargs] +
            [p.arg for p in (a.vararg, a.kwarg) if p is not None])


def test_no_parameter_is_named_like_an_imported_module():
    clashes = []
    for path in _sources():
        with open(path, encoding='utf-8') as f:
            tree = ast.parse(f.read(), path)
        imported = _imported(tree)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                clashes += [f'{os.path.relpath(path, ROOT)}:{node.lineno} '
                            f'{getattr(node, "name", "lambda")}({p})'
                            for p in _parameters(node) if p in imported]
    assert len(_sources()) > 40
    assert not clashes, ('parameters named like a module their file imports (import it as '
                         f'NAME_lib, or rename the parameter): {clashes}')
