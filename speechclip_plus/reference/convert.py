"""Official checkpoint -> ``SpeechCLIP`` -> a model file of this toolkit (``model_file.export_model`` format).

Steps of ``import_reference``:
1. Read the checkpoint safely (``checkpoint.load_reference_checkpoint``) and its config (the stored
   hyper-parameters, or ``config_path``); translate the config (``hparams.translate``). ``overrides`` replace
   the upstream / CLIP the config names (tests use tiny stand-ins; a local HuBERT or CLIP file also works).
2. Build our model from the translated config: the frozen HuBERT comes from s3prl and CLIP from open_clip,
   as for any model here.
3. Map the reference tensors (``weights.map_state_dict``). The frozen copies the checkpoint carries are
   compared with s3prl's / open_clip's (``frozen="check"``: every tensor must be equal at the checkpoint's
   precision, else an error names the first one that differs) or loaded instead (``frozen="checkpoint"``).
   Which copy is used is logged and written to the model file's meta.
4. The reduced keyword vocabulary: from ``vocab_path`` (the reference's ``text_clip_vocab_usage_byfreq.npy``
   or our text format), else recovered by matching each row of the checkpoint's reduced token table to the
   full table exactly (bit patterns); rows of the reduced table must equal the full table at those ids.
5. Every trainable tensor of our model must receive a reference tensor of the same shape; the model file is
   written (temporary name, then rename) and read back with ``read_model_file``.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .checkpoint import load_reference_checkpoint, reference_config
from .hparams import RefConfig, translate
from .weights import OUR_CLIP, OUR_UPSTREAM, MappedWeights, map_state_dict

log = logging.getLogger("speechclip_plus.import_reference")
FROZEN_MODES = ("check", "checkpoint")
TOKEN_TABLE = OUR_CLIP + "token_embedding.weight"


class ReferenceImportError(ValueError):
    """An input ``import_reference`` cannot convert (the message names the file and the key)."""


@dataclass
class Overrides:
    """Replace the frozen parts the reference config names (None = keep the translated value)."""

    upstream_name: Optional[str] = None
    upstream_ckpt: Optional[str] = None
    clip_name: Optional[str] = None
    clip_pretrained: Optional[str] = None

    def apply(self, model: Dict[str, Any]) -> None:
        up, clip = model["upstream"], model["clip"]
        if self.upstream_name:
            up["name"] = self.upstream_name
        if self.upstream_ckpt:
            up["ckpt"] = os.path.abspath(self.upstream_ckpt)
        if self.clip_name:
            name = self.clip_name
            clip["name"] = os.path.abspath(name) if name.endswith(".json") else name
        if self.clip_pretrained:
            p = self.clip_pretrained
            clip["pretrained"] = os.path.abspath(p) if os.path.exists(p) else p


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes (recorded so an imported model names the exact checkpoint it came from)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- vocabulary
def _row_keys(table: torch.Tensor) -> torch.Tensor:
    """An exact integer fingerprint per row: sum_d bits(x_d) * w_d over int64 (wrap-around), w fixed."""
    bits = table.detach().float().contiguous().view(torch.int32).long()
    w = torch.randint(-2**31, 2**31, (table.shape[1],), generator=torch.Generator().manual_seed(17))
    return (bits * w).sum(1)


def match_rows(reduced: torch.Tensor, full: torch.Tensor, what: str) -> List[int]:
    """Ids of ``full`` whose rows equal each row of ``reduced`` exactly, at ``reduced``'s precision (a table
    saved in float16 matches CLIP's float32 rows rounded to float16); errors name the first bad row."""
    full = full.to(reduced.dtype)
    if reduced.shape[1] != full.shape[1]:
        raise ReferenceImportError(f"reduced token table has width {reduced.shape[1]}, {what} has {full.shape[1]}")
    keys, order = torch.sort(_row_keys(full))
    want = _row_keys(reduced)
    lo = torch.searchsorted(keys, want, right=False)
    hi = torch.searchsorted(keys, want, right=True)
    ids = []
    for row in range(len(reduced)):
        cands = [int(order[j]) for j in range(int(lo[row]), int(hi[row]))
                 if torch.equal(full[order[j]].float(), reduced[row].float())]
        if len(cands) != 1:
            problem = "matches no row" if not cands else f"matches {len(cands)} rows ({cands[:3]})"
            raise ReferenceImportError(f"row {row} of the checkpoint's reduced token table (clip.model.token_embedding."
                                       f"weight) {problem} of {what}; pass the reference vocabulary with --vocab "
                                       "(avssl/data/<corpus>_stat/text_clip_vocab_usage_byfreq.npy)")
        ids.append(cands[0])
    return ids


def resolve_vocab(vocab_path: Optional[str], reduced: torch.Tensor, full: torch.Tensor,
                  what: str) -> Tuple[List[int], str]:
    """Original CLIP ids of the reduced table's rows, and a description of where they came from."""
    if vocab_path:
        from ..models.clip import load_vocab_usage

        try:
            ids = load_vocab_usage(vocab_path)
        except (OSError, ValueError) as e:
            raise ReferenceImportError(f"--vocab {vocab_path}: {e}") from None
        if len(ids) != len(reduced):
            raise ReferenceImportError(f"--vocab {vocab_path}: {len(ids)} token ids, but the checkpoint's reduced "
                                       f"token table has {len(reduced)} rows (another corpus's vocabulary?)")
        if max(ids) >= len(full):
            raise ReferenceImportError(f"--vocab {vocab_path}: token id {max(ids)} is outside CLIP's {len(full)} "
                                       "tokens")
        return ids, os.path.basename(vocab_path)
    return match_rows(reduced, full, what), f"recovered by matching the reduced table's rows to {what}"


# ---------------------------------------------------------------------------------------------- frozen parts
def _first_difference(ours: Dict[str, torch.Tensor], theirs: Dict[str, torch.Tensor]) -> Optional[Tuple[str, str]]:
    """(our key, description) of the first tensor of ``theirs`` that differs from ``ours`` at its own dtype."""
    for key, t in theirs.items():
        mine = ours[key]
        if tuple(mine.shape) != tuple(t.shape):
            return key, f"shape {tuple(t.shape)} in the checkpoint vs {tuple(mine.shape)}"
        if not torch.equal(mine.to(t.dtype), t):
            diff = (mine.double() - t.double()).abs().max().item()
            return key, f"max |difference| {diff:.3g}"
    return None


def reconcile_frozen(part: str, source: str, ours: Dict[str, torch.Tensor], theirs: Dict[str, torch.Tensor],
                     mode: str, names: Optional[Dict[str, str]] = None) -> Tuple[Dict[str, torch.Tensor], str]:
    """Compare (``check``) or adopt (``checkpoint``) the checkpoint's copy of a frozen part.

    ``names`` maps our keys to the reference keys (for messages). Returns the tensors to load (empty in
    check mode) and the log line describing the choice.
    """
    names = names or {}
    if not theirs:
        return {}, f"{part}: the checkpoint carries no copy; using {source}"
    extra = sorted(set(theirs) - set(ours))
    if extra:
        raise ReferenceImportError(f"{part}: checkpoint tensor {names.get(extra[0], extra[0])} has no counterpart "
                                   f"{extra[0]} in {source} (another model?)")
    missing = sorted(set(ours) - set(theirs))
    diff = _first_difference(ours, theirs)
    if mode == "check":
        if diff is not None:
            raise ReferenceImportError(f"{part}: checkpoint tensor {names.get(diff[0], diff[0])} differs from {source} "
                                       f"({diff[1]}); pass --frozen checkpoint to use the checkpoint's copy instead")
        tail = f" ({len(missing)} of {source}'s tensors are not in the checkpoint)" if missing else ""
        return {}, f"{part}: the checkpoint's copy ({len(theirs)} tensors) equals {source}; using {source}{tail}"
    if missing:
        raise ReferenceImportError(f"{part}: --frozen checkpoint, but the checkpoint lacks {missing[0]} of {source}")
    loaded = {k: v.to(ours[k].dtype) for k, v in theirs.items()}
    same = "equal to" if diff is None else f"differing from ({names.get(diff[0], diff[0])}: {diff[1]})"
    return loaded, f"{part}: using the checkpoint's copy ({len(theirs)} tensors, {same} {source})"


# ---------------------------------------------------------------------------------------------- assembly
def _trainable_targets(model, cfg_model: Dict[str, Any]) -> List[str]:
    """Our state keys that must come from the reference (everything but frozen parts and derived buffers)."""
    skip = {"clip.vocab_ids"}
    if not cfg_model["loss"]["learnable_temperature"]:
        skip.add("contrastive.log_scale")  # a buffer set from model.loss.temperature
    return [k for k in model.state_dict() if not k.startswith((OUR_UPSTREAM, OUR_CLIP)) and k not in skip]


def _fill_trainable(state: Dict[str, torch.Tensor], mapped, targets: Sequence[str]) -> None:
    for ours, t in mapped.trainable.items():
        ref = mapped.sources[ours]
        if ours not in state:
            raise ReferenceImportError(f"reference key {ref} maps to our {ours}, which the model built from the "
                                       "translated config does not have (attention block type, projection sizes or "
                                       "variant differ)")
        if tuple(state[ours].shape) != tuple(t.shape):
            raise ReferenceImportError(f"reference key {ref}: shape {tuple(t.shape)} does not fit our {ours} "
                                       f"{tuple(state[ours].shape)}")
        state[ours] = t.to(state[ours].dtype)
    missing = [k for k in targets if k not in mapped.trainable]
    if missing:
        raise ReferenceImportError(f"our {missing[0]} receives no tensor: the checkpoint lacks the reference key "
                                   f"that maps to it (see the key table in speechclip_plus/reference/weights.py)")


@dataclass
class Prepared:
    """A checkpoint read, its config translated and its tensors mapped (no model built yet)."""

    path: str
    ckpt: Dict[str, Any]
    source: str  # where the reference config came from
    cfg: Dict[str, Any]  # our resolved config
    variant: str
    notes: List[str]
    mapped: MappedWeights


def prepare(ckpt_path: str, config_path: Optional[str] = None, overrides: Optional[Overrides] = None,
            allow_globals: Sequence[str] = ()) -> Prepared:
    """Steps 1 and 3 without the frozen models: read, translate, map (every check that needs no download)."""
    from ..config import ConfigError, load_config, read_yaml

    ckpt = load_reference_checkpoint(ckpt_path, allow_globals)
    if config_path:
        try:
            ref, source = read_yaml(config_path), config_path
        except ConfigError as e:
            raise ReferenceImportError(str(e)) from None
    else:
        ref, source = reference_config(ckpt, ckpt_path), f"{ckpt_path}: hyper_parameters['config']"
    data, variant, notes = translate(ref, source)
    r = RefConfig(ref, source)
    is_large = "large" in str(r.get("audio_encoder.name", ""))
    if is_large:  # the reference's states: the last layer's raw output, not s3prl's final LayerNorm of it
        data["model"]["upstream"]["raw_last_layer"] = True
    (overrides or Overrides()).apply(data["model"])
    try:
        cfg = load_config(data=data)
    except ConfigError as e:
        raise ReferenceImportError(f"translated config of {source} is invalid: {e}") from None
    mcfg = cfg["model"]
    mapped = map_state_dict(ckpt["state_dict"], variant, mcfg["cascaded"]["n_keywords"],
                            str(r.get("audio_encoder.type")))
    temp = mcfg["cascaded"]["vq_temperature"]
    if mapped.vq_temperature is not None and not math.isclose(mapped.vq_temperature, temp, rel_tol=1e-6):
        raise ReferenceImportError(f"{ckpt_path}: vector_quantizer.curr_temp is {mapped.vq_temperature}, the config "
                                   f"says {temp}")
    return Prepared(ckpt_path, ckpt, source, cfg, variant, notes, mapped)


def import_reference(ckpt_path: str, out: str, config_path: Optional[str] = None, vocab_path: Optional[str] = None,
                     frozen: str = "check", overrides: Optional[Overrides] = None,
                     allow_globals: Sequence[str] = ()) -> Dict[str, Any]:
    """Convert one official checkpoint into the model file ``out``; returns a summary (also in the meta)."""
    from ..model_file import export_model, read_model_file
    from ..models.speechclip import SpeechCLIP

    if frozen not in FROZEN_MODES:
        raise ReferenceImportError(f"--frozen {frozen!r}: expected one of {', '.join(FROZEN_MODES)}")
    p = prepare(ckpt_path, config_path, overrides, allow_globals)
    ckpt, cfg, variant, notes, mapped, source = p.ckpt, p.cfg, p.variant, p.notes, p.mapped, p.source
    mcfg = cfg["model"]

    log.info("building %s (%s, %s) with the frozen upstream %s and CLIP %s", variant, ckpt_path, source,
             mcfg["upstream"]["name"], mcfg["clip"]["name"])
    model = SpeechCLIP(mcfg, vocab_ids=None)
    state = model.state_dict()
    frozen_log = []
    ours_up = {k: v for k, v in state.items() if k.startswith(OUR_UPSTREAM)}
    up_name, clip_name = mcfg["upstream"]["name"], os.path.basename(str(mcfg["clip"]["name"]))
    load_up, msg = reconcile_frozen("frozen upstream", f"s3prl's {up_name}", ours_up,
                                    mapped.upstream, frozen, mapped.frozen_sources)
    frozen_log.append(msg)
    ours_clip = {k: v for k, v in state.items() if k.startswith(OUR_CLIP) and k != TOKEN_TABLE}
    load_clip, msg = reconcile_frozen("frozen CLIP", f"open_clip's {clip_name}", ours_clip, mapped.clip,
                                      frozen, mapped.frozen_sources)
    frozen_log.append(msg)

    table = state[TOKEN_TABLE]
    if mapped.full_table is not None:
        load_table, msg = reconcile_frozen("CLIP token table", f"open_clip's {clip_name}",
                                           {TOKEN_TABLE: table}, {TOKEN_TABLE: mapped.full_table}, frozen,
                                           mapped.frozen_sources)
        frozen_log.append(msg)
        table = load_table.get(TOKEN_TABLE, table)
    ids, vocab_source = resolve_vocab(vocab_path, mapped.reduced_table, table, "the full CLIP token table")
    rows = table[torch.tensor(ids)]
    if not torch.equal(rows.to(mapped.reduced_table.dtype), mapped.reduced_table):
        if frozen == "check":
            raise ReferenceImportError(f"the checkpoint's reduced token table differs from the full table at the "
                                       f"vocabulary's ids ({vocab_source}); wrong --vocab, or pass --frozen checkpoint")
        table = table.clone()
        table[torch.tensor(ids)] = mapped.reduced_table.to(table.dtype)
    frozen_log.append(f"keyword vocabulary: {len(ids)} tokens, {vocab_source}")

    model.clip.vocab_ids = torch.tensor(ids, dtype=torch.long)
    state = model.state_dict()
    state.update(load_up)
    state.update(load_clip)
    state[TOKEN_TABLE] = table
    targets = _trainable_targets(model, mcfg)
    _fill_trainable(state, mapped, targets)
    model.load_state_dict(state)  # strict; the CLIP post-load hook rebuilds the vocabulary maps
    model.eval()
    scale = float(model.contrastive.log_scale.detach().exp())
    if scale > mcfg["loss"]["max_logit_scale"]:
        notes.append(f"logit scale exp(criterion.temperature) = {scale:.4g} exceeds model.loss.max_logit_scale="
                     f"{mcfg['loss']['max_logit_scale']} (the reference has no clamp); training from this model "
                     "clamps it")
    for line in frozen_log + notes:
        log.info("%s", line)

    summary = {
        "checkpoint": os.path.basename(ckpt_path),
        "sha256": file_sha256(ckpt_path),
        "epoch": ckpt.get("epoch") if isinstance(ckpt.get("epoch"), int) else None,
        "global_step": ckpt.get("global_step") if isinstance(ckpt.get("global_step"), int) else None,
        "variant": variant,
        "config": os.path.basename(config_path) if config_path else "hyper_parameters['config']",
        "frozen": frozen,
        "frozen_log": frozen_log,
        "notes": notes,
        "mapped": {k: mapped.sources[k] for k in sorted(mapped.sources)},
        "ignored": copy.deepcopy(mapped.ignored),
    }
    meta = {"checkpoint": summary["checkpoint"], "step": summary["global_step"], "reference": summary}
    export_model(model, cfg, out, meta=meta)
    read_model_file(out)
    n_ignored = sum(len(v) for v in mapped.ignored.values())
    log.info("%d reference tensors mapped, %d frozen tensors %s, %d ignored -> %s", len(mapped.sources),
             len(mapped.upstream) + len(mapped.clip), "loaded" if frozen == "checkpoint" else "checked",
             n_ignored, out)
    return summary
