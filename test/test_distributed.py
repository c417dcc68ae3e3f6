"""Two gloo processes on CPU give the single-process loss, gradients and validation on the same global batch.

The workers are forked (the parent already imported torch, s3prl and open_clip) and build the same
``Trainer`` with ``DistInfo(rank, 2)``; the parent builds it single-process. Crop off, dropout 0 (tiny configs),
so the only difference is the split of the batch over the ranks.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "speechclip_plus" / "conf"
WORLD = 2


def _worker(rank: int, port: int, cfg: dict, exp: str, out: str, step_record) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    from speechclip_plus.train.distributed import cleanup, init_distributed
    from speechclip_plus.train.trainer import Trainer

    info = init_distributed("cpu")
    try:
        tr = Trainer(cfg, exp, info, progress=False, console=False)
        metrics = tr.validate()
        step = step_record(tr, tr.sampler.batches(0)[0])
        tr.fit()
        tr.close()
        torch.save({"metrics": metrics, **step, "rank": info.rank, "final_step": tr.step}, out)
    finally:
        cleanup()


@pytest.fixture(scope="module")
def data(tmp_path_factory, make_train_dev):
    # equal lengths: the same padding in a rank's slice as in the whole batch (embeddings of the tiny fbank
    # model shift by ~1e-4 with the batch's padded length); 9 utterances: one global batch of 8 (+1 dropped)
    return make_train_dev(tmp_path_factory.mktemp("corpus"), train=(9, 4), seconds=0.75)


def test_two_processes_equal_one_process_on_the_global_batch(data, tmp_path, tiny_config, free_port, step_record,
                                                             join_workers):
    import torch.multiprocessing as mp

    from speechclip_plus.train.trainer import Trainer

    cfg = tiny_config("p", crop=False, batch_size=8, valid_batch_size=4, max_steps=2, valid_every=1, **data)
    exp = tmp_path / "exp2"
    outs = [str(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    ctx = mp.start_processes(_worker_entry, args=(free_port(), cfg, str(exp), outs, step_record), nprocs=WORLD,
                             start_method="fork", join=False)
    single = Trainer(cfg, str(tmp_path / "exp1"), progress=False, console=False)
    ref_metrics = single.validate()
    global_batch = single.sampler.batches(0)[0]
    ref = step_record(single, global_batch)
    join_workers(ctx)  # a worker's error is raised; hung workers are killed after 600 s and the test fails
    ranks = [torch.load(o, weights_only=True) for o in outs]

    # the ranks' slices partition the single-process global batch
    assert sorted(ranks[0]["utts"] + ranks[1]["utts"]) == sorted(ref["utts"])
    assert not set(ranks[0]["utts"]) & set(ranks[1]["utts"])
    # every rank scores its 4 utterances against all 8 (embeddings, images and ids are gathered)
    for r in ranks:
        assert r["sizes"] and all(local == 4 and gathered == 8 for local, gathered in r["sizes"])
    assert ref["sizes"] and all(s == (8, 8) for s in ref["sizes"])
    for r in ranks:
        assert r["loss"] == pytest.approx(ref["loss"], abs=1e-5)
        assert r["grads"].keys() == ref["grads"].keys()
        for n, g in ref["grads"].items():
            torch.testing.assert_close(r["grads"][n], g, rtol=0, atol=1e-5, msg=n)
    # distributed validation = single-process validation (same global valid batches, same weights)
    for r in ranks:
        assert r["metrics"].keys() == ref_metrics.keys()
        for k, v in ref_metrics.items():
            assert r["metrics"][k] == pytest.approx(v, abs=1e-5), k

    # only rank 0 writes checkpoints, tensorboard and train.log; every rank has its own log
    assert all(r["final_step"] == 2 for r in ranks)
    assert sorted(os.listdir(exp / "checkpoints")) == ["best.pt", "last.pt", "metrics.jsonl", "step-1.pt",
                                                        "step-2.pt"]
    ck = torch.load(exp / "checkpoints" / "last.pt", weights_only=True)
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2
    assert "[rank 1]" in (exp / "train.rank1.log").read_text()
    assert "[rank 1]" not in (exp / "train.log").read_text()
    assert len(list((exp / "tensorboard").glob("events.*"))) == 1


def _worker_entry(rank: int, port: int, cfg: dict, exp: str, outs, step_record) -> None:
    _worker(rank, port, cfg, exp, outs[rank], step_record)


def test_cli_nproc_relaunches_under_torchrun(data, tmp_path):
    exp = tmp_path / "exp"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "speechclip_plus.bin.train", "--config", str(CONF / "tiny_p.yaml"),
           "--nproc", "2",
           "--train_data", data["train_data"], "--image_embeds", data["image_embeds"], "--exp_dir", str(exp),
           "--no_progress", "--train.max_steps", "1", "--train.num_workers", "0", "--train.precision", "fp32"]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "torch.distributed.run" in p.stderr and "--nproc_per_node=2" in p.stderr
    ck = torch.load(exp / "checkpoints" / "last.pt", weights_only=True)
    assert ck["world_size"] == 2 and ck["step"] == 1
    for r in range(2):
        assert f"[rank {r}]" in (exp / f"train.rank{r}.log").read_text()
    assert "effective global batch = 8" in (exp / "train.log").read_text()
    assert "--nproc 2" in (exp / "run.sh").read_text()
