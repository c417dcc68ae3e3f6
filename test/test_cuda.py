"""The GPU path: training steps of every variant under each precision, a two-process DDP step, scoring and
extraction equal to the CPU's.

Every test here is marked ``cuda`` and targets the first GPU; without one (``torch.cuda.is_available()`` false)
they skip, so the default suite stays as fast as before. ``bench/gpu.sh`` runs them (``pytest -m cuda test``).
``SPEECHCLIP_TEST_DEVICE=cpu`` runs the same tests on the CPU instead, with the precisions a CPU accepts
(fp32 and bf16; fp16 is refused on a CPU by design) and gloo instead of NCCL, so the test code itself can be
checked on a machine without a GPU.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Dict, Optional

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEVICE_ENV = "SPEECHCLIP_TEST_DEVICE"
TARGET = os.environ.get(DEVICE_ENV) or "cuda"
if TARGET not in ("cuda", "cpu"):
    raise ValueError(f"{DEVICE_ENV}={TARGET!r}: expected cuda (the default) or cpu")
DEVICE = "cuda:0" if TARGET == "cuda" else "cpu"

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(TARGET == "cuda" and not torch.cuda.is_available(),
                       reason=f"no CUDA GPU (torch.cuda.is_available() is false); {DEVICE_ENV}=cpu runs these "
                              "tests on the CPU"),
]

VARIANTS = ("p", "c", "cplus", "h", "hplus")
PRECISIONS = ("fp32", "fp16", "bf16")
# what the trainer logs for each forced precision, and the dtype a linear layer's output has under it
LOGGED = {"fp32": "float32", "fp16": "float16 autocast + GradScaler", "bf16": "bfloat16 autocast"}
DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
STEPS = 3


def unsupported(precision: str) -> Optional[str]:
    """Why the target device does not run ``precision``, or None when it does."""
    if TARGET == "cpu" and precision == "fp16":
        return "fp16 is refused on a CPU by design (train.precision)"
    if TARGET == "cuda" and precision == "bf16":
        capability = torch.cuda.get_device_capability(0)
        if capability < (8, 0):
            return (f"bf16 needs compute capability >= 8.0; {torch.cuda.get_device_name(0)} has "
                    f"{capability[0]}.{capability[1]}")
    return None


def _trainer(cfg, exp: Path, dist_info=None):
    """A Trainer on the target device (or ``dist_info``'s)."""
    from speechclip_plus.train.distributed import DistInfo
    from speechclip_plus.train.trainer import Trainer

    return Trainer(cfg, str(exp), dist_info or DistInfo(device=DEVICE), progress=False, console=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, make_train_dev):
    return make_train_dev(tmp_path_factory.mktemp("corpus"))


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_training_steps_of_every_variant_under_each_precision(variant, precision, corpus, tmp_path, tiny_config):
    """A few optimiser steps and a validation on the device: finite losses, every step taken (fp16: the
    GradScaler may skip a few while it calibrates, they do not count), trainable weights moved and finite,
    frozen ones untouched, the autocast dtype the one logged."""
    reason = unsupported(precision)
    if reason:
        pytest.skip(reason)
    cfg = tiny_config(variant, precision=precision, batch_size=4, max_steps=STEPS, warmup_steps=1,
                      valid_every=100, log_every=1, **corpus)
    tr = _trainer(cfg, tmp_path / "exp")
    model = tr.raw_model
    assert {p.device.type for p in model.parameters()} == {TARGET}
    assert tr.scaler.is_enabled() == (precision == "fp16")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses, dtypes = [], set()
    attention = next(m for m in model.encoder.modules() if isinstance(m, torch.nn.MultiheadAttention))
    attention.register_forward_hook(lambda _m, _a, out: dtypes.add(out[0].dtype))
    real = tr._forward_backward

    def forward_backward(batch, sync, grad_stats=False):
        rec = real(batch, sync, grad_stats)
        losses.append(float(rec["loss"]))
        return rec

    tr._forward_backward = forward_backward
    out = tr.fit()
    tr.close()

    assert out["step"] == STEPS
    assert len(losses) == STEPS + tr.total_bad_steps
    assert tr.total_bad_steps == 0 or (precision == "fp16" and tr.total_bad_steps < cfg["train"]["max_bad_steps"])
    assert all(math.isfinite(x) for x in losses), losses
    assert dtypes == {DTYPE[precision]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and changed <= trainable, sorted(changed - trainable)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(math.isfinite(v) for v in out["metrics"].values()) and out["metrics"]
    log = (tmp_path / "exp" / "train.log").read_text()
    assert f"precision: {LOGGED[precision]} (train.precision {precision})" in log
    assert f"device {DEVICE}" in log


def test_auto_precision_is_the_devices_choice(corpus, tmp_path, tiny_config):
    """auto: bf16 on Ampere and later GPUs, fp16 with a GradScaler before; on a CPU bf16 only where native."""
    from speechclip_plus.train.precision import cpu_has_native_bf16

    if TARGET == "cuda":
        expected = "bf16" if torch.cuda.get_device_capability(0) >= (8, 0) else "fp16"
    else:
        expected = "bf16" if cpu_has_native_bf16() else "fp32"
    tr = _trainer(tiny_config("hplus", precision="auto", **corpus), tmp_path / "exp")
    tr.close()
    assert tr.amp_dtype == (None if expected == "fp32" else DTYPE[expected])
    assert tr.scaler.is_enabled() == (expected == "fp16")
    assert f"precision: {LOGGED[expected]} (train.precision auto)" in (tmp_path / "exp" / "train.log").read_text()


# ---------------------------------------------------------------------------------------------- DDP
WORLD = 2


def _ddp_worker(rank: int, port: int, cfg: Dict, exp: str, outs, step_record) -> None:
    """One rank (spawned: a CUDA context cannot be forked): its slice of the first global batch, forward and
    backward through DDP; loss and averaged gradients saved on the CPU."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    from speechclip_plus.train.distributed import cleanup, init_distributed

    info = init_distributed(TARGET)
    try:
        tr = _trainer(cfg, Path(exp), dist_info=info)
        rec = step_record(tr, tr.sampler.batches(0)[0])
        tr.close()
        rec["grads"] = {n: g.cpu() for n, g in rec["grads"].items()}
        torch.save({**rec, "device": info.device}, outs[rank])
    finally:
        cleanup()


def test_two_processes_equal_one_process_on_the_global_batch(tmp_path, free_port, join_workers, make_corpus,
                                                             step_record, tiny_config):
    """Two ranks (NCCL on two GPUs; gloo with SPEECHCLIP_TEST_DEVICE=cpu) each score their half of the global
    batch against all of it: loss and DDP-averaged gradients equal one process on the whole batch."""
    if TARGET == "cuda" and torch.cuda.device_count() < WORLD:
        pytest.skip(f"NCCL needs one GPU per process: {WORLD} GPUs, {torch.cuda.device_count()} visible "
                    "(CUDA_VISIBLE_DEVICES)")
    import torch.multiprocessing as mp

    # equal lengths, no crop: a rank's slice has the padding it has in the whole batch
    train, emb = make_corpus(tmp_path / "corpus", 9, 4, seed=0, name="train", seconds=0.75)
    cfg = tiny_config("p", crop=False, batch_size=8, max_steps=1, train_data=str(train), image_embeds=str(emb))
    outs = [str(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    ctx = mp.start_processes(_ddp_worker, args=(free_port(), cfg, str(tmp_path / "exp2"), outs, step_record),
                             nprocs=WORLD, start_method="spawn", join=False)
    single = _trainer(cfg, tmp_path / "exp1")
    ref = step_record(single, single.sampler.batches(0)[0])
    single.close()
    join_workers(ctx)  # a worker's error is raised; hung workers are killed after 600 s and the test fails
    ranks = [torch.load(o, weights_only=True) for o in outs]

    expected_devices = [f"cuda:{r}" for r in range(WORLD)] if TARGET == "cuda" else ["cpu"] * WORLD
    assert [r["device"] for r in ranks] == expected_devices
    assert sorted(ranks[0]["utts"] + ranks[1]["utts"]) == sorted(ref["utts"])
    assert not set(ranks[0]["utts"]) & set(ranks[1]["utts"])
    for r in ranks:
        assert r["sizes"] and all(s == (4, 8) for s in r["sizes"])  # 4 local embeddings, 8 after the gather
        assert r["loss"] == pytest.approx(ref["loss"], abs=1e-5)
        assert r["grads"].keys() == ref["grads"].keys()
        for n, g in ref["grads"].items():
            torch.testing.assert_close(r["grads"][n], g.cpu(), rtol=1e-4, atol=1e-5, msg=n)


# ---------------------------------------------------------------------------------------------- inference
@pytest.fixture(scope="module")
def exported(tmp_path_factory, make_data_dir, train_exp):
    """Tiny models trained two steps on the CPU and exported: c (fbank) and hplus (a tiny s3prl HuBERT,
    conv feature extractor included); a test data dir of 3 images x 2 captions."""
    from speechclip_plus.bin.export import main as export_main
    from speechclip_plus.models.tiny import save_tiny_hubert

    root = tmp_path_factory.mktemp("exported")
    files = {}
    for variant in ("c", "hplus"):
        vroot = root / variant
        overrides = []
        if variant == "hplus":
            ckpt = save_tiny_hubert(vroot / "upstream" / "tiny_hubert.pt")
            overrides = ["--model.upstream.name", "hubert_local", "--model.upstream.ckpt", ckpt]
        exp, _ = train_exp(vroot, variant, *overrides)
        files[variant] = vroot / "model.pt"
        assert export_main(["--exp_dir", str(exp), "--out", str(files[variant])]) == 0
    data, _ = make_data_dir(root, "test", n_images=3, caps_per_image=2, seed=4)
    return {"files": files, "data": str(data)}


def _load(path: Path, device: str):
    """A model file loaded as the scoring and extraction tools load it, on ``device``; records the device of
    the attention block's input at every call."""
    from speechclip_plus.api import load_model_file

    model = load_model_file(path)[0]
    model.upstream.per_utterance = "auto"
    model.to(device)
    model.seen = set()
    model.encoder.register_forward_pre_hook(lambda _m, args: model.seen.add(args[0].device.type))
    return model


@pytest.fixture
def exact_fp32():
    """No TF32 on the GPU (cuDNN convolutions use it by default): the device computes in full float32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("variant", ["c", "hplus"])
def test_scoring_and_extraction_on_the_device_equal_the_cpu(exported, variant, exact_fp32):
    from speechclip_plus.bin.extract import extract
    from speechclip_plus.eval.scoring import embed_data_dir

    data = exported["data"]
    cpu, dev = _load(exported["files"][variant], "cpu"), _load(exported["files"][variant], DEVICE)
    ref = embed_data_dir(cpu, data, batch_size=4, device="cpu", progress=False)
    got = embed_data_dir(dev, data, batch_size=4, device=DEVICE, progress=False)
    assert dev.seen == {TARGET}
    assert got.utts == ref.utts and len(ref.utts) == 6
    assert got.embeddings.keys() == ref.embeddings.keys()
    for branch, e in ref.embeddings.items():
        torch.testing.assert_close(got.embeddings[branch], e, rtol=1e-4, atol=1e-5, msg=branch)
    assert len(got.keywords) == len(ref.keywords) and all(k is not None for k in ref.keywords)
    for a, b in zip(got.keywords, ref.keywords):
        assert (a["ids"], a["tokens"], a["neighbours"], a["spans"], a["fires"]) == \
               (b["ids"], b["tokens"], b["neighbours"], b["spans"], b["fires"])
        if b["alpha"] is not None:
            torch.testing.assert_close(torch.from_numpy(a["alpha"]), torch.from_numpy(b["alpha"]), rtol=1e-4,
                                       atol=1e-5)

    outputs = list(ref.embeddings) + ["hidden"]
    for branch in outputs:
        for layer in ((0, -1) if branch == "hidden" else (-1,)):
            want = dict(extract(cpu, data, branch, layer, batch_size=4, device="cpu", progress=False))
            have = dict(extract(dev, data, branch, layer, batch_size=4, device=DEVICE, progress=False))
            assert have.keys() == want.keys() == set(ref.utts)
            for utt, x in want.items():
                assert have[utt].dtype == x.dtype and have[utt].shape == x.shape, (branch, layer, utt)
                torch.testing.assert_close(torch.from_numpy(have[utt]), torch.from_numpy(x), rtol=1e-4,
                                           atol=1e-4, msg=f"{branch} layer {layer} {utt}")
