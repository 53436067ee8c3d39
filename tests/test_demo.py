import itertools

from offsite_kernels.demo import permutation_task, run_demo


def test_permutation_task_is_deterministic_and_follows_one_permutation():
    a, b = permutation_task(8, 12, seed=3), permutation_task(8, 12, seed=3)
    assert (a == b).all()
    nxt = {}
    for row in a.tolist():
        for x, y in itertools.pairwise(row):
            assert nxt.setdefault(x, y) == y


def test_demo_loop_learns_through_the_emulator_and_plug_in_keeps_it(capsys):
    results = run_demo(steps=40, seed=0)
    assert results["emulator, fine-tuned"] < results["emulator, before"] - 0.5
    assert results["full model, plug-in"] < results["full model, before"] - 0.5
    assert "held-out loss" in capsys.readouterr().out
