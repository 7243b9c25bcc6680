"""Run every benchmark of the project and write one Markdown file of their tables.

    python benchmarks/run_all.py --out benchmarks/RESULTS.md [--quick]

Each benchmark runs its compared candidates interleaved in one process and reports ratios
(the machine is shared and noisy); this script only runs them one after another, so no two
benchmarks compete for the cores, and stitches their tables together with the command that
produced each and the machine it ran on.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BENCHMARKS = {
    "data loading (issue 3)": ["benchmarks/bench_data.py"],
    "distillation (issue 5)": ["benchmarks/bench_distill.py", "--workers", str(min(2, os.cpu_count() or 1))],
    "prune-retrain (issue 6)": ["benchmarks/bench_prune.py"],
    "quantization (issue 7)": ["benchmarks/bench_qat.py"],
    "INT8 on every CPU (issue 15)": ["benchmarks/bench_int8_cpu.py"],
    "data file check (issue 17)": ["benchmarks/bench_filecheck.py"],
    "faults (issue 16)": ["benchmarks/bench_faults.py", "--faults", "5"],
}
QUICK = {"benchmarks/bench_distill.py": ["--quick"], "benchmarks/bench_qat.py": ["--quick"],
         "benchmarks/bench_int8_cpu.py": ["--quick"], "benchmarks/bench_faults.py": ["--faults", "1"]}


def machine() -> str:
    from trainer.export.machine import describe, machine_info  # the CPU matters for INT8 results

    return f"{describe(machine_info())}, {os.cpu_count()} cores, Python {platform.python_version()}"


def _demote(text: str) -> str:
    """Headings inside a benchmark's own write-up go two levels under its section."""
    return "\n".join("##" + line if line.startswith("#") else line for line in text.splitlines()) + "\n"


def _read_sections(path: Path) -> dict[str, str]:
    """The sections of an earlier RESULTS.md, keyed by benchmark title."""
    if not path.exists():
        return {}
    sections = {}
    for chunk in path.read_text().split("\n## ")[1:]:
        title = chunk.split("\n", 1)[0].strip()
        if title in BENCHMARKS:
            sections[title] = "## " + chunk.rstrip("\n") + "\n"
    return sections


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/RESULTS.md")
    parser.add_argument("--only", nargs="*", help="run only benchmarks whose title contains one of these words")
    parser.add_argument("--quick", action="store_true", help="tiny budgets where a benchmark has them (checks only)")
    args = parser.parse_args()
    out = Path(args.out)
    sections = _read_sections(out)  # a partial run (--only) replaces its own sections only
    sections["header"] = f"# Benchmarks\n\nMachine: {machine()}. Ratios come from interleaved runs within one process.\n"
    for title, cmd in BENCHMARKS.items():
        if args.only and not any(w in title for w in args.only):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            table = Path(tmp) / "table.md"
            full = [*cmd, *(QUICK.get(cmd[0], []) if args.quick else []), "--out", str(table)]
            print(f"==> {title}: python {shlex.join(full)}", flush=True)
            start = time.perf_counter()
            done = subprocess.run([sys.executable, *full], cwd=ROOT)
            took = time.perf_counter() - start
            body = _demote(table.read_text()) if done.returncode == 0 and table.exists() else f"FAILED (exit {done.returncode})\n"
        stamp = time.strftime("%Y-%m-%d")
        sections[title] = f"## {title}\n\n`python {shlex.join(full[:-2])}` ({took / 60:.1f} min, {stamp})\n\n{body}"
    ordered = [sections["header"]] + [sections[t] for t in BENCHMARKS if t in sections]
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(ordered))
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
