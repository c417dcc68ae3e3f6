"""Training engine: schedule, checkpoint files, trainer behaviour and the command-line entry point.

Tiny model (``conf/tiny_*.yaml``: fbank upstream, random tiny CLIP) on a generated corpus of 8 short tones
(``make_corpus`` / ``tiny_config`` from conftest.py).
"""
from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "speechclip_plus" / "conf"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, make_train_dev):
    return make_train_dev(tmp_path_factory.mktemp("corpus"))


# ---------------------------------------------------------------------------------------------- scheduler
def test_schedule_is_step_exact_with_the_reference():
    """linear_warmup_decay of the SpeechCLIP(+) code: factor (s + 1) / W while s < W, then
    1 - (1 - f / lr) * (s + 1 - W) / (S - W); optimiser step s (from 0) runs at lr times that factor."""
    from speechclip_plus.train.scheduler import build_scheduler

    lr, f, W, S = 1e-3, 1e-5, 4, 12
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=lr)
    sched = build_scheduler(opt, warmup_steps=W, max_steps=S, final_lr=f)
    lrs = []
    for _ in range(S + 3):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    reference = [lr * ((s + 1) / W if s < W else 1 - (1 - f / lr) * (s + 1 - W) / (S - W)) for s in range(S)]
    assert lrs[:S] == pytest.approx(reference, rel=1e-12)
    assert lrs[0] == pytest.approx(lr / 4)  # warm-up starts near 0, not at 0
    assert lrs[W - 1] == pytest.approx(lr)  # the peak is the last warm-up step
    assert lrs[W] == pytest.approx(lr * (1 - 0.99 / 8))  # decay already at the first step after warm-up
    assert lrs[S - 1] == pytest.approx(f)  # the last optimiser step runs at final_lr
    assert lrs[S:] == pytest.approx([f] * 3)  # held there if training goes on


# ---------------------------------------------------------------------------------------------- checkpoints
def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    import random

    from speechclip_plus.train.checkpoint import rng_state, set_rng_state

    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    state = rng_state()
    torch.save({"rng": state}, tmp_path / "r.pt")
    expected = (torch.rand(3), np.random.rand(3), np.random.standard_normal(), random.random())
    set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    got = (torch.rand(3), np.random.rand(3), np.random.standard_normal(), random.random())
    assert torch.equal(expected[0], got[0])
    assert np.array_equal(expected[1], got[1])
    assert expected[2:] == got[2:]


def test_checkpoint_dir_rotates_and_links(tmp_path):
    from speechclip_plus.train.checkpoint import CheckpointDir

    ck = CheckpointDir(str(tmp_path / "ck"), keep=2)
    for step in (1, 2, 3):
        ck.save({"step": step}, step, is_best=step == 2)
    assert ck.steps() == [2, 3]
    assert torch.load(ck.last, weights_only=True)["step"] == 3
    ck.save({"step": 4}, 4)
    assert ck.steps() == [3, 4]
    assert torch.load(ck.best, weights_only=True)["step"] == 2  # survives rotation of step-2.pt
    assert not [f for f in os.listdir(ck.path) if "tmp" in f]
    for s in (1, 2, 3):
        ck.append_metrics({"step": s, "x": s * 1.5})
    ck.trim_metrics(2)
    assert [r["step"] for r in ck.read_metrics()] == [1, 2]


def test_frozen_weights_left_out_and_checked_on_load():
    from speechclip_plus.train.checkpoint import frozen_parameter_names, load_model_state, model_state

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2), torch.nn.Linear(2, 1))
    for p in net[0].parameters():
        p.requires_grad_(False)
    excluded = frozen_parameter_names(net)
    assert excluded == ["0.weight", "0.bias"]
    state = model_state(net, excluded)
    assert "0.weight" not in state and "1.running_mean" in state
    other = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2), torch.nn.Linear(2, 1))
    load_model_state(other, state, excluded)
    assert torch.equal(other[2].weight, net[2].weight)
    with pytest.raises(RuntimeError, match="missing"):
        load_model_state(other, {k: v for k, v in state.items() if k != "2.bias"}, excluded)


def test_valid_batches_split_equally_and_cover_everything():
    from speechclip_plus.train.trainer import valid_batches

    order = list(range(7))
    assert valid_batches(order, 3, 1, 0) == [[0, 1, 2], [3, 4, 5], [6]]
    r0, r1 = valid_batches(order, 3, 2, 0), valid_batches(order, 3, 2, 1)
    assert [len(b) for b in r0] == [len(b) for b in r1] == [2, 2]
    assert sorted({i for b in r0 + r1 for i in b}) == order


# ---------------------------------------------------------------------------------------------- trainer
def _trainer(cfg, exp, **kw):
    from speechclip_plus.train.trainer import Trainer

    return Trainer(cfg, str(exp), progress=False, console=False, **kw)


def test_trainer_writes_checkpoints_metrics_and_logs(corpus, tmp_path, tiny_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config("cplus", max_steps=4, valid_every=2, batch_size=4, keep_checkpoints=1, warmup_steps=1,
                      log_every=1, **corpus)
    exp = tmp_path / "exp"
    tr = _trainer(cfg, exp)
    before = {n: p.detach().clone() for n, p in tr.raw_model.named_parameters()}
    out = tr.fit()
    tr.close()
    assert out["step"] == 4 and out["epoch"] == 3 // len(tr.sampler)  # the epoch of step 4 (0-based)
    changed = [n for n, p in tr.raw_model.named_parameters() if not torch.equal(before[n], p)]
    trainable = {n for n, p in tr.raw_model.named_parameters() if p.requires_grad}
    assert changed and set(changed) <= trainable

    ck = exp / "checkpoints"
    assert sorted(os.listdir(ck)) == ["best.pt", "last.pt", "metrics.jsonl", "step-4.pt"]
    state = torch.load(ck / "last.pt", weights_only=True)
    assert state["step"] == 4 and state["config"]["train"]["train_data"] == corpus["train_data"]
    params = dict(tr.raw_model.named_parameters())
    assert all(torch.equal(state["model"][n], p.detach()) for n, p in params.items() if p.requires_grad)
    records = [json.loads(x) for x in (ck / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    for key in ("loss", "quantity", "cascaded/recall_mean_10", "cascaded/speech_to_image_r1",
                "cascaded/image_to_speech_r5"):
        assert all(math.isfinite(r[key]) for r in records), key
    best = max(records, key=lambda r: (r["cascaded/recall_mean_10"], -r["step"]))
    assert torch.load(ck / "best.pt", weights_only=True)["step"] == best["step"]
    assert out["best"]["value"] == best["cascaded/recall_mean_10"]

    log = (exp / "train.log").read_text()
    for needle in ("git_sha", "torch =", "open_clip_torch =", "s3prl =", "host =", "world size 1",
                   "effective global batch = 4", "validation at step 4"):
        assert needle in log, needle
    ev = EventAccumulator(str(exp / "tensorboard"))
    ev.Reload()
    tags = set(ev.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/logit_scale", "train/keyword_count",
                "train/quantity", "valid/cascaded/recall_mean_10", "valid/loss"):
        assert tag in tags, tag
    assert [e.step for e in ev.Scalars("train/loss")] == [1, 2, 3, 4]
    # a second run into the same exp dir must not overwrite it silently
    with pytest.raises(RuntimeError, match="--resume"):
        _trainer(cfg, exp)


def test_gradient_accumulation_averages_micro_batch_gradients(corpus, tmp_path, tiny_config):
    """accum_grad=2: the step's gradient is the mean of the two micro-batches' gradients."""
    from speechclip_plus.data import collate

    train = {k: v for k, v in corpus.items() if k != "valid_data"}
    cfg = tiny_config("p", batch_size=4, accum_grad=2, max_steps=1, valid_every=1, warmup_steps=0,
                      grad_clip=0.0, crop=False, **train)
    tr = _trainer(cfg, tmp_path / "exp")
    model = tr.raw_model
    seen = []
    tr.optimizer.step = lambda *a, **k: seen.append({n: p.grad.clone() for n, p in model.named_parameters()
                                                      if p.grad is not None})  # record, do not update
    tr.fit()
    batches = [b for e in range(2) for b in tr.sampler.batches(e)][:2]  # the two micro-batches of step 1
    assert len(seen) == 1 and tr.step == 1
    expected = {}
    for idx in batches:
        model.zero_grad()
        batch = collate([tr.train_set[i] for i in idx])
        model(**tr._inputs(batch))["loss"].backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                expected[n] = expected.get(n, 0) + p.grad / 2
    assert set(expected) == set(seen[0])
    for n, g in expected.items():
        torch.testing.assert_close(seen[0][n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_non_finite_loss_skips_steps_then_stops(corpus, tmp_path, tiny_config):
    from speechclip_plus.train.trainer import TrainingDiverged

    cfg = tiny_config("p", max_steps=6, valid_every=2, batch_size=4, max_bad_steps=3, **corpus)
    exp = tmp_path / "exp"
    tr = _trainer(cfg, exp)
    real_forward = tr.model.forward
    calls = {"n": 0}

    def forward(*args, **kw):
        out = real_forward(*args, **kw)
        if tr.model.training:
            calls["n"] += 1
            if calls["n"] == 2 or calls["n"] >= 4:  # one isolated bad batch, then only bad ones
                out["loss"] = out["loss"] * float("nan")
        return out

    tr.model.forward = forward
    with pytest.raises(TrainingDiverged, match="3 consecutive .*last good checkpoint: .*last.pt"):
        tr.fit()
    # batches 1 and 3 were good -> steps 1 and 2; step 2 was checkpointed; the NaN steps changed nothing
    assert tr.step == 2 and tr.total_bad_steps == 4
    state = torch.load(exp / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 2
    for name, value in state["model"].items():
        assert torch.isfinite(value.float()).all(), name
    assert all(torch.isfinite(p).all() for p in tr.raw_model.parameters())


def test_fp16_overflow_skips_the_step_without_moving_the_schedule(corpus, tmp_path, tiny_config):
    """A GPU's fp16 path, driven on the CPU with a real GradScaler: gradients that overflow (finite loss) make
    the scaler skip the update; that step must not count, move the LR schedule or reset the bad-step count."""
    from speechclip_plus.config import ConfigError
    from speechclip_plus.train.trainer import TrainingDiverged

    train = {k: v for k, v in corpus.items() if not k.startswith("valid")}
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        _trainer(tiny_config("p", precision="fp16", **train), tmp_path / "refused")
    cfg = tiny_config("p", max_steps=6, valid_every=100, batch_size=4, max_bad_steps=3, warmup_steps=2, **train)
    tr = _trainer(cfg, tmp_path / "exp")
    tr.fp16, tr.scaler = True, torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, enabled=True)
    overflow = {"on": False}
    tr.raw_model.parallel.proj.weight.register_hook(lambda g: g * float("inf") if overflow["on"] else g)
    real_step = tr._optimizer_step
    snapshot = {}

    def step(window):
        ok, norm = real_step(window)
        if tr.step == 0 and ok:  # the first step is good; from then on every step overflows
            overflow["on"] = True
            snapshot.update({n: p.detach().clone() for n, p in tr.raw_model.named_parameters()})
            snapshot["lr"] = tr.optimizer.param_groups[0]["lr"]
        return ok, norm

    tr._optimizer_step = step
    with pytest.raises(TrainingDiverged, match="3 consecutive"):
        tr.fit()
    assert tr.step == 1 and tr.total_bad_steps == 3 and tr.scheduler.last_epoch == 1
    assert tr.optimizer.param_groups[0]["lr"] == snapshot["lr"]
    assert tr.scaler.get_scale() == 2.0 ** 10 / 8  # halved at each skipped step
    assert all(torch.equal(p, snapshot[n]) for n, p in tr.raw_model.named_parameters())


@pytest.mark.parametrize("accum_grad,expected", [(1, [2, 4, 5]), (3, [1, 2, 3])])
def test_validation_once_per_epoch(corpus, tmp_path, accum_grad, expected, tiny_config):
    """valid_every: epoch (the reference's cadence): after the step that finishes an epoch's batches, or, when an
    epoch ends inside an accumulation window, after that window's step; and at max_steps."""
    cfg = tiny_config("p", batch_size=4, accum_grad=accum_grad, max_steps=expected[-1], valid_every="epoch",
                      **corpus)
    assert cfg["train"]["bucketing"] is False
    tr = _trainer(cfg, tmp_path / "exp")
    assert len(tr.sampler) == 2 and tr.sampler.bucketing is False  # 8 utterances, batches of 4
    tr.fit()
    records = [json.loads(x) for x in (tmp_path / "exp" / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == expected
    assert "validated at the end of every epoch" in (tmp_path / "exp" / "train.log").read_text()
    assert _trainer(tiny_config("p", bucketing=True, **corpus), tmp_path / "b").sampler.bucketing is True


@pytest.mark.parametrize("branch", [None, "cascaded"])
def test_checkpoints_are_selected_on_the_configured_branch(corpus, tmp_path, branch, tiny_config):
    cfg = tiny_config("hplus", max_steps=4, valid_every=1, batch_size=4, model={"retrieval_branch": branch},
                      **corpus)
    tr = _trainer(cfg, tmp_path / "exp")
    key = f"{branch or 'parallel'}/recall_mean_10"
    assert tr.best["metric"] == key
    tr.fit()
    records = [json.loads(x) for x in (tmp_path / "exp" / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    best = max(records, key=lambda r: (r[key], -r["step"]))
    assert torch.load(tmp_path / "exp" / "checkpoints" / "best.pt", weights_only=True)["step"] == best["step"]


def test_per_term_gradient_norms_at_the_shared_encoder(corpus, tmp_path, tiny_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from speechclip_plus.data import collate

    cfg = tiny_config("hplus", max_steps=2, valid_every=100, batch_size=4, log_every=1, log_grad_norms=True,
                      **{k: v for k, v in corpus.items() if not k.startswith("valid")})
    tr = _trainer(cfg, tmp_path / "exp")
    tr.fit()
    tr.close()
    ev = EventAccumulator(str(tmp_path / "exp" / "tensorboard"))
    ev.Reload()
    for tag in ("train/grad_norm/cl_parallel", "train/grad_norm/cl_cascaded", "train/grad_norm/quantity",
                "train/grad_cos/cl_parallel~cl_cascaded"):
        assert [e.step for e in ev.Scalars(tag)] == [1, 2], tag
    assert all(-1 <= e.value <= 1 for e in ev.Scalars("train/grad_cos/cl_parallel~cl_cascaded"))
    # the gradient of w_p * L_p scales with w_p; the other terms' do not; the cosine is unchanged
    model = tr.raw_model
    batch = collate([tr.train_set[i] for i in range(4)])
    stats = []
    for w in (1.0, 3.0):
        model.cfg["parallel"]["weight"] = w
        torch.manual_seed(0)
        stats.append(tr._term_gradients(model(**tr._inputs(batch))["weighted"]))
    a, b = stats
    assert float(b["grad_norm/cl_parallel"]) == pytest.approx(3 * float(a["grad_norm/cl_parallel"]), rel=1e-4)
    assert float(b["grad_norm/cl_cascaded"]) == pytest.approx(float(a["grad_norm/cl_cascaded"]), rel=1e-4)
    assert float(b["grad_cos/cl_parallel~cl_cascaded"]) == pytest.approx(
        float(a["grad_cos/cl_parallel~cl_cascaded"]), abs=1e-4)


def test_a_loss_selects_the_lowest_validation_and_a_recall_the_highest(corpus, tmp_path, tiny_config):
    """train.select_metric: a loss is "min" (best = the lowest validation loss), a recall "max"; a metric without
    a branch prefix is the retrieval branch's; an unknown one is an error listing the available ones."""
    from speechclip_plus.config import ConfigError

    rows = {}
    for metric in ("loss", "speech_to_image_r1"):
        cfg = tiny_config("p", max_steps=4, valid_every=1, batch_size=4, select_metric=metric, lr=3e-3, **corpus)
        tr = _trainer(cfg, tmp_path / metric)
        tr.fit()
        tr.close()
        lines = (tmp_path / metric / "checkpoints" / "metrics.jsonl").read_text().splitlines()
        rows[metric] = [json.loads(x) for x in lines]
        key = "loss" if metric == "loss" else "parallel/speech_to_image_r1"
        values = [r[key] for r in rows[metric]]
        pick = min if metric == "loss" else max
        best_step = rows[metric][values.index(pick(values))]["step"]  # the first of equal values
        assert [r["step"] for r in rows[metric] if r["best"]][-1] == best_step, (metric, values)
        best = torch.load(tmp_path / metric / "checkpoints" / "best.pt", weights_only=True)
        assert best["step"] == best_step and tr.best["mode"] == ("min" if metric == "loss" else "max")
    assert len({r["loss"] for r in rows["loss"]}) > 1  # the losses moved: "min" and "max" pick different steps
    cfg = tiny_config("p", max_steps=1, valid_every=1, batch_size=4, select_metric="recall_mean_7", **corpus)
    with pytest.raises(ConfigError, match=r"'parallel/recall_mean_7' is not a validation metric; available: .*loss"):
        _trainer(cfg, tmp_path / "bad").fit()


def test_adamw_is_the_decoupled_optimiser_and_resumes_as_such(corpus, tmp_path, tiny_config):
    """train.optimizer: adamw builds torch's AdamW (decoupled weight decay) with the configured decay; the same
    step from the same state equals torch.optim.AdamW's own; a resumed run restores its state."""
    adam = _trainer(tiny_config("p", **corpus), tmp_path / "adam")
    assert type(adam.optimizer) is torch.optim.Adam  # the default (the reference's)
    adam.close()
    cfg = tiny_config("p", max_steps=2, valid_every=2, batch_size=4, optimizer="adamw", weight_decay=0.5, lr=1e-2,
                      warmup_steps=0, **corpus)
    tr = _trainer(cfg, tmp_path / "exp")
    assert type(tr.optimizer) is torch.optim.AdamW
    assert [g["weight_decay"] for g in tr.optimizer.param_groups] == [0.5]
    params = [p for g in tr.optimizer.param_groups for p in g["params"]]
    start = [p.detach().clone() for p in params]
    grads = [torch.randn_like(p) for p in params]
    reference = [torch.nn.Parameter(p.clone()) for p in start]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    for p, g in zip(reference, grads):
        p.grad = g.clone()
    tr.optimizer.step()
    torch.optim.AdamW(reference, lr=tr.optimizer.param_groups[0]["lr"], weight_decay=0.5).step()
    for p, r in zip(params, reference):
        torch.testing.assert_close(p.detach(), r.detach())
    with torch.no_grad():
        for p, s0 in zip(params, start):
            p.copy_(s0)
    tr.optimizer.state.clear()
    tr.fit()
    tr.close()
    again = _trainer(dict(cfg, train=dict(cfg["train"], max_steps=3)), tmp_path / "exp", resume=True)
    assert type(again.optimizer) is torch.optim.AdamW and again.step == 2
    assert all(int(st["step"]) == 2 for st in again.optimizer.state.values())
    again.close()


def test_close_releases_the_log_files_and_the_event_writer(corpus, tmp_path, tiny_config):
    """Trainer.close flushes and closes train.log (and the per-rank logs) and TensorBoard: after it the training
    logger holds no handler and every file it wrote is complete."""
    import logging

    from speechclip_plus.train.logging import LOGGER_NAME

    cfg = tiny_config("p", max_steps=1, valid_every=1, batch_size=4, **corpus)
    tr = _trainer(cfg, tmp_path / "exp")
    logger = logging.getLogger(LOGGER_NAME)
    files = [h for h in logger.handlers if isinstance(h, logging.FileHandler)]
    assert [os.path.basename(h.baseFilename) for h in files] == ["train.log"] and files[0].stream is not None
    tr.fit()
    tr.close()
    assert logger.handlers == [] and files[0].stream is None and tr.writer._writer is None
    assert "finished at step 1" in (tmp_path / "exp" / "train.log").read_text().splitlines()[-1]


def test_cli_trains_writes_exp_dir_and_resumes(corpus, tmp_path):
    exp = tmp_path / "exp"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "speechclip_plus.bin.train", "--config", str(CONF / "tiny_p.yaml"),
           "--train_data", corpus["train_data"], "--valid_data", corpus["valid_data"],
           "--image_embeds", corpus["image_embeds"], "--valid_image_embeds", corpus["valid_image_embeds"],
           "--exp_dir", str(exp), "--no_progress", "--train.max_steps", "2", "--train.valid_every", "1",
           "--train.batch_size", "4", "--train.num_workers", "0", "--train.precision", "auto"]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    for f in ("config.yaml", "train.log", "run.sh", "checkpoints/last.pt", "checkpoints/best.pt",
              "checkpoints/step-1.pt", "checkpoints/step-2.pt", "checkpoints/metrics.jsonl"):
        assert (exp / f).exists(), f
    assert list((exp / "tensorboard").glob("events.out.tfevents.*"))
    import yaml

    saved = yaml.safe_load((exp / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 2 and saved["train"]["valid_data"] == corpus["valid_data"]
    run_sh = (exp / "run.sh").read_text()
    assert "--resume" in run_sh and str(exp / "config.yaml") in run_sh
    # run.sh resumes from the saved config alone; raising max_steps continues from step 2 (run in-process)
    from speechclip_plus.bin.train import main

    line = run_sh.strip().splitlines()[-1]
    words = shlex.split(line)
    assert words[:3] == [sys.executable, "-m", "speechclip_plus.bin.train"] and words[-1] == "$@"
    assert main(words[3:-1] + ["--train.max_steps", "3", "--no_progress"]) == 0
    assert torch.load(exp / "checkpoints" / "last.pt", weights_only=True)["step"] == 3
    log = (exp / "train.log").read_text()
    assert "resumed from" in log and "changed training options: train.max_steps" in log


def test_cli_print_config_dry_run_and_bad_override(corpus, tmp_path):
    from speechclip_plus.bin.train import main

    args = ["--config", str(CONF / "tiny_c.yaml"), "--train_data", corpus["train_data"],
            "--image_embeds", corpus["image_embeds"]]
    assert main(args + ["--print_config", "--train.lr", "0.5"]) == 0
    assert main(args + ["--train.lrr", "1", "--exp_dir", str(tmp_path / "x")]) == 2
    assert main(args + ["--dry_run"]) == 0
    assert not (tmp_path / "x").exists()
