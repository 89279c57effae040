"""NaN gradients and weights, injected into real runs: skipped steps leave weights and optimizer
state untouched, a limit stops the run, and nothing is saved from NaN weights."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
KEEP_ALL = ["callbacks.checkpoint.every_n_train_steps=1", "callbacks.checkpoint.save_top_k=-1"]


def ckpt(tmp_path: Path, step: int) -> dict:
    path = tmp_path / "runs" / "tiny" / "checkpoints" / f"step_{step:07d}.ckpt"
    return torch.load(path, weights_only=True)


def same_tensors(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same_tensors(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_nan_gradients_skip_the_step_and_are_counted(train, tmp_path: Path) -> None:
    proc = train(*KEEP_ALL, "+callbacks.inject._target_=inject.NaNGradientsAt",
                 "+callbacks.inject.steps=[1,2]", "logger=none")  # fmt: skip
    assert "Skipped step 1: non-finite gradients (1/10)" in proc.stdout
    assert "Skipped step 2: non-finite gradients (2/10)" in proc.stdout
    # Steps 1 and 2 moved nothing: weights and optimizer state after them equal those before.
    before, after = ckpt(tmp_path, 1), ckpt(tmp_path, 3)
    assert same_tensors(before["state_dict"], after["state_dict"])
    # The LR schedule goes on (it counts steps); the optimizer's moments and step count do not.
    states = [[o["state"] for o in c["optimizer_states"]] for c in (before, after)]
    assert same_tensors(*states)
    assert not same_tensors(ckpt(tmp_path, 4)["state_dict"], after["state_dict"])  # step 3 did
    final = ckpt(tmp_path, 4)
    assert all(torch.isfinite(t).all() for t in final["state_dict"].values())
    guard = next(v for k, v in final["callbacks"].items() if "NonFiniteGuard" in k)
    assert guard == {"skipped": 2}
    assert (tmp_path / "runs" / "tiny" / "export" / "model_index.json").is_file()


def test_too_many_nan_steps_stop_the_run_with_the_setting_named(train, tmp_path: Path) -> None:
    proc = train(*KEEP_ALL, "+callbacks.inject._target_=inject.NaNGradientsAt",
                 "+callbacks.inject.steps=[1,2,3]", "callbacks.nonfinite.max_skipped=2",
                 "logger=none", expect=1)  # fmt: skip
    assert "Training stopped: 2 steps with non-finite gradients" in proc.stderr
    assert "callbacks.nonfinite.max_skipped=2" in proc.stderr
    run = tmp_path / "runs" / "tiny"
    assert not (run / "export").exists()
    for path in (run / "checkpoints").glob("*.ckpt"):
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values()), path


def test_no_checkpoint_or_export_from_nan_weights(train, tmp_path: Path) -> None:
    proc = train(*KEEP_ALL, "+callbacks.inject._target_=inject.NaNWeightsAt",
                 "+callbacks.inject.step=2", "logger=none", expect=1)  # fmt: skip
    assert "the weights hold NaN/Inf at step 2: no checkpoint is written" in proc.stderr
    names = sorted(p.name for p in (tmp_path / "runs" / "tiny" / "checkpoints").glob("*.ckpt"))
    assert names == ["last.ckpt", "step_0000001.ckpt"]  # nothing at or after step 2
    last = torch.load(tmp_path / "runs" / "tiny" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 1
    assert not math.isnan(float(next(iter(last["state_dict"].values())).view(-1)[0]))
    assert not (tmp_path / "runs" / "tiny" / "export").exists()


@pytest.mark.parametrize(
    ("bad", "finite"),
    [(None, True), (math.nan, False), (math.inf, False), (-math.inf, False), (3e38, True)],
)
def test_the_fused_gradient_check_finds_any_non_finite_value(bad, finite) -> None:
    """One reduction over all gradients: a single NaN or Inf anywhere is found, and large
    finite values (whose squares would overflow a 2-norm) are not taken for Inf."""
    from train.callbacks.guards import grads_finite

    grads = [torch.ones(4, 3), torch.zeros(7), torch.full((2, 2), 0.5, dtype=torch.bfloat16)]
    if bad is not None:
        grads[1][5] = bad
    assert grads_finite(grads) is finite
    assert grads_finite([]) is True
