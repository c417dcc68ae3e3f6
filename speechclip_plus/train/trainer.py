"""One trainer for every SpeechCLIP variant: optimiser steps, validation, checkpoints, exact resume.

Per optimiser step (``train`` config section):
- ``accum_grad`` micro-batches, each a global batch of ``batch_size`` utterances (a uniform shuffle as the
  reference, or length-bucketed with ``bucketing``, optionally capped at ``max_batch_seconds`` of padded audio,
  both over all ranks) split over the ranks, so the result does not depend on the number of processes;
  loss / accum_grad is back-propagated (DDP syncs gradients on the last micro-batch only). Autocast by
  ``precision`` (``precision.py``): bf16 where native, fp16 with a GradScaler on older GPUs, else float32.
- A skipped step: a non-finite loss on any rank or a non-finite gradient norm (bf16/float32), or an fp16 step
  whose gradients overflowed (the GradScaler skipped it). Its gradients are dropped and neither the step
  counter nor the LR schedule moves; ``max_bad_steps`` consecutive skips stop the run (``TrainingDiverged``),
  leaving the last good checkpoint as it is.
- Gradients are clipped to ``grad_clip`` (their norm is logged either way), then Adam/AdamW and the
  warm-up/decay schedule (``scheduler.py``) step. A step reads one flag back to the host (whether it was
  skipped); losses and statistics stay on the device until a ``log_every`` step reads them.
- Validation (below) at the end of every epoch (``valid_every: epoch``, the reference) or every ``valid_every``
  steps, and at ``max_steps``; then a checkpoint (``checkpoint.py``), then the metrics line. ``best.pt``
  follows ``select_metric`` of the model's retrieval branch (``model.retrieval_branch``; ``recall_*`` up,
  ``loss`` down; ``<branch>/<metric>`` picks another branch).
- ``log_grad_norms``: every ``log_every`` steps, the norm of each weighted loss term's gradient with respect
  to the shared attention block's parameters, and the cosine between the terms' gradients (TensorBoard
  ``train/grad_norm/<term>``, ``train/grad_cos/<a>~<b>``): how much the branches pull the shared encoder
  in different directions.

Validation: the valid set, sorted by duration, in global batches of ``valid_batch_size`` (rounded up to a
multiple of the world size, the last one padded by repeating an utterance when distributed) split over the
ranks; the model in eval mode gives the loss (global-batch contrastive loss; padding repeats count there) and
each branch's embedding (padding repeats dropped).
Recall@1/5/10 both ways per branch (``eval.retrieval.recall_at_k``) against the valid set's unique images
(embeddings from the stage-2 cache). Metric names: ``loss``, ``<term>``, ``<branch>/<recall key>``.

Reproducibility: everything is seeded from ``seed`` before the model is built, and re-seeded at the start of
every epoch with ``seed + 1000 * epoch + rank`` (the sampler's order depends on ``seed`` and the epoch only,
so all ranks agree; DataLoader workers are seeded from their own generator). A checkpoint stores the RNG
states of every rank and the sampler position (batches of the epoch consumed); ``resume`` restores them, so an
interrupted and resumed run ends with the same weights as an uninterrupted one (same world size and hardware).
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..config import ConfigError, save_config
from ..data import LengthBucketSampler, SpeechImageDataset, collate
from ..eval.retrieval import recall_at_k
from ..models.speechclip import build_model
from . import distributed as D
from .checkpoint import (
    CheckpointDir,
    CheckpointError,
    best_is_better,
    frozen_parameter_names,
    load_checkpoint,
    load_model_state,
    model_state,
    rng_state,
    seed_everything,
    set_rng_state,
)
from .precision import amp_dtype, autocast, cpu_has_native_bf16, needs_grad_scaler, precision_name
from .logging import ScalarWriter, close_logger, env_info, setup_logger
from .scheduler import build_scheduler

CHECKPOINT_FORMAT = 1


class TrainingDiverged(RuntimeError):
    """Too many consecutive optimiser steps with a non-finite loss."""


def valid_batches(order: Sequence[int], batch_size: int, world_size: int, rank: int) -> List[List[int]]:
    """This rank's slices of consecutive global batches of ``order`` (see the module docstring).

    Global batches hold ``batch_size`` rounded up to a multiple of ``world_size`` items; when distributed the
    last one is padded (repeating its last item) to a multiple of ``world_size``, so every rank gets the
    same number of equally sized slices.
    """
    if batch_size < 1:
        raise ValueError(f"train.valid_batch_size must be >= 1, got {batch_size}")
    size = -(-batch_size // world_size) * world_size
    out = []
    for start in range(0, len(order), size):
        chunk = list(order[start:start + size])
        while len(chunk) % world_size:
            chunk.append(chunk[-1])
        per = len(chunk) // world_size
        out.append(chunk[rank * per:(rank + 1) * per])
    return out


class Trainer:
    """Train ``build_model(cfg)`` on a Kaldi data dir with cached image embeddings; see the module doc.

    Data paths come from ``cfg['train']`` (``train_data``, ``valid_data``, ``image_embeds``,
    ``valid_image_embeds``). ``resume``: continue from ``<exp_dir>/checkpoints/last.pt`` (start afresh when
    there is none); without it the exp dir must not hold checkpoints. ``dist_info``: this process's place
    (``distributed.init_distributed()``); default single-process CPU.
    """

    def __init__(self, cfg: Dict, exp_dir: str, dist_info: Optional[D.DistInfo] = None, resume: bool = False,
                 progress: bool = True, console: bool = True):
        self.cfg = cfg
        self.tc = tc = cfg["train"]
        self.exp_dir = os.path.abspath(exp_dir)
        self.dist = dist_info or D.DistInfo()
        self.device = torch.device(self.dist.device)
        self.progress = progress
        self.log = setup_logger(self.exp_dir, self.dist.rank, self.dist.world_size, console=console)
        self.ckpt = CheckpointDir(os.path.join(self.exp_dir, "checkpoints"), tc["keep_checkpoints"])
        self._check_train_config()
        if not resume and os.path.exists(self.ckpt.last):
            raise CheckpointError(f"{self.exp_dir} already holds checkpoints; pass --resume or use another "
                                  "--exp_dir")
        self._log_start()

        seed_everything(tc["seed"])
        self._build_data()
        self.model = build_model(cfg).to(self.device)
        self.raw_model: nn.Module = self.model
        save_frozen = tc.get("save_frozen")
        if save_frozen is None:  # auto: keep what the model cannot reload from pretrained files
            keep = ("clip.",) if cfg["model"]["clip"]["pretrained"] is None else ()
            self.excluded = frozen_parameter_names(self.model, keep)
        else:
            self.excluded = [] if save_frozen else frozen_parameter_names(self.model)
        params = self.model.trainable_parameters()
        opt_cls = torch.optim.AdamW if tc["optimizer"] == "adamw" else torch.optim.Adam
        self.optimizer = opt_cls(params, lr=tc["lr"], weight_decay=tc["weight_decay"])
        self.scheduler = build_scheduler(self.optimizer, tc["warmup_steps"], tc["max_steps"], tc["final_lr"])
        self.fp16 = needs_grad_scaler(self.amp_dtype)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.fp16)
        self.spm = self._load_spm()

        self.step = 0
        self.epoch = 0
        self.batches_done = 0  # batches of the current epoch consumed so far
        self.best: Dict[str, Any] = {"metric": self._select_key(), "mode": self._select_mode(), "value": None,
                                     "step": None}
        self.total_bad_steps = 0
        self._resumed = False
        if resume:
            self._resume()
        if self.dist.is_main:  # after the resume checks, so a refused resume leaves the exp dir as it was
            save_config(cfg, os.path.join(self.exp_dir, "config.yaml"))

        n_train = sum(p.numel() for p in params)
        n_all = sum(p.numel() for p in self.model.parameters())
        self.log.info(f"model: variant {self.raw_model.variant}, branches {self.raw_model.branches}, "
                      f"{n_train:,} trainable of {n_all:,} parameters; retrieval branch "
                      f"{self.raw_model.retrieval_branch} (selects checkpoints); {len(self.excluded)} frozen "
                      "tensors left out of checkpoints")
        if getattr(self.raw_model, "n_fixed", 0) or getattr(self.raw_model, "has_cif", False):
            if cfg["model"]["clip"]["vocab"] is None:
                self.log.warning(f"keyword codebook: CLIP's whole vocabulary ({self.raw_model.clip.vocab_size:,} "
                                 "tokens; model.clip.vocab is null). The reference uses the tokens of the "
                                 "training captions (recipe stage 3), a codebook ~6x smaller.")
        if self.dist.distributed:
            dev_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.model, device_ids=dev_ids)  # every parameter gets a gradient
        self.writer = ScalarWriter(os.path.join(self.exp_dir, "tensorboard"), enabled=self.dist.is_main,
                                   purge_step=self.step + 1 if self.step else None)

    # ------------------------------------------------------------------------------------------ set-up
    def _check_train_config(self) -> None:
        tc = self.tc
        for key in ("batch_size", "valid_batch_size", "accum_grad", "max_steps", "log_every", "max_bad_steps"):
            if tc[key] < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {tc[key]}")
        if tc["warmup_steps"] < 0 or tc["num_workers"] < 0 or tc["keep_checkpoints"] < 0:
            raise ConfigError("train.warmup_steps, train.num_workers and train.keep_checkpoints must be >= 0")
        if tc["max_batch_seconds"] is not None and not tc["max_batch_seconds"] > 0:
            raise ConfigError(f"train.max_batch_seconds must be > 0 or null, got {tc['max_batch_seconds']}")
        if tc.get("save_frozen") not in (None, True, False):
            raise ConfigError(f"train.save_frozen must be true, false or null (auto), got {tc['save_frozen']!r}")
        if not tc.get("train_data") or not tc.get("image_embeds"):
            raise ConfigError("train.train_data and train.image_embeds must be set (--train_data, --image_embeds)")
        if self.dist.distributed and tc["batch_size"] < self.dist.world_size:
            raise ConfigError(f"train.batch_size={tc['batch_size']} is smaller than the world size "
                              f"{self.dist.world_size}")

    def _log_start(self) -> None:
        if self.dist.is_main:
            for k, v in env_info().items():
                self.log.info(f"env: {k} = {v}")
        tc = self.tc
        self.log.info(f"world size {self.dist.world_size} (rank {self.dist.rank}, device {self.device}); "
                      f"effective global batch = {tc['batch_size']} utterances x accum_grad {tc['accum_grad']} = "
                      f"{tc['batch_size'] * tc['accum_grad']}"
                      + (f" (capped at {tc['max_batch_seconds']} s of audio per batch)"
                         if tc["max_batch_seconds"] else ""))
        self.amp_dtype = amp_dtype(self.device, tc["precision"])
        note = ""
        if self.device.type == "cpu" and not cpu_has_native_bf16():
            if tc["precision"] == "auto":
                note = " (this CPU has no native bf16)"
            elif tc["precision"] == "bf16":
                note = " (a CPU without native bf16: emulated, many times slower)"
        self.log.info(f"precision: {precision_name(self.device, tc['precision'])} (train.precision "
                      f"{tc['precision']}){note}")
        self.log.info(f"seed {tc['seed']} (re-seeded per epoch with seed + 1000 * epoch + rank)")

    def _build_data(self) -> None:
        tc, ws = self.tc, self.dist.world_size
        if tc["batch_size"] % ws:
            raise ConfigError(f"train.batch_size={tc['batch_size']} (the global batch) is not divisible by the "
                              f"world size {ws}")
        self.train_set = SpeechImageDataset(tc["train_data"], image_embeds=tc["image_embeds"])
        if len(self.train_set) == 0:
            raise ValueError(f"{tc['train_data']}: no utterances")
        self.sampler = LengthBucketSampler(
            self.train_set.durations(), batch_size=tc["batch_size"] // ws,
            max_batch_seconds=tc["max_batch_seconds"] / ws if tc["max_batch_seconds"] else None,
            shuffle=True, seed=tc["seed"], drop_last=True, num_replicas=ws, rank=self.dist.rank,
            bucketing=tc["bucketing"],
        )
        if len(self.sampler) == 0:
            raise ValueError(f"{tc['train_data']}: {len(self.train_set)} utterances make no complete batch of "
                             f"train.batch_size={tc['batch_size']}")
        self.valid_set = None
        if tc.get("valid_data"):
            self.valid_set = SpeechImageDataset(tc["valid_data"],
                                                image_embeds=tc.get("valid_image_embeds") or tc["image_embeds"])
            if len(self.valid_set) == 0:
                raise ValueError(f"{tc['valid_data']}: no utterances")
            vdur = self.valid_set.durations()
            order = sorted(range(len(vdur)), key=lambda i: (-vdur[i], i))
            self.valid_plan = valid_batches(order, tc["valid_batch_size"], ws, self.dist.rank)
        else:
            self.log.warning("no validation data: no validation, no best.pt")
        self.log.info(f"data: train {tc['train_data']} ({len(self.train_set)} utterances, {len(self.sampler)} "
                      f"batches per epoch, {'length-bucketed' if tc['bucketing'] else 'uniformly shuffled'}), "
                      f"valid {tc.get('valid_data')} ({len(self.valid_set) if self.valid_set is not None else 0} "
                      f"utterances, validated {self._cadence()})")
        self.train_loader = self._loader(self.train_set, self.sampler, tc["seed"])
        self.valid_loader = (self._loader(self.valid_set, self.valid_plan, tc["seed"])
                             if self.valid_set is not None else None)

    def _cadence(self) -> str:
        ve = self.tc["valid_every"]
        return "at the end of every epoch" if ve == "epoch" else f"every {ve} steps"

    def _load_spm(self):
        m = self.cfg["model"]
        if not getattr(self.raw_model, "has_cif", False) or m["cif"]["target"] != "spm":
            return None
        path = self.cfg["data"]["text_vocab"]
        if not path:
            raise ConfigError("model.cif.target=spm needs data.text_vocab (a sentencepiece model)")
        import sentencepiece

        if not os.path.isfile(path):
            raise FileNotFoundError(f"data.text_vocab: sentencepiece model not found: {path}")
        return sentencepiece.SentencePieceProcessor(model_file=path)

    def _select_key(self) -> str:
        sel = self.tc["select_metric"]
        if "/" in sel or not sel.startswith(("recall_", "speech_to_image_", "image_to_speech_")):
            return sel
        return f"{self.raw_model.retrieval_branch}/{sel}"

    def _select_mode(self) -> str:
        return "min" if self.tc["select_metric"].split("/")[-1] in ("loss", "cl_parallel", "cl_cascaded",
                                                                      "quantity") else "max"

    # ------------------------------------------------------------------------------------------ resume
    def _resume(self) -> None:
        path = self.ckpt.last
        if not os.path.exists(path):
            self.log.info(f"--resume: no {path} yet, starting from scratch")
            return
        ck = load_checkpoint(path)
        if ck.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path}: checkpoint format {ck.get('format')} (expected {CHECKPOINT_FORMAT})")
        if ck["config"]["model"] != self.cfg["model"]:
            diff = sorted(_diff_keys(ck["config"]["model"], self.cfg["model"], "model"))
            raise ConfigError(f"{path}: the checkpoint's model config differs from this run's at "
                              f"{', '.join(diff)}")
        tdiff = sorted(_diff_keys(ck["config"]["train"], self.cfg["train"], "train"))
        if tdiff:
            self.log.warning(f"resuming with changed training options: {', '.join(tdiff)}")
        load_model_state(self.raw_model, ck["model"], ck["model_excluded"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        if ck["scaler"]:
            self.scaler.load_state_dict(ck["scaler"])
        if ck["world_size"] != self.dist.world_size:
            raise CheckpointError(f"{path} was written by {ck['world_size']} processes; resume with the same "
                                  f"number (now {self.dist.world_size}) to continue the same batches")
        self.sampler.load_state_dict(ck["sampler"])
        self.step = int(ck["step"])
        self.epoch, self.batches_done = int(ck["sampler"]["epoch"]), int(ck["sampler"]["position"])
        if ck["best"]["metric"] == self.best["metric"]:
            self.best = dict(ck["best"])
        self.total_bad_steps = int(ck.get("total_bad_steps", 0))
        set_rng_state(ck["rng"][self.dist.rank])
        if self.dist.is_main:
            self.ckpt.trim_metrics(self.step)
        self._resumed = True
        self.log.info(f"resumed from {path}: step {self.step}, epoch {self.epoch}, "
                      f"{self.batches_done} batches of the epoch done, best {self.best}")

    def state_dict(self) -> Dict[str, Any]:
        """The checkpoint (collective: gathers every rank's RNG state)."""
        rngs = D.all_gather_object(rng_state())
        return {
            "format": CHECKPOINT_FORMAT,
            "model": model_state(self.raw_model, self.excluded),
            "model_excluded": list(self.excluded),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "sampler": self.sampler.state_dict(position=self.batches_done),
            "rng": rngs,
            "best": dict(self.best),
            "total_bad_steps": self.total_bad_steps,
            "config": self.cfg,
            "world_size": self.dist.world_size,
        }

    # ------------------------------------------------------------------------------------------ batches
    def _autocast(self):
        return autocast(self.device, self.amp_dtype)

    def _inputs(self, batch: Dict) -> Dict[str, Any]:
        """Model keyword arguments for a collated batch (image indices are dataset-wide, rank-consistent)."""
        if "image_embed" not in batch:
            raise ValueError("batches carry no image_embed: the dataset needs an image-embedding scp")
        kw = dict(wav=batch["wav"].to(self.device, non_blocking=True),
                  wav_len=batch["wav_len"].to(self.device),
                  image_embed=batch["image_embed"].to(self.device, non_blocking=True).float(),
                  image_index=batch["image_index"].to(self.device), step=self.step, texts=list(batch["text"]))
        if self.spm is not None:
            kw["target_lengths"] = torch.tensor([max(1, len(self.spm.encode(t))) for t in batch["text"]])
        return kw

    def _loader(self, dataset, batch_sampler, seed: int) -> DataLoader:
        """Built once; its workers persist across epochs (the batch sampler is re-read at every ``iter``)."""
        workers = self.tc["num_workers"]
        return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate, num_workers=workers,
                          pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
                          generator=torch.Generator().manual_seed(seed))

    def _epoch_batches(self) -> Iterator[Dict]:
        """Batches of the current epoch from ``batches_done`` on (re-seeding at a fresh epoch start)."""
        if not self._resumed or self.batches_done == 0:
            seed_everything(self.tc["seed"] + 1000 * self.epoch + self.dist.rank)
            self.batches_done = 0
        self._resumed = False
        self.sampler.set_epoch(self.epoch)  # after load_state_dict: continues at batch ``batches_done``
        yield from self.train_loader

    # ------------------------------------------------------------------------------------------ training
    def fit(self, stop_after: Optional[int] = None) -> Dict[str, Any]:
        """Train to ``max_steps`` (or stop after optimiser step ``stop_after``, as if interrupted there).

        Returns ``{"step", "epoch", "best", "metrics"}`` (``metrics``: the last validation).
        """
        tc = self.tc
        started = time.time()
        last_metrics: Dict[str, float] = {}
        bar = self._progress_bar()
        window: List[Dict] = []
        bad_in_row = 0
        valid_pending = False  # an epoch ended inside an accumulation window: validate after its step
        self.model.train()
        try:
            while self.step < tc["max_steps"]:
                if len(self.sampler) == 0:
                    raise ValueError(f"{tc['train_data']}: the sampler yields no batch (batch_size "
                                     f"{tc['batch_size']}, world size {self.dist.world_size})")
                for batch in self._epoch_batches():
                    self.batches_done += 1
                    sync = len(window) + 1 == tc["accum_grad"]
                    grad_stats = tc["log_grad_norms"] and not window and self._logs_at(self.step + 1)
                    window.append(self._forward_backward(batch, sync, grad_stats))
                    if not sync:
                        continue
                    ok, grad_norm = self._optimizer_step(window)
                    stats, window = self._window_stats(window, grad_norm), []
                    if not ok:
                        bad_in_row += 1
                        self.total_bad_steps += 1
                        self.log.warning(f"step {self.step + 1} (epoch {self.epoch}) skipped: "
                                         + ("fp16 gradients overflowed" if self.fp16 else "non-finite loss or "
                                            "gradient") + f" ({bad_in_row} in a row, {self.total_bad_steps} in total)")
                        if bad_in_row >= tc["max_bad_steps"]:
                            steps = self.ckpt.steps()
                            last = (f"{self.ckpt.last} (step {steps[-1] if steps else '?'})"
                                    if os.path.exists(self.ckpt.last) else "none (no checkpoint written yet)")
                            raise TrainingDiverged(
                                f"stopping: {bad_in_row} consecutive optimiser steps were skipped (non-finite loss "
                                f"or gradients; train.max_bad_steps={tc['max_bad_steps']}); last good checkpoint: "
                                f"{last}")
                        continue
                    bad_in_row = 0
                    self.step += 1
                    bar.update(1)
                    if self._logs_at(self.step):
                        values = self._log_train(stats)
                        bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{values['lr']:.2e}", refresh=False)
                    end_of_epoch = self.batches_done == len(self.sampler) or valid_pending
                    if self._validates_at(self.step, end_of_epoch):
                        last_metrics = self._validate_and_save()
                        valid_pending = False
                    if self.step >= tc["max_steps"] or (stop_after is not None and self.step >= stop_after):
                        break
                else:
                    valid_pending = valid_pending or (bool(window) and tc["valid_every"] == "epoch")
                    self.epoch += 1
                    self.batches_done = 0
                    continue
                break
        finally:
            bar.close()
            self.writer.flush()
        self.log.info(f"finished at step {self.step} (epoch {self.epoch}) in {time.time() - started:.1f} s; "
                      f"best {self.best['metric']} = {self.best['value']} at step {self.best['step']}")
        return {"step": self.step, "epoch": self.epoch, "best": dict(self.best), "metrics": last_metrics}

    def _logs_at(self, step: int) -> bool:
        return step % self.tc["log_every"] == 0 or step == self.tc["max_steps"]

    def _validates_at(self, step: int, end_of_epoch: bool) -> bool:
        ve = self.tc["valid_every"]
        return step == self.tc["max_steps"] or (end_of_epoch if ve == "epoch" else step % ve == 0)

    def _progress_bar(self):
        from tqdm import tqdm

        return tqdm(total=self.tc["max_steps"], initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                    disable=not (self.progress and self.dist.is_main), mininterval=1.0)

    def _forward_backward(self, batch: Dict, sync: bool, grad_stats: bool = False) -> Dict:
        """One micro-batch: forward, loss / accum_grad backward. Returns its loss and terms (device tensors), its
        size and, with ``grad_stats``, the per-term gradient statistics (``_term_gradients``)."""
        kw = self._inputs(batch)
        no_sync = self.model.no_sync() if (self.dist.distributed and not sync) else contextlib.nullcontext()
        with no_sync:
            with self._autocast():
                out = self.model(**kw)
            loss = out["loss"]
            terms = dict(out["terms"])
            if grad_stats:
                terms.update(self._term_gradients(out["weighted"]))
            self.scaler.scale(loss / self.tc["accum_grad"]).backward()
        return {"loss": loss.detach(), "terms": terms, "n": len(kw["wav_len"])}

    def _term_gradients(self, weighted: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Norm of each weighted loss term's gradient w.r.t. the shared attention block's parameters, and the
        cosine between every two terms' gradients (``grad_norm/<term>``, ``grad_cos/<a>~<b>``)."""
        params = [p for p in self.raw_model.encoder.parameters() if p.requires_grad]
        scale = self.scaler.get_scale() if self.fp16 else 1.0
        flat = {}
        for name, term in weighted.items():
            grads = torch.autograd.grad(term * scale, params, retain_graph=True, allow_unused=True)
            flat[name] = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                                    for g, p in zip(grads, params)]) / scale
        out = {f"grad_norm/{name}": g.norm() for name, g in flat.items()}
        names = list(flat)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                out[f"grad_cos/{a}~{b}"] = nn.functional.cosine_similarity(flat[a], flat[b], dim=0)
        return out

    def _optimizer_step(self, window: List[Dict]):
        """Clip and step unless the step must be skipped (see the module docstring); one host read.

        Returns (stepped, gradient norm as a 0-d tensor)."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.scaler.unscale_(self.optimizer)
        clip = self.tc["grad_clip"]
        norm = nn.utils.clip_grad_norm_(params, clip if clip and clip > 0 else float("inf"))
        finite = torch.stack([torch.isfinite(w["loss"]) for w in window]).all()
        if not self.fp16:  # fp16: the GradScaler finds and skips non-finite gradients itself
            finite = finite & torch.isfinite(norm)
        flag = D.all_reduce_tensor(finite.float().reshape(1), "min")
        self._lr = self.scheduler.get_last_lr()[0]
        if self.fp16:
            ok = flag.item() == 1
            if ok:
                scale = self.scaler.get_scale()
                self.scaler.step(self.optimizer)
                ok = None
            self.scaler.update()
            if ok is None:
                ok = self.scaler.get_scale() >= scale  # the scaler lowers its scale when it skips a step
        else:
            ok = flag.item() == 1
            if ok:
                self.optimizer.step()
        if ok:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return ok, norm.detach()

    def _window_stats(self, window: List[Dict], grad_norm: torch.Tensor) -> Dict[str, Any]:
        """Utterance-weighted means over the window's micro-batches (device tensors; nothing read yet)."""
        n = sum(w["n"] for w in window)
        stats: Dict[str, Any] = {"loss": sum(w["loss"].double() * w["n"] for w in window) / n}
        for key in window[0]["terms"]:  # gradient statistics come from the first micro-batch only
            parts = [(w["terms"][key].double(), w["n"]) for w in window if key in w["terms"]]
            stats[key] = sum(v * k for v, k in parts) / sum(k for _, k in parts)
        stats["grad_norm"] = grad_norm
        stats["lr"] = getattr(self, "_lr", self.scheduler.get_last_lr()[0])
        stats["utterances"] = n
        return stats

    def _log_train(self, stats: Dict[str, Any]) -> Dict[str, float]:
        """Average the step's statistics over ranks (utterance-weighted), log and write scalars; returns them."""
        keys = [k for k in stats if k not in ("grad_norm", "lr", "utterances")]
        n = float(stats["utterances"])
        t = torch.stack([torch.as_tensor(stats[k], dtype=torch.float64).to(self.device) * n for k in keys]
                        + [torch.tensor(n, dtype=torch.float64, device=self.device)])
        D.all_reduce_tensor(t, "sum")
        host = t.tolist()
        values = {k: host[i] / host[-1] for i, k in enumerate(keys)}
        values.update(grad_norm=float(stats["grad_norm"]), lr=stats["lr"], epoch=float(self.epoch))
        now = time.time()
        if hasattr(self, "_last_log"):
            t0, s0 = self._last_log
            if now > t0:
                values["steps_per_sec"] = (self.step - s0) / (now - t0)
        self._last_log = (now, self.step)
        self.log.info(f"step {self.step}/{self.tc['max_steps']} epoch {self.epoch}: "
                      + " ".join(f"{k} {v:.4g}" for k, v in values.items()))
        self.writer.scalars(values, self.step, prefix="train/")
        return values

    # ------------------------------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self) -> Dict[str, float]:
        """Valid loss, terms and per-branch retrieval recall (collective; every rank returns the same dict)."""
        if self.valid_set is None:
            return {}
        model = self.raw_model
        was_training = model.training
        model.eval()
        branches = list(model.branches)
        sums: Dict[str, float] = {}
        local: Dict[str, Any] = {"index": [], "emb": {b: [] for b in branches}}
        try:
            for batch, idx in zip(self.valid_loader, self.valid_plan):
                with self._autocast():
                    out = model(**self._inputs(batch))
                n = float(len(idx))
                for k, v in [("loss", out["loss"])] + list(out["terms"].items()):
                    sums[k] = sums.get(k, 0.0) + v.detach().double() * n
                sums["_n"] = sums.get("_n", 0.0) + n
                local["index"].extend(idx)
                for b in branches:
                    local["emb"][b].append(out[b].detach().float().cpu())
        finally:
            model.train(was_training)
        keys = sorted(sums)
        t = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64).to(self.device) for k in keys])
        D.all_reduce_tensor(t, "sum")
        total = dict(zip(keys, t.tolist()))
        metrics = {k: v / total["_n"] for k, v in total.items() if k != "_n"}

        parts = D.all_gather_object({"index": local["index"],
                                     "emb": {b: torch.cat(v) for b, v in local["emb"].items()}})
        rows: Dict[int, tuple] = {}  # utterance -> (rank, row); padding repeats are dropped
        for r, part in enumerate(parts):
            for j, i in enumerate(part["index"]):
                rows.setdefault(i, (r, j))
        utts = sorted(rows)
        ds = self.valid_set
        image_ids = sorted({ds.utt2img[ds.utts[i]] for i in utts})
        image_row = {img: k for k, img in enumerate(image_ids)}
        images = torch.stack([torch.tensor(np.asarray(ds.image_embeds[i], dtype=np.float32)).reshape(-1)
                              for i in image_ids])
        images = nn.functional.normalize(images, dim=-1)
        speech2image = torch.tensor([image_row[ds.utt2img[ds.utts[i]]] for i in utts])
        for b in branches:
            speech = torch.stack([parts[rows[i][0]]["emb"][b][rows[i][1]] for i in utts])
            speech = nn.functional.normalize(speech, dim=-1)
            for k, v in recall_at_k(speech, images, speech2image, ks=(1, 5, 10)).items():
                metrics[f"{b}/{k}"] = float(v)
        return metrics

    def _validate_and_save(self) -> Dict[str, float]:
        metrics = self.validate()
        key = self.best["metric"]
        is_best = False
        if metrics:
            if key not in metrics:
                raise ConfigError(f"train.select_metric: '{key}' is not a validation metric; available: "
                                  f"{', '.join(sorted(metrics))}")
            is_best = best_is_better(metrics[key], self.best["value"], self.best["mode"])
            if is_best:
                self.best.update(value=metrics[key], step=self.step)
            self.log.info(f"validation at step {self.step}: "
                          + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()) + (" (best)" if is_best else ""))
            self.writer.scalars(metrics, self.step, prefix="valid/")
        state = self.state_dict()
        if self.dist.is_main:
            # metrics line first: a crash before the checkpoint leaves a line that --resume trims (step > the
            # checkpoint's); the other order would lose the line of a checkpoint written just before a crash
            if metrics:
                self.ckpt.append_metrics({"step": self.step, "epoch": self.epoch, "best": is_best,
                                          "time": round(time.time(), 3), **metrics})
            path = self.ckpt.save(state, self.step, is_best)
            self.log.info(f"saved {path}" + (f" (best {key} {metrics[key]:.4g})" if is_best else ""))
        D.barrier()
        return metrics

    def close(self) -> None:
        """Flush and close the TensorBoard writer and the log files (``train.log``, ``train.rank<k>.log``)."""
        self.writer.close()
        close_logger()


def _diff_keys(a: Any, b: Any, prefix: str) -> List[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}.{k}")
        return out
    return [] if a == b else [prefix]
