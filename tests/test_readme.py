"""The README's quickstart runs as pasted: its Python block, unchanged, in a fresh process (in a
temporary directory: it writes ``runs/quickstart``), trains to a dev accuracy well above chance
and gets the same accuracy back from the reloaded and from the merged delta."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def quickstart() -> str:
    text = README.read_text()
    section = text[text.index("## Quickstart"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_quickstart_runs_as_pasted(tmp_path):
    script = tmp_path / "quickstart.py"
    script.write_text(quickstart())
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    acc = float(re.search(r"dev accuracy ([0-9.]+)", run.stdout).group(1))
    reloaded, merged = map(float, re.search(r"reloaded ([0-9.]+), merged ([0-9.]+)",
                                            run.stdout).groups())
    assert acc > 0.7 and reloaded == acc and abs(merged - acc) < 0.005
    assert (tmp_path / "runs" / "quickstart").is_dir()


def _table():
    import importlib.util
    import json
    root = README.parent
    spec = importlib.util.spec_from_file_location("bench_table", root / "benchmarks" / "table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    return table, json.loads((root / "benchmarks" / "results" / "table.json").read_text())


def test_readme_results_come_from_the_results_table():
    """Every number of the README's Results section is the table file's, rendered by the same
    function, and ``table.md`` is the rendering of ``table.json`` (neither edited by hand)."""
    table, data = _table()
    assert table.summary_markdown(data) in README.read_text()
    md = (README.parent / "benchmarks" / "results" / "table.md").read_text()
    assert md == table.markdown(data)
    assert {r["method"] for r in data["rows"]} == set(table.ROWS)
    assert all(len(t["test_runs"]) == data["settings"]["seeds"]
               for r in data["rows"] for t in r["tasks"].values())
