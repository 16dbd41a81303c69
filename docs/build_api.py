"""Build jpeft's API reference from its docstrings with pdoc; any warning fails the build.

Usage: ``python docs/build_api.py [OUT_DIR]`` (default ``docs/api``; ``make docs``).

pdoc resolves a signature's postponed annotations (``from __future__ import annotations``) in the
module of the function. A ``NamedTuple``'s generated ``__new__`` belongs to no module (its
``__module__`` is ``namedtuple_<Name>``), so every field annotation of jpeft's named tuples would
fail to resolve; the builder first gives each such ``__new__`` its class's module, which is where
the annotations were written.
"""

from __future__ import annotations

import importlib
import inspect
import pathlib
import pkgutil
import sys
import warnings

import pdoc
import pdoc.render

import jpeft


def _modules() -> list:
    names = [jpeft.__name__] + [m.name for m in pkgutil.walk_packages(jpeft.__path__, "jpeft.")]
    return [importlib.import_module(n) for n in names]


def _own_namedtuple_modules(modules: list) -> None:
    for module in modules:
        for _, cls in inspect.getmembers(module, inspect.isclass):
            new = getattr(cls.__dict__.get("__new__"), "__func__", None)    # a staticmethod
            if (issubclass(cls, tuple) and hasattr(cls, "_fields") and inspect.isfunction(new)
                    and new.__module__.startswith("namedtuple_")):
                new.__module__ = cls.__module__


def _specs(modules: list) -> list[str]:
    """Module specs that make pdoc document every module once: a package whose ``__all__``
    lists names, not submodules, hides them from pdoc's walk, so each module not yet covered by an
    earlier spec's walk is added by name."""
    import pdoc.extract
    specs, covered = [], set()
    for m in modules:
        if m.__name__ not in covered:
            specs.append(m.__name__)
            covered.update(pdoc.extract.walk_specs([m.__name__]))
    return specs


def main(argv: list[str]) -> int:
    out = pathlib.Path(argv[0] if argv else "docs/api")
    modules = _modules()
    _own_namedtuple_modules(modules)
    pdoc.render.configure(docformat="google")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc(*_specs(modules), output_directory=out)
    for w in caught:
        print(f"docs: {w.category.__name__}: {w.message}", file=sys.stderr)
    if caught:
        print(f"docs: {len(caught)} warning(s): the reference is not clean", file=sys.stderr)
        return 1
    print(f"docs: API reference in {out}/ ({sum(1 for _ in out.rglob('*.html'))} pages)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
