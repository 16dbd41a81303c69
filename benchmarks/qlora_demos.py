"""QLoRA on the embedded MiniLM: ``jpeft demo --quantize {none,nf4,int8}``, one JSON line per run.

``python benchmarks/qlora_minilm.py [--schemes none,nf4,int8] [--method lora] [--out PATH]
[-- EXTRA DEMO ARGS]`` runs ``python -m jpeft.cli demo --no-progress --quantize S --method M``
(the preset's default steps and batch unless extra arguments say otherwise) for each scheme, one
after the other, each in a process of its own, and appends one row per run to
``benchmarks/results/qlora_minilm.jsonl``: the exact command, the date, ``/proc/loadavg`` at the
start and the end, the exit status (0: the recipe's reload and merge checks held), dev accuracy
before and after, the trainable count, seconds per training step (as the recipe reports it; the
machine's load says whether that is a timing result), and the base's stored bytes with and
without quantization: whole base and the quantized linear weights alone, computed exactly with
the recipe's own quantization (:mod:`jpeft.recipes.quantization`) on the MiniLM.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import re
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent
REPO = ROOT.parent
sys.path.insert(0, str(REPO))
import common  # noqa: E402  (benchmarks/common.py)

DEFAULT_OUT = ROOT / "results" / "qlora_minilm.jsonl"


def _loadavg() -> str:
    try:
        return pathlib.Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "unavailable"


def stored_bytes(scheme: str) -> dict:
    """The MiniLM classifier's base bytes, stored as ``scheme`` (exact, from the recipe's own
    quantization) and in full precision."""
    import numpy as np

    import jpeft
    from jpeft.data.embedded import minilm_dir
    from jpeft.models.loading import load_hf_bert
    from jpeft.recipes import quantization

    bert = load_hf_bert(minilm_dir(), num_labels=2, pooling="mean")
    variables = {"params": bert.params}
    ids = np.ones((2, 8), np.int32)
    sites = jpeft.probe(bert.model.apply, variables, ids, ids, np.zeros_like(ids))
    b = quantization.num_bytes(quantization.quantize(variables, sites, scheme))
    return {"base_params": jpeft.num_params(variables), "base_bytes_stored": b.stored,
            "base_bytes_full": b.full, "base_ratio": b.full / b.stored,
            "quantized_weights": b.weights, "quantized_weights_bytes_stored": b.weights_stored,
            "quantized_weights_bytes_full": b.weights_full,
            "quantized_weights_ratio": (b.weights_full / b.weights_stored
                                        if b.weights else None),
            "quantization": quantization.config(scheme)}


def _fraction(percent: str) -> float:
    return round(float(percent) / 100, 6)


_PATTERNS = {
    "dev_accuracy_before": (r"dev accuracy before fine-tuning: ([\d.]+)%", _fraction),
    "dev_accuracy_after": (r"dev accuracy after fine-tuning \(.*?\): ([\d.]+)%", _fraction),
    "trainable": (r"\[train\] .*trainable params: ([\d,]+)", lambda s: int(s.replace(",", ""))),
    "train_seconds": (r"\[train\] \d+ steps \(.*?\): ([\d.]+) s \(", float),
    "seconds_per_step": (r"\[train\] \d+ steps \(.*?\): [\d.]+ s \(([\d.]+) s/step\)", float),
    "reload_identical": (r"predictions identical to the trained model: (True|False)",
                         lambda s: s == "True"),
    "merged_agreement": (r"merged model.*?: ([\d.]+)% of dev predictions equal", _fraction),
    "merged_accuracy": (r"merged accuracy ([\d.]+)%", _fraction),
    "base_line": (r"^(base stored .*)$", str),
    "total_seconds": (r"total time ([\d.]+) s", float),
}


def parse(output: str) -> dict:
    """The fields of :data:`_PATTERNS` found in the demo's output (``None`` where absent)."""
    out = {}
    for key, (pattern, conv) in _PATTERNS.items():
        m = re.search(pattern, output, re.MULTILINE)
        out[key] = conv(m.group(1)) if m else None
    return out


def run_one(scheme: str, method: str, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "jpeft.cli", "demo", "--no-progress", "--method", method,
               "--quantize", scheme, *extra, "--out", tmp]
        shown = " ".join([".venv/bin/python", *cmd[1:-1], "<tmpdir>"])
        row = {"kind": "qlora_minilm", "scheme": scheme, "method": method, "command": shown,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "loadavg_start": _loadavg()}
        print(f"== {shown}\n   load {row['loadavg_start']}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        row["wall_seconds"] = time.perf_counter() - t0
        row["loadavg_end"] = _loadavg()
    print(proc.stdout, flush=True)
    if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr, flush=True)
    row["returncode"] = proc.returncode
    row.update(parse(proc.stdout))
    return row


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--schemes", default="none,nf4,int8")
    p.add_argument("--method", default="lora")
    p.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    from jpeft.recipes import quantization
    schemes = [s for s in args.schemes.split(",") if s]
    for s in schemes:
        quantization.check(s)
    machine = common.machine(kind="qlora_minilm_machine")
    rows = []
    for scheme in schemes:
        row = run_one(scheme, args.method, extra)
        row.update(stored_bytes(scheme))
        row["machine"] = machine
        rows.append(row)
        old = common_read(args.out)
        common.write_jsonl(args.out, old + [row])    # each run kept as soon as it ends
        print(json.dumps({k: row[k] for k in ("scheme", "returncode", "dev_accuracy_after",
                                              "trainable", "seconds_per_step",
                                              "base_bytes_stored", "loadavg_start")}),
              flush=True)
    base = next((r for r in rows if r["scheme"] == "none"), None)
    for r in rows:
        if base is not None and r is not base and r["dev_accuracy_after"] is not None:
            print(f"{r['scheme']}: dev accuracy {100 * r['dev_accuracy_after']:.2f}% vs "
                  f"{100 * base['dev_accuracy_after']:.2f}% on the float32 base "
                  f"({100 * (r['dev_accuracy_after'] - base['dev_accuracy_after']):+.2f} points)")
    return 0 if all(r["returncode"] == 0 for r in rows) else 1


def common_read(path: pathlib.Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    sys.exit(main())
