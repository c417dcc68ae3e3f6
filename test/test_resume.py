"""Exact resume: a run interrupted after step 3 (last checkpoint at step 2) and resumed to step 4 ends with the
same weights, optimiser state and validation record as an uninterrupted run."""
from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _trainer(cfg, exp, **kw):
    from speechclip_plus.train.trainer import Trainer

    return Trainer(cfg, str(exp), progress=False, console=False, **kw)


def _metrics(exp):
    rows = [json.loads(x) for x in (exp / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time"} for r in rows]


@pytest.fixture(scope="module")
def data(tmp_path_factory, make_train_dev):
    return make_train_dev(tmp_path_factory.mktemp("corpus"), dev=(4, 2))


def test_interrupted_and_resumed_run_equals_uninterrupted(data, tmp_path, tiny_config):
    # hplus: both branches, CIF, keyword BatchNorm buffers; random crops and CIF dropout draw from the RNGs
    # save_frozen false: the (random, seeded) tiny CLIP is left out of checkpoints and rebuilt on resume
    cfg = tiny_config("hplus", model={"cif": {"dropout": 0.3}}, crop=9000, batch_size=2, max_steps=4,
                      valid_every=2, warmup_steps=2, log_every=1, save_frozen=False, **data)
    full = _trainer(cfg, tmp_path / "full")
    assert len(full.sampler) >= 2  # so the interruption falls inside an epoch
    full.fit()
    full.close()

    part = _trainer(cfg, tmp_path / "part")
    part.fit(stop_after=3)  # "killed" after step 3: its progress past the step-2 checkpoint is lost
    part.close()
    last = torch.load(tmp_path / "part" / "checkpoints" / "last.pt", weights_only=True)
    assert last["step"] == 2 and last["sampler"]["position"] == 2 % len(part.sampler)
    assert last["model_excluded"] and all(k.startswith("clip.") for k in last["model_excluded"])
    assert not set(last["model_excluded"]) & set(last["model"])
    del part

    resumed = _trainer(cfg, tmp_path / "part", resume=True)
    assert resumed.step == 2
    resumed.fit()
    resumed.close()

    assert resumed.step == full.step == 4 and resumed.epoch == full.epoch
    a, b = full.raw_model.state_dict(), resumed.raw_model.state_dict()
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, differ
    oa, ob = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i])
    assert full.scheduler.get_last_lr() == resumed.scheduler.get_last_lr()
    assert _metrics(tmp_path / "full") == _metrics(tmp_path / "part")
    ka = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)
    kb = torch.load(tmp_path / "part" / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.equal(ka["model"][k], kb["model"][k]) for k in ka["model"])
    assert ka["sampler"] == kb["sampler"] and ka["best"] == kb["best"]


def test_resume_refuses_a_different_model(data, tmp_path, tiny_config):
    from speechclip_plus.config import ConfigError

    cfg = tiny_config("p", batch_size=4, max_steps=1, valid_every=1, **data)
    _trainer(cfg, tmp_path / "exp").fit()
    other = tiny_config("p", model={"parallel": {"projection": [16]}}, batch_size=4, max_steps=2, valid_every=1,
                        **data)
    saved = (tmp_path / "exp" / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="model.parallel.projection"):
        _trainer(other, tmp_path / "exp", resume=True)
    assert (tmp_path / "exp" / "config.yaml").read_text() == saved
    fresh = _trainer(cfg, tmp_path / "new", resume=True)  # --resume without a checkpoint starts afresh
    assert fresh.step == 0
