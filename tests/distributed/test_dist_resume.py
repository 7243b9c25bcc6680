"""Exact resume: SIGKILL at random points, ``--ckpt_path last``, weights bitwise equal.

Each case is a chain: an uninterrupted reference run, then one run that is SIGKILLed (the
whole process group, all ranks) at a random point, a second that resumes and is killed again,
and a third that resumes and finishes. Kill points are drawn from a seeded RNG per case; the
four phases (after a training batch, mid-accumulation when that batch does not complete a
step; after backward before the optimizer step; during validation; at the end of an epoch,
between ModelCheckpoint's batch-end and epoch-end saves) are spread over the cases so every
phase is hit twice. The net has dropout (the global RNG matters) and instance norm; the data
is shuffled per epoch by a rank-aware sampler behind a StatefulDataLoader.

Runs as ``launch.py fit`` subprocesses (devices=2 re-executes launch.py, never pytest).
"""
from __future__ import annotations

import random

import pytest
import scale_kit as kit

PHASES = ["batch_end", "before_step", "validation", "epoch_end"]
CASES = [  # (devices, precision, accumulate_grad_batches)
    pytest.param(1, "32-true", 2, id="1rank-fp32-accum2"),
    pytest.param(1, "bf16-mixed", 1, id="1rank-bf16"),
    pytest.param(2, "32-true", 1, id="2rank-fp32"),
    pytest.param(2, "bf16-mixed", 2, id="2rank-bf16-accum2"),
]
MAX_STEPS = 12


def kill_points(case: int, accumulate: int) -> list[tuple[str, int]]:
    """Two kill points for ``case``: phases round-robin, batches random (seeded), the second
    strictly after the first and both before the last batch."""
    rng = random.Random(1000 + case)
    batches = MAX_STEPS * accumulate
    first = rng.randrange(1, batches // 2)
    second = rng.randrange(first + 2, batches - 1)
    return [(PHASES[(2 * case) % 4], first), (PHASES[(2 * case + 1) % 4], second)]


@pytest.mark.slow
@pytest.mark.parametrize("devices,precision,accumulate", CASES)
def test_sigkill_anywhere_then_resume_is_bitwise_exact(devices, precision, accumulate, tmp_path, request):
    case = [c.id for c in CASES].index(request.node.callspec.id)
    config = dict(devices=devices, precision=precision, accumulate=accumulate, max_steps=MAX_STEPS)
    log = tmp_path / "runs.log"

    ref = tmp_path / "ref"
    kit.write_recipe(ref / "recipe.yaml", kit.recipe(ref, **config))
    kit.launch(["fit", "--config", str(ref / "recipe.yaml")], kit.env_with_kit(), log=log)

    kills = kill_points(case, accumulate)
    run = tmp_path / "run"
    killers = [{"class_path": "scale_kit.KillAt", "init_args": {"phase": phase, "batch": batch, "attempt": i}}
               for i, (phase, batch) in enumerate(kills)]
    kit.write_recipe(run / "recipe.yaml", kit.recipe(run, callbacks=killers, **config))
    for attempt in range(len(kills) + 1):
        args = ["fit", "--config", str(run / "recipe.yaml")] + (["--ckpt_path", "last"] if attempt else [])
        done = kit.launch(args, kit.env_with_kit(SCALE_KIT_ATTEMPT=str(attempt)), check=False, log=log)
        expected = 0 if attempt == len(kills) else -9
        assert done.returncode == expected, f"attempt {attempt} (kill {kills[attempt] if attempt < len(kills) else None}) " \
                                            f"exited {done.returncode}; log {log}:\n{done.stdout[-3000:]}"
        if attempt:
            assert "resuming from" in done.stdout, done.stdout[-2000:]

    kit.assert_bitwise_equal(kit.final_weights(ref), kit.final_weights(run), f"{request.node.callspec.id} kills {kills}")


def test_kill_points_cover_every_phase_twice():
    drawn = [p for case in range(len(CASES)) for p, _ in kill_points(case, 2)]
    assert sorted(drawn) == sorted(PHASES * 2)
