"""fit / evaluate / measure_latency_stats on a tiny model and synthetic data."""
import copy
import dataclasses
import math
import re

import pytest
import torch
import torch.nn as nn

from progprune.config import TrainConfig
import time

from progprune.training import (Latency, NonFiniteOutputs, TrainingDiverged, calibration_batch, device_label,
                                evaluate, fit, measure_latency_stats, recalibrate_bn)

CPU = torch.device("cpu")
CFG = TrainConfig(epochs=4, lr=0.05, batch_size=64, augment=False)


def _tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(8 * 16, 10))


def _val(model, s):
    return evaluate(model, s, "val", CPU)[0]


def test_fit_learns_above_chance(synthetic_splits):
    s = synthetic_splits
    model = _tiny()
    before = _val(model, s)
    res = fit(model, s, CFG, CPU)
    after = _val(model, s)
    assert after > 0.5  # chance is 0.1 for 10 classes
    assert after > before
    assert res.epochs == 4 and len(res.history) == 4
    assert [h["epoch"] for h in res.history] == [0, 1, 2, 3]
    assert all(set(h) >= {"epoch", "loss", "val_top1", "lr"} for h in res.history)
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert res.seconds > 0


def test_fit_keeps_the_best_validation_epoch(synthetic_splits):
    """Sabotage the model after epoch 1: the later epochs are at chance, the best is earlier."""
    s = synthetic_splits
    model = _tiny()
    last = model[-1]

    def sabotage(epoch):
        if epoch >= 2:
            with torch.no_grad():
                last.weight.zero_()
                last.bias.zero_()
                last.bias[(s.val_y.bincount(minlength=10)).argmin()] = 1.0  # always the rarest class

    res = fit(model, s, TrainConfig(epochs=4, lr=0.05, batch_size=64, augment=False), CPU,
              after_epoch=sabotage)
    vals = [h["val_top1"] for h in res.history]
    assert vals[-1] < max(vals)  # the construction worked: the last epoch is not the best
    assert res.best_epoch == max(range(len(vals)), key=lambda i: (vals[i], -i))
    assert res.best_epoch < 2
    assert res.best_val_top1 == max(vals)
    assert _val(model, s) == pytest.approx(res.best_val_top1)  # the best weights were restored


def test_fit_select_best_false_keeps_last_weights(synthetic_splits):
    s = synthetic_splits
    model = _tiny()

    def sabotage(epoch):
        if epoch == 1:
            with torch.no_grad():
                model[-1].weight.zero_()
                model[-1].bias.zero_()

    res = fit(model, s, TrainConfig(epochs=2, lr=0.05, batch_size=64, augment=False), CPU,
              after_epoch=sabotage, select_best=False)
    assert _val(model, s) == pytest.approx(res.history[-1]["val_top1"])


def _interrupted_at_epoch_1(s, path):
    """Run fit until epoch 1's on_epoch, save its state like a checkpointer would, die."""
    def save_at_1(metrics, state):
        if metrics["epoch"] == 1:
            torch.save(state(), path)
            raise KeyboardInterrupt  # the worker dies here

    with pytest.raises(KeyboardInterrupt):
        fit(_tiny(), s, CFG, CPU, seed=3, on_epoch=save_at_1)
    return torch.load(path, weights_only=True)


def test_fit_resumes_at_the_next_epoch(synthetic_splits, tmp_path):
    s = synthetic_splits
    state = _interrupted_at_epoch_1(s, tmp_path / "state.pt")
    resumed_model = _tiny(seed=123)  # fresh process: other initial weights, all overwritten
    epochs_seen = []
    res = fit(resumed_model, s, CFG, CPU, seed=3, resume=state,
              on_epoch=lambda m, _state: epochs_seen.append(m["epoch"]))
    assert epochs_seen == [2, 3]
    assert len(res.history) == CFG.epochs
    assert [h["epoch"] for h in res.history] == [0, 1, 2, 3]
    assert res.history[:2] == state["history"]
    vals = [h["val_top1"] for h in res.history]
    assert res.best_val_top1 == max(vals)
    assert _val(resumed_model, s) == pytest.approx(res.best_val_top1)


def test_fit_resume_matches_an_uninterrupted_run(synthetic_splits, tmp_path):
    s = synthetic_splits
    full_model = _tiny()
    full = fit(full_model, s, CFG, CPU, seed=3)
    resumed_model = _tiny(seed=123)
    res = fit(resumed_model, s, CFG, CPU, seed=3, resume=_interrupted_at_epoch_1(s, tmp_path / "state.pt"))
    assert len(res.history) == len(full.history)
    for a, b in zip(res.history, full.history):
        assert a["lr"] == pytest.approx(b["lr"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["val_top1"] == pytest.approx(b["val_top1"], abs=1e-6)
    assert res.best_epoch == full.best_epoch
    for (k, a), b in zip(resumed_model.state_dict().items(), full_model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), k


def test_fit_zero_epochs_changes_nothing(synthetic_splits):
    model = _tiny()
    before = copy.deepcopy(model.state_dict())
    res = fit(model, synthetic_splits, TrainConfig(epochs=0), CPU)
    assert res.best_epoch == -1 and res.best_val_top1 is None and res.history == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_evaluate_returns_fractions(synthetic_splits):
    s = synthetic_splits
    model = _tiny()
    fit(model, s, TrainConfig(epochs=1, lr=0.05, batch_size=64, augment=False), CPU)
    few = dataclasses.replace(s.loaded, train_x=s.train_x[:7], train_y=s.train_y[:7])
    for splits, split in ((s, "val"), (s, "test"), (few, "train")):
        top1, top5 = evaluate(model, splits, split, CPU)
        assert 0.0 <= top1 <= top5 <= 1.0
    # a model that always says class 0: top-1 is exactly the share of class 0
    const = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    with torch.no_grad():
        const[1].weight.zero_()
        const[1].bias.copy_(torch.arange(10, 0, -1).float())  # ranks classes 0,1,2,3,4 first
    top1, top5 = evaluate(const, s, "val", CPU)
    assert top1 == pytest.approx((s.val_y == 0).float().mean().item())
    assert top5 == pytest.approx((s.val_y < 5).float().mean().item())


def test_every_evaluation_takes_the_eval_batch_size():
    """Issue 23 #32: evaluation took batches of up to 512 images whatever the worker (308 MB
    per float copy at 224 px); now dataset.eval_batch_size, for evaluate and the
    validation inside fit alike. The default is the schema's alone."""
    from progprune.config import DatasetConfig
    from progprune.data import load_dataset

    assert DatasetConfig().eval_batch_size == 128
    s = load_dataset(DatasetConfig(name="synthetic", num_classes=4, synthetic_samples=400, eval_batch_size=30))
    model, seen = _tiny(), []
    model.register_forward_hook(lambda m, x, out: None if m.training else seen.append(len(x[0])))
    evaluate(model, s, "val", CPU)
    assert seen == [30, 30, 30, 10]  # 100 validation images
    seen.clear()
    fit(model, s, TrainConfig(epochs=1, batch_size=64, augment=False), CPU)
    assert seen == [30, 30, 30, 10]


def test_measure_latency_positive():
    (one,) = measure_latency_stats(_tiny(), (3, 32, 32), CPU, batch_size=2, warmup=1, repeats=3)
    assert isinstance(one.median_ms, float) and one.median_ms > 0
    both = measure_latency_stats([_tiny(), _tiny(1)], (3, 32, 32), CPU, warmup=1, repeats=3)
    assert len(both) == 2 and all(isinstance(v.median_ms, float) and v.median_ms > 0 for v in both)


def test_device_label_is_the_results_tables_spelling():
    """One spelling for the device a figure was measured on: the row's `device` column
    ("cpu", "cuda:<GPU name>"), which the latency figures carry too."""
    assert device_label(CPU) == device_label("cpu") == "cpu"
    if torch.cuda.is_available():
        assert device_label("cuda") == f"cuda:{torch.cuda.get_device_name(0)}"


def test_calibration_batch_is_fixed(synthetic_splits):
    x1, y1 = calibration_batch(synthetic_splits, CPU, n=16, seed=1)
    x2, y2 = calibration_batch(synthetic_splits, CPU, n=16, seed=1)
    assert x1.shape == (16, 3, 32, 32) and x1.dtype == torch.float32 and y1.shape == (16,)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)


# ---- a diverged run is a failure, never "ok" ------------------------------------------
def _explode(model):
    """Exploding gradients (what a too-high lr or a bad regularizer does), through the real
    after_backward hook: settings validation refuses an infinite lr on its own."""
    for p in model.parameters():
        p.grad.mul_(1e30)


@pytest.mark.parametrize("stage", ["base training", "sparse learning", "fine-tune"])
def test_exploding_training_raises_diverged_with_the_stage(synthetic_splits, stage):
    with pytest.raises(TrainingDiverged) as e:
        fit(_tiny(), synthetic_splits, TrainConfig(epochs=2, lr=0.05, batch_size=64, augment=False), CPU,
            after_backward=_explode, stage=stage)
    assert re.match(rf"{stage} diverged: loss (nan|inf) at epoch 1 \(lr 0.05\); lower the learning rate$",
                    str(e.value)), str(e.value)
    assert e.value.stage == stage and e.value.epoch == 1 and not math.isfinite(e.value.loss)
    assert e.value.exit_code == 1  # a failed run, not bad input


def test_weights_turning_nan_on_the_last_step_are_caught(synthetic_splits):
    """Every loss of the epoch is finite, but its last step leaves nan weights behind."""
    s = synthetic_splits
    n_batches = len(s.train_x) // 64
    calls = []

    def poison_last_step(m):
        calls.append(1)
        if len(calls) == n_batches:
            m[-1].weight.grad.fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match=r"fine-tune diverged: non-finite weights \(5.weight\) at epoch 1"):
        fit(_tiny(), s, TrainConfig(epochs=1, lr=0.05, batch_size=64, augment=False), CPU,
            after_backward=poison_last_step, stage="fine-tune")
    assert len(calls) == n_batches  # it was the last step, so no loss saw the nan


# ---- evaluation in fp32 ---------------------------------------------------------------
def test_evaluate_runs_fp32_even_inside_autocast(synthetic_splits):
    s = synthetic_splits
    model = _tiny()
    seen = []
    model[-1].register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    expected = evaluate(model, s, "val", CPU)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = evaluate(model, s, "val", CPU)
    assert set(seen) == {torch.float32} and got == expected


# ---- BatchNorm re-calibration ---------------------------------------------------------
def test_recalibrate_bn_restores_accuracy_lost_to_stale_statistics(synthetic_splits):
    s = synthetic_splits
    model = _tiny()
    fit(model, s, TrainConfig(epochs=3, lr=0.05, batch_size=64, augment=False), CPU)
    good = _val(model, s)
    params = {k: v.clone() for k, v in model.named_parameters()}
    bn = model[1]
    with torch.no_grad():  # what pruning leaves: statistics of another network's activations
        bn.running_mean.add_(3.0)
        bn.running_var.mul_(20.0)
    stale = _val(model, s)
    assert stale < good - 0.2  # the construction works: stale statistics hurt
    seen = recalibrate_bn(model, s, CPU, batches=4, batch_size=64, seed=0)
    assert seen == 256 and not model.training and bn.momentum == 0.1
    assert _val(model, s) >= good - 0.05
    assert all(torch.equal(v, params[k]) for k, v in model.named_parameters())  # weights untouched


def test_recalibrate_bn_is_the_exact_mean_of_the_seeded_batches(synthetic_splits):
    s = synthetic_splits
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    recalibrate_bn(model, s, CPU, batches=3, batch_size=32, seed=5)
    idx = torch.randperm(len(s.train_x), generator=torch.Generator().manual_seed(5))[:96]
    mean = torch.tensor(s.mean).view(1, -1, 1, 1) * 255
    std = torch.tensor(s.std).view(1, -1, 1, 1) * 255
    x = (s.train_x[idx].float() - mean) / std
    assert torch.allclose(model[0].running_mean, x.mean(dim=(0, 2, 3)), atol=1e-5)
    assert int(model[0].num_batches_tracked) == 3
    again = nn.Sequential(nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    recalibrate_bn(again, s, CPU, batches=3, batch_size=32, seed=5)
    assert torch.equal(again[0].running_var, model[0].running_var)


def test_recalibrate_bn_without_batchnorm_is_a_no_op(synthetic_splits):
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    assert recalibrate_bn(model, synthetic_splits, CPU) == 0


# ---- latency with its spread ----------------------------------------------------------
class _Sleep(nn.Module):
    """A forward pass that takes a known time: `pattern` ms, cycled."""

    def __init__(self, pattern, log=None, tag=None):
        super().__init__()
        self.pattern, self.i, self.log, self.tag = pattern, 0, log, tag

    def forward(self, x):
        time.sleep(self.pattern[self.i % len(self.pattern)] / 1000)
        self.i += 1
        if self.log is not None:
            self.log.append(self.tag)
        return x


def test_latency_stats_report_spread_threads_and_device():
    # the fastest of each burst of 3 counts: a model whose whole bursts alternate between 5
    # and 60 ms is spread out; one slow forward inside a burst is not (an interruption)
    steady, jumpy, hiccup = _Sleep([30]), _Sleep([5, 5, 5, 60, 60, 60]), _Sleep([20, 20, 80])
    a, b, c = measure_latency_stats([steady, jumpy, hiccup], (3, 8, 8), CPU, warmup=0, repeats=12)
    for st in (a, b, c):
        assert isinstance(st, Latency) and st.runs == 12
        assert st.threads == torch.get_num_threads() and st.device == "cpu"
    assert a.median_ms >= 30 and not a.noisy and a.iqr_ms < 0.25 * a.median_ms
    assert b.noisy and b.iqr_ms > 40  # half the rounds at 5 ms, half at 60 ms
    assert not c.noisy and 20 <= c.median_ms < 60  # the 80 ms forward is left out every burst


def test_latency_is_the_one_timer_interleaved():
    """The latency columns are timed as the stop rule times (progprune.timing.Timer): each
    model the fastest of a burst of 3, the order reversed every other round."""
    log = []
    models = [_Sleep([0], log, "a"), _Sleep([0], log, "b")]
    measure_latency_stats(models, (3, 8, 8), CPU, warmup=2, repeats=3)
    assert "".join(log) == "aabb" + "aaabbb" + "bbbaaa" + "aaabbb"  # warm-up each, then the rounds


def test_too_few_runs_are_flagged_noisy():
    (st,) = measure_latency_stats(_tiny(), (3, 32, 32), CPU, warmup=1, repeats=3)
    assert st.noisy and st.runs == 3 and st.iqr_ms >= 0


def test_evaluate_refuses_non_finite_outputs(synthetic_splits):
    """Logits that are nan everywhere gave a finite top-1 (argmax of nans is index 0): a
    row 'ok' with an accuracy that means nothing. Now evaluation fails the run (a
    CombinationFailed: the pipeline's row is 'failed' with this line)."""
    model = _tiny()
    with torch.no_grad():
        model[-1].bias.fill_(float("nan"))
    with pytest.raises(NonFiniteOutputs) as e:
        evaluate(model, synthetic_splits, "test", CPU)
    assert re.match(r"the model's outputs are not finite \(nan or inf\) for \d+ of the first \d+ test images",
                    str(e.value))
    assert e.value.exit_code == 1


def test_outputs_nan_before_any_update_are_not_blamed_on_the_learning_rate(synthetic_splits):
    """Base training of a model whose outputs are nan from the start said 'diverged ...
    lower the learning rate'."""
    model = _tiny()
    with torch.no_grad():
        model[-1].bias.fill_(float("nan"))
    with pytest.raises(NonFiniteOutputs) as e:
        fit(model, synthetic_splits, CFG, CPU, stage="base training")
    assert str(e.value).startswith("base training: before any update, the model's outputs are not finite "
                                   "(nan or inf) for 64 of the first 64 train images: no learning rate is to blame")


def test_latency_speedup_is_the_median_of_paired_rounds():
    """A row's latency_speedup is estimated as the stop rule estimates (the median of the
    rounds' paired ratios), not as the ratio of the two medians: a round where only one side
    was slowed (here the candidate's third) is one round's outlier, not the answer."""
    burst = lambda per_round: [ms for ms in per_round for _ in range(3)]  # noqa: E731
    base = _Sleep(burst([20, 20, 20, 60, 60]))
    cand = _Sleep(burst([10, 10, 30, 30, 30]))
    a, b = measure_latency_stats([base, cand], (3, 8, 8), CPU, warmup=0, repeats=5)
    assert a.speedup == 1.0
    assert b.median_ms >= 30 and a.median_ms < 30  # the medians' ratio would be ~0.67x
    assert 1.8 < b.speedup <= 2.0  # rounds 2, 2, 0.67, 2, 2
