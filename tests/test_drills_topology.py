"""Reliability drills 6 and 7: another device count after a restart, and two hosts.

6. One run, restarted three times on other device counts - 8 devices, then 4, then 1, then 8
   again - against an uninterrupted run on 8: each checkpoint restores onto 8, 4 and 1 devices
   with bitwise the same arrays, each restart takes up the data exactly where the checkpoint
   left it (the very same batches, row for row), and the losses and the trained network agree
   with the uninterrupted run to float32 rounding (a reduction over 4 or 1 devices adds in
   another order than over 8). The network is compared by its outputs, with its parameters
   and with its EMA: a bias that a GroupNorm cancels has a zero gradient up to rounding, which
   Adam turns into full-size steps, so such a parameter drifts apart (3.6e-4 after 16 steps)
   while the function the network computes does not (see helpers.network_outputs).
7. Two processes on this machine joined by `jax.distributed.initialize` (CPU collectives over
   loopback), 4 fake devices each, train the same config: each process loads only its own rows
   of every batch, the loss curve matches the one-process run on 8 devices, and the checkpoint
   the pair wrote restores in one process, which trains on from it.

Every run is a real trainer process (`tests/drills/trainer.py`); restores are checked here.
"""

import socket

import jax
import numpy as np
import pytest
from drills import helpers as dh

NUM_STEPS = 16
OVERRIDES = dh.overrides(
    train__num_steps=NUM_STEPS, train__checkpoint_every=4, train__keep_checkpoints=10
)
# float32 rounding of reductions done in another order, grown over at most 16 Adam steps.
LOSS_RTOL = 1e-5
OUTPUT_RTOL = 1e-5  # of the largest output


def _network_difference(over, got, want) -> float:
    """max |output difference| / max |output|, with the parameters and with the EMA."""
    a, b = dh.network_outputs(over, got), dh.network_outputs(over, want)
    return max(float(np.max(np.abs(a[k] - b[k])) / np.max(np.abs(b[k]))) for k in a)


def _losses(workdir) -> dict:
    return {r["step"]: r["loss"] for r in dh.read_metrics(workdir)}


def _restored_on(workdir, step, devices_counts=(8, 4, 1)):
    """The checkpoint ``step`` restored onto the first n devices, for each n."""
    return {
        n: dh.restore(workdir, OVERRIDES, devices=jax.devices()[:n], step=step)
        for n in devices_counts
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run on 8 devices in one process."""
    workdir = tmp_path_factory.mktemp("topology") / "reference"
    trainer = dh.run(workdir, OVERRIDES, devices=8)
    assert trainer.proc.returncode == 0, trainer.stderr()[-3000:]
    batches = {r["step"]: r["digests"] for r in trainer.batches()}
    assert sorted(batches) == list(range(NUM_STEPS))
    return workdir, batches, _losses(workdir)


def test_restarts_on_8_then_4_then_1_then_8_devices(reference, tmp_path):
    ref_dir, ref_batches, ref_losses = reference
    workdir = tmp_path / "moved"
    env_of = {n: dh.trainer_env(n, cache_writes=True) for n in (8, 4, 1)}
    for devices, until in ((8, 4), (4, 8), (1, 12), (8, 16)):
        start = max(dh.steps_on_disk(workdir), default=0)
        if start:  # the checkpoint restores onto every device count with the same arrays
            on = _restored_on(workdir, start)
            for n in (4, 1):
                assert dh.differing_leaves(on[n].state, on[8].state) == [], (start, n)
                assert {d for x in jax.tree.leaves(on[n].state) for d in x.devices()} == set(
                    jax.devices()[:n]
                )
            assert on[8].extra["data"]["step"] == start  # the data position travels with it
        over = dict(OVERRIDES, **{"train.num_steps": until})
        trainer = dh.Trainer(workdir, over, env=env_of[devices], name=f"on{devices}")
        assert trainer.wait() == 0, trainer.stderr()[-3000:]
        taken = trainer.batches()
        assert [r["step"] for r in taken] == list(range(start, until))
        for r in taken:  # the same rows of the same examples, whatever the device count
            assert r["digests"] == ref_batches[r["step"]], (devices, r["step"])
    losses = _losses(workdir)
    assert sorted(losses) == sorted(ref_losses)
    np.testing.assert_allclose(
        [losses[s] for s in sorted(losses)], [ref_losses[s] for s in sorted(losses)], rtol=LOSS_RTOL
    )
    got, want = dh.restore(workdir, OVERRIDES), dh.restore(ref_dir, OVERRIDES)
    assert got.step == want.step == NUM_STEPS
    difference = _network_difference(OVERRIDES, got.state, want.state)
    print(
        f"\ntopology drill: 8->4->1->8 devices vs 8 only: outputs within {difference:.1e} "
        f"(relative), losses within rtol {LOSS_RTOL}"
    )
    assert difference < OUTPUT_RTOL


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_and_their_checkpoint_restores_in_one(reference, tmp_path):
    ref_dir, ref_batches, ref_losses = reference
    workdir = tmp_path / "pair"
    pair_steps = 8
    over = dict(OVERRIDES, **{"train.num_steps": pair_steps})
    port = _free_port()
    collectives = {}
    if hasattr(jax.config, "jax_cpu_collectives_implementation"):  # jax 0.10: gloo over TCP
        collectives["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
    pair = []
    try:
        for process in (0, 1):
            env = dh.trainer_env(
                4,
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                JAX_NUM_PROCESSES=2,
                JAX_PROCESS_ID=process,
                DRILL_BATCH_LOG=tmp_path / f"batches.{process}",
                **collectives,
            )
            pair.append(dh.Trainer(workdir, over, env=env, name=f"process{process}"))
        codes = [trainer.wait(timeout=600) for trainer in pair]
    finally:
        for trainer in pair:
            trainer.kill()
    assert codes == [0, 0], "\n".join(t.stderr()[-2000:] for t in pair)

    # Each process held only its own half of every batch: rows 0-7 and 8-15 of the global one.
    halves = [trainer.batches() for trainer in pair]
    for process, records in enumerate(halves):
        assert [r["step"] for r in records] == list(range(pair_steps))
        assert all(r["rows"] == [8 * process, 8 * process + 8] for r in records)
    for first, second in zip(*halves, strict=True):
        assert first["digests"] + second["digests"] == ref_batches[first["step"]]
    # Process 0 logged the loss curve; it is the one-process curve.
    losses = _losses(workdir)
    assert sorted(losses) == list(range(1, pair_steps + 1))
    np.testing.assert_allclose(
        [losses[s] for s in sorted(losses)], [ref_losses[s] for s in sorted(losses)], rtol=LOSS_RTOL
    )

    # The pair's checkpoint restores in this one process, on 8, 4 or 1 devices alike ...
    on = _restored_on(workdir, pair_steps)
    for n in (4, 1):
        assert dh.differing_leaves(on[n].state, on[8].state) == []
    assert on[8].extra["data"]["step"] == pair_steps
    want = dh.restore(ref_dir, OVERRIDES, step=pair_steps)
    assert _network_difference(OVERRIDES, on[8].state, want.state) < OUTPUT_RTOL
    # ... and one process on 8 devices trains on from it.
    trainer = dh.run(workdir, OVERRIDES, devices=8, name="single")
    assert trainer.proc.returncode == 0, trainer.stderr()[-3000:]
    assert f"resumed from step {pair_steps}" in trainer.stderr()
    assert [r["step"] for r in trainer.batches()] == list(range(pair_steps, NUM_STEPS))
    final = dh.restore(workdir, OVERRIDES)
    difference = _network_difference(OVERRIDES, final.state, dh.restore(ref_dir, OVERRIDES).state)
    print(f"\ntwo-host drill: 2 processes x 4 devices, then 1 x 8: outputs within {difference:.1e}")
    assert difference < OUTPUT_RTOL
