"""QLoRA demos: ``jpeft demo --quantize {none,nf4,int8}`` on the embedded MiniLM, and ``jpeft
decoder --quantize ...``, one JSON line per run.

``python benchmarks/qlora_demos.py [--example minilm|decoder] [--schemes none,nf4,int8]
[--method M] [--out PATH] [-- EXTRA ARGS]`` runs, for each scheme, one after the other and each in
a process of its own:

* ``minilm`` (default): ``python -m jpeft.cli demo --no-progress --quantize S --method M`` (the
  preset's default steps and batch unless extra arguments say otherwise), rows appended to
  ``benchmarks/results/qlora_minilm.jsonl``: dev accuracy before and after, the trainable count,
  seconds per training step as the recipe reports it, whether the recipe's reload and merge checks
  held (exit status 0), and the base's stored bytes with and without quantization (whole base and
  the quantized linear weights alone), computed exactly with the recipe's own quantization
  (:mod:`jpeft.recipes.quantization`) on the MiniLM;
* ``decoder``: ``python -m jpeft.cli decoder --quantize S --method M``, rows appended to
  ``benchmarks/results/qlora_decoder_example.jsonl``: held-out loss per byte of the base in full
  precision and as stored, and after the adapter, and the trainable count.

Every row carries the exact command, the date and ``/proc/loadavg`` at the start and the end (a
time taken under load is not a timing result; accuracy and losses are deterministic).
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

DEFAULT_OUT = {"minilm": ROOT / "results" / "qlora_minilm.jsonl",
               "decoder": ROOT / "results" / "qlora_decoder_example.jsonl"}


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


_DECODER_PATTERNS = {
    "loss_full_precision_base": (r"loss per byte: full-precision base ([\d.]+)", float),
    "loss_base": (r"loss per byte: base ([\d.]+) ->", float),
    "loss_adapted": (r"-> adapted ([\d.]+)", float),
    "trainable": (r"^\w+: ([\d,]+) trainable parameters", lambda s: int(s.replace(",", ""))),
    "base_line": (r"^(base stored .*)$", str),
    "total_seconds": (r"total time ([\d.]+) s", float),
}


def parse(output: str, patterns: dict | None = None) -> dict:
    """The fields of ``patterns`` (:data:`_PATTERNS`) found in a run's output (``None`` where
    absent)."""
    out = {}
    for key, (pattern, conv) in (patterns or _PATTERNS).items():
        m = re.search(pattern, output, re.MULTILINE)
        out[key] = conv(m.group(1)) if m else None
    return out


def run_one(example: str, scheme: str, method: str, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        if example == "minilm":
            cmd = [sys.executable, "-m", "jpeft.cli", "demo", "--no-progress", "--method", method,
                   "--quantize", scheme, *extra, "--out", tmp]
            shown = " ".join([".venv/bin/python", *cmd[1:-1], "<tmpdir>"])
        else:
            cmd = [sys.executable, "-m", "jpeft.cli", "decoder", "--method", method,
                   "--quantize", scheme, *extra]
            shown = " ".join([".venv/bin/python", *cmd[1:]])
        row = {"kind": f"qlora_{example}", "scheme": scheme, "method": method, "command": shown,
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
    row.update(parse(proc.stdout, _PATTERNS if example == "minilm" else _DECODER_PATTERNS))
    return row


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--example", choices=tuple(DEFAULT_OUT), default="minilm")
    p.add_argument("--schemes", default="none,nf4,int8")
    p.add_argument("--method", default="lora")
    p.add_argument("--out", type=pathlib.Path, default=None,
                   help="results file, appended to (default per example: "
                        + ", ".join(f"{k}: {v.relative_to(REPO)}" for k, v in DEFAULT_OUT.items())
                        + ")")
    args = p.parse_args(argv)
    args.out = args.out or DEFAULT_OUT[args.example]
    from jpeft.recipes import quantization
    schemes = [s for s in args.schemes.split(",") if s]
    for s in schemes:
        quantization.check(s)
    machine = common.machine(kind=f"qlora_{args.example}_machine")
    rows = []
    for scheme in schemes:
        row = run_one(args.example, scheme, args.method, extra)
        if args.example == "minilm":
            row.update(stored_bytes(scheme))
        row["machine"] = machine
        rows.append(row)
        old = common_read(args.out)
        common.write_jsonl(args.out, old + [row])    # each run kept as soon as it ends
        keys = ("scheme", "returncode", "dev_accuracy_after", "loss_base", "loss_adapted",
                "trainable", "seconds_per_step", "base_bytes_stored", "loadavg_start")
        print(json.dumps({k: row[k] for k in keys if k in row}), flush=True)
    base = next((r for r in rows if r["scheme"] == "none"), None)
    for r in rows:
        if base is not None and r is not base and r.get("dev_accuracy_after") is not None:
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
