"""Execute the notebooks top to bottom and save them with their outputs (plots as PNG).

    .venv/bin/python notebooks/run.py                    # every notebook, real settings
    .venv/bin/python notebooks/run.py decoder results    # some of them
    .venv/bin/python notebooks/run.py --quick --no-save  # the test suite's smoke run

The kernel is this interpreter (a kernel spec written to a temporary directory runs
``sys.executable -m ipykernel_launcher``), so nothing has to be registered with Jupyter, and a
``python3`` kernel installed elsewhere is never picked up. Each notebook runs in its own directory
(``notebooks/``), with plots rendered inline as PNG. ``--quick`` sets ``JPEFT_NOTEBOOK_QUICK=1``,
which every notebook reads to shrink its settings (``tests/test_notebooks.py`` runs them so).
A cell that raises stops its notebook (``nbclient.exceptions.CellExecutionError``) and nothing is
saved for it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import sys
import tempfile
import time

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

HERE = pathlib.Path(__file__).resolve().parent
KERNEL = "jpeft-notebooks"
#: matplotlib inside the kernel: the inline backend (figures become PNG outputs, nothing blocks).
INLINE = "module://matplotlib_inline.backend_inline"


def notebooks() -> list[pathlib.Path]:
    """Every notebook in ``notebooks/``, by name."""
    return sorted(HERE.glob("*.ipynb"))


@contextlib.contextmanager
def kernel_manager():
    """A kernel manager whose kernel is ``sys.executable -m ipykernel_launcher``."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = pathlib.Path(tmp) / KERNEL
        spec.mkdir()
        (spec / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"Python ({sys.executable})", "language": "python"}))
        yield KernelManager(kernel_name=KERNEL,
                            kernel_spec_manager=KernelSpecManager(kernel_dirs=[tmp]))


def execute(path: pathlib.Path, *, quick: bool, timeout: int | None = None
            ) -> nbformat.NotebookNode:
    """Run the notebook at ``path`` top to bottom; returns it with its outputs (not saved)."""
    nb = nbformat.read(path, as_version=4)
    env = {"JPEFT_NOTEBOOK_QUICK": "1" if quick else "", "MPLBACKEND": INLINE}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)                 # the kernel inherits this process's environment
    try:
        with kernel_manager() as km:
            client = NotebookClient(nb, km=km, timeout=timeout, record_timing=False,
                                    shutdown_kernel="immediate",
                                    resources={"metadata": {"path": str(path.parent)}})
            client.execute(cleanup_kc=True)            # shut the kernel down afterwards
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebook names (default: all)")
    parser.add_argument("--quick", action="store_true", help="JPEFT_NOTEBOOK_QUICK=1")
    parser.add_argument("--no-save", action="store_true", help="run only, keep the files as they are")
    args = parser.parse_args(argv)
    paths = notebooks()
    if args.names:
        wanted = {n.removesuffix(".ipynb") for n in args.names}
        unknown = wanted - {p.stem for p in paths}
        if unknown:
            parser.error(f"no notebook named {sorted(unknown)}; have {[p.stem for p in paths]}")
        paths = [p for p in paths if p.stem in wanted]
    total = time.perf_counter()
    for path in paths:
        t0 = time.perf_counter()
        nb = execute(path, quick=args.quick)
        if not args.no_save:
            nbformat.write(nb, path)
        print(f"{path.name}: {time.perf_counter() - t0:.1f} s"
              f"{'' if args.no_save else ', saved'}", flush=True)
    print(f"total {time.perf_counter() - total:.1f} s")


if __name__ == "__main__":
    main()
