"""benchmarks/trl_speed.py lays out prefopt's training file so that prefopt's step k reads the same pairs
as TRL's sequential step k. If the engine's ordering moves, the loss comparison silently becomes "n/a";
this test catches that here instead of an hour into a benchmark."""

from helpers import load_benchmark

from prefopt.engine import planned_pairs


def test_file_order_replays_the_canonical_order_step_by_step():
    n, batch, seed = 44, 4, 0
    order = load_benchmark("trl_speed").prefopt_file_order(n, batch, seed)
    assert order is not None and sorted(order) == list(range(n))
    # The script writes canonical pair j at file position order[j]; invert that and replay the engine.
    canonical_at = {position: j for j, position in enumerate(order)}
    for step in range(n // batch):
        read = [canonical_at[i] for i in planned_pairs(seed, n, batch, step)]
        assert read == list(range(step * batch, (step + 1) * batch))
