"""One student of ``bench_distill.py`` with chosen KD settings, on a finished benchmark's workdir.

``bench_distill.py`` keeps its work directory (teacher checkpoint, teacher-logit cache, data);
this trains one more student there, offline-distilled with the given ``Distillation`` arguments
(``--online``: from the teacher checkpoint, so feature terms work; ``--kd '{}'``: alone), with the
benchmark's data, schedule and seed handling, and prints its validation Dice per class. For
sweeps the benchmark does not make (temperature, weights):

    python benchmarks/probe_distill_kd.py /tmp/bench_distill_XXXX --seed 3 \\
        --kd '{"temperature": 1.0, "kd_weight": 0.5, "kd_ds_weight": 0.25}'
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import lightning.pytorch as pl  # noqa: E402

import bench_distill as bench  # noqa: E402
from trainer.callbacks.distill import Distillation  # noqa: E402


def _json_arg(flag: str, text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise SystemExit(f"error: {flag} {text!r} is not JSON: {err}") from None
    if not isinstance(value, dict):
        raise SystemExit(f"error: {flag} {text!r} must be a JSON object of keyword arguments")
    return value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir", type=Path, help="a bench_distill.py work directory (teacher_logits.h5 inside)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--student-net", default="{}",
                   help='UNet arguments as JSON that replace the benchmark student\'s, e.g. \'{"depth": 4, "max_channels": 32}\'')
    p.add_argument("--online", action="store_true", help="run the teacher instead of reading the cache")
    p.add_argument("--kd", default='{"temperature": 2.0, "kd_weight": 0.5, "kd_ds_weight": 0.25}',
                   help="Distillation arguments as JSON (offline: the cache is added); '{}' trains alone")
    args = p.parse_args(argv)
    cache = args.workdir / "teacher_logits.h5"
    kd, student_net = _json_arg("--kd", args.kd), _json_arg("--student-net", args.student_net)
    if kd and not args.online and not cache.is_file():
        raise SystemExit(f"error: {cache} does not exist: run benchmarks/bench_distill.py --workdir {args.workdir} first")
    bench.quiet_torch(1)
    dm = bench.datamodule(args.workdir)
    pl.seed_everything(args.seed, verbose=False)
    net = {**bench.STUDENT_NET, **student_net}
    student = bench.make_module(net, args.steps, seed=args.seed)
    source = {"teacher": str(args.workdir / "teacher.ckpt")} if args.online else {"cache": str(cache)}
    callbacks = [Distillation(**source, **kd)] if kd else []
    seconds = bench.fit(student, dm, args.workdir, args.steps, callbacks)
    scores = bench.dice(student, dm, args.workdir)
    print(json.dumps({"kd": kd, "online": args.online, "student_net": {k: net[k] for k in ("depth", "base_channels", "max_channels") if k in net},
                      "params": sum(p.numel() for p in student.net.parameters()), "seed": args.seed, "steps": args.steps, "seconds": round(seconds),
                      "dice": {k: round(v, 4) for k, v in scores.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
