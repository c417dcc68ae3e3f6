"""Importing official SpeechCLIP / SpeechCLIP+ checkpoints (``speechclip_plus.bin.import_reference``).

Checkpoints are built in the reference's pickle structure and key layout at tiny sizes
(``reference_checkpoints.py``) for p, c, c+, h and h+, each with one of the reference's layout variants
(TransformerEncoder or MHA + norm block, Linear or MLP projections, 1 or 2 CIF conv layers). The tests check
that every tensor lands where it should, that our forward pass equals a forward computed directly from the
reference tensors, that the config reproduces the reference hyper-parameters, that crafted files are refused
without running anything, and that the result works with from_pretrained, the scorer and s3prl.
"""
from __future__ import annotations

import copy
import hashlib
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from reference_checkpoints import (D_MODEL, LAYOUTS, N_KEYWORDS, TOKEN_DIM, VOCAB, lightning_checkpoint,
                                   reference_config, reference_state, save_reference_checkpoint, tiny_clip_state)

VARIANTS = ["p", "c", "cplus", "h", "hplus"]
BASE = {"p": "parallel_branch.", "c": "cascaded_branch.", "cplus": "cascaded_branch.", "h": "cascaded_branch.",
        "hplus": "cascaded_branch."}
N_CLS = {"p": 1, "c": N_KEYWORDS, "cplus": 0, "h": 1 + N_KEYWORDS, "hplus": 1}
CLS_KEYS = {"p": ["parallel_branch.cls"], "c": ["cascaded_branch.cls"], "cplus": [], "hplus": ["cascaded_branch.cls"],
            "h": ["cascaded_branch.parallel_cls", "cascaded_branch.cascaded_cls"]}  # parallel CLS first
PARALLEL_PROJ = {"p": "parallel_branch.linear_proj.", "h": "cascaded_branch.parallel_proj.",
                 "hplus": "cascaded_branch.parallel_proj."}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEECHCLIP_PLUS_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def parts(tmp_path_factory, tiny_hubert_ckpt):
    """The tiny frozen models, and the importer options that substitute them for HuBERT Base / ViT-B-32."""
    from speechclip_plus.models.tiny import TINY_CLIP_CONFIG

    root = tmp_path_factory.mktemp("refimport")
    clip_state = tiny_clip_state()
    torch.save(clip_state, root / "tiny_clip.pt")
    hubert = torch.load(tiny_hubert_ckpt, weights_only=True)["model_weight"]
    options = ["--upstream", "hubert_local", "--upstream_ckpt", tiny_hubert_ckpt, "--clip", TINY_CLIP_CONFIG,
               "--clip_pretrained", str(root / "tiny_clip.pt")]
    return {"root": root, "clip": clip_state, "hubert": hubert, "options": options}


def write_checkpoint(parts, variant, name, state=None, config="reference", top=None):
    """A reference checkpoint file; ``state``/``config`` default to the variant's tiny reference ones."""
    state = reference_state(variant, parts["hubert"], parts["clip"]) if state is None else state
    config = reference_config(variant) if config == "reference" else config
    ckpt = lightning_checkpoint(state, config)
    ckpt.update(top or {})
    return save_reference_checkpoint(str(parts["root"] / name), ckpt)


def run_import(parts, ckpt, out, *extra):
    from speechclip_plus.bin.import_reference import main

    return main([str(ckpt), "--out", str(out), *parts["options"], *extra])


@pytest.fixture(scope="module")
def imported(parts):
    """Every variant's reference checkpoint imported through the command line."""
    torch.set_num_threads(2)
    out = {}
    for variant in VARIANTS:
        state = reference_state(variant, parts["hubert"], parts["clip"], seed=VARIANTS.index(variant))
        ckpt = write_checkpoint(parts, variant, f"{variant}.ckpt", state)
        model_file = parts["root"] / f"{variant}.pt"
        assert run_import(parts, ckpt, model_file) == 0
        out[variant] = {"ckpt": ckpt, "file": model_file, "state": state}
    return out


def _model(imported, variant):
    """The imported model, loaded once per module (tests only read it)."""
    from speechclip_plus import SpeechCLIPPlus

    entry = imported[variant]
    if "model" not in entry:
        entry["model"] = SpeechCLIPPlus.from_pretrained(entry["file"]).model
    return entry["model"]


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("variant", VARIANTS)
def test_translated_config_reproduces_reference_hyperparameters(imported, variant):
    from speechclip_plus.api import read_model_file

    payload = read_model_file(imported[variant]["file"])
    ref, lay, m, t = reference_config(variant), LAYOUTS[variant], payload["config"]["model"], payload["config"]["train"]
    assert m["variant"] == variant
    enc_type = {"TransformerEncoder": "transformer", "MultiheadAttentionAndNorm": "mha"}[lay["attention"]]
    assert m["encoder"]["type"] == enc_type and m["encoder"]["n_heads"] == lay["heads"]
    assert m["encoder"]["dropout"] == 0.1
    if enc_type == "transformer":
        assert m["encoder"]["n_layers"] == 1 and m["encoder"]["ffn_dim"] == 64
    assert m["retrieval_branch"] == lay["retrieval"]
    assert m["loss"]["learnable_temperature"] is lay["temp_trainable"] and m["loss"]["temperature"] == 0.07
    assert m["max_audio_len"] == 102400
    assert m["upstream"]["normalize_waveform"] is (variant in ("cplus", "hplus"))
    assert m["upstream"]["normalize_hiddenstates"] is (variant == "h")
    w_c, w_p = (ref["model_settings"][k] for k in ("cascaded_objective_weight", "parallel_objective_weight"))
    if variant in ("p", "h", "hplus"):
        assert m["parallel"]["weight"] == w_p
    if variant != "p":
        assert m["cascaded"]["weight"] == w_c and m["cascaded"]["vq_temperature"] == 0.1
        assert m["cascaded"]["projection"] == lay.get("kw_mlp", [0, 0])[1:-1]
    assert m["parallel"]["projection"] == (lay["p_mlp"][1:-1] if variant == "h" else [])
    if variant in ("c", "h"):
        assert m["cascaded"]["n_keywords"] == N_KEYWORDS
    if variant in ("cplus", "hplus"):
        cif = m["cif"]
        assert (cif["conv_layers"], cif["conv_width"]) == (lay["cif_layers"], lay["cif_width"])
        assert cif["dropout"] == 0.5  # nn.Dropout()'s default: the reference never reads conv_cif_dropout
        assert (cif["threshold"], cif["scaling_steps"], cif["tail_threshold"]) == (1.0, 5000, 0.5)
        assert cif["quantity_weight"] == 0.25 and cif["target"] == "duration" and cif["max_keywords"] == 75
    assert (t["batch_size"], t["valid_batch_size"], t["accum_grad"], t["max_steps"]) == (128, 6, 2, 50000)
    assert (t["lr"], t["weight_decay"], t["warmup_steps"], t["final_lr"]) == (1e-4, 1e-6, 5000, 1e-8)
    assert (t["grad_clip"], t["seed"], t["optimizer"]) == (4.0, 7122, "adam")
    assert payload["vocab_ids"] == VOCAB
    meta = payload["meta"]["reference"]
    assert meta["variant"] == variant and meta["global_step"] == 9476 and meta["frozen"] == "check"
    assert meta["sha256"] == hashlib.sha256(Path(imported[variant]["ckpt"]).read_bytes()).hexdigest()


def test_print_config_and_dry_run_build_nothing(parts, imported, tmp_path, capsys):
    ckpt = imported["hplus"]["ckpt"]
    assert run_import(parts, ckpt, tmp_path / "x.pt", "--print_config") == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["variant"] == "hplus" and printed["model"]["cif"]["conv_layers"] == 1
    assert run_import(parts, ckpt, tmp_path / "x.pt", "--dry_run") == 0
    assert not (tmp_path / "x.pt").exists()


def test_large_upstream_takes_the_raw_last_layer(parts, tmp_path, capsys):
    """The reference's HuBERT Large states end with the last layer's raw output (no final LayerNorm)."""
    config = reference_config("hplus")
    config["audio_encoder"]["name"] = "hubert_large_ll60k"
    ckpt = write_checkpoint(parts, "hplus", "large.ckpt", config=config)
    assert run_import(parts, ckpt, tmp_path / "x.pt", "--print_config") == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["upstream"]["raw_last_layer"] is True
    assert run_import(parts, write_checkpoint(parts, "hplus", "base.ckpt"), tmp_path / "y.pt", "--print_config") == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["upstream"]["raw_last_layer"] is False


# ---------------------------------------------------------------------------------------------- placement
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_reference_tensor_lands_in_place(imported, variant):
    from speechclip_plus.api import read_model_file

    ref = imported[variant]["state"]
    ours = _model(imported, variant).state_dict()
    b = BASE[variant]
    assert torch.equal(ours["upstream.layer_weights"], ref["audio_encoder.weightedsum_layer.weights"])
    cls_keys = CLS_KEYS[variant]
    if cls_keys:
        assert torch.equal(ours["cls"], torch.cat([ref[k] for k in cls_keys], 1))
    else:
        assert "cls" not in ours
    for key, value in ref.items():
        if key.startswith(b + "self_att.multihead_attn_layer."):
            assert torch.equal(ours["encoder.attn." + key.split("multihead_attn_layer.")[1]], value), key
        elif key.startswith(b + "self_att.attentionBlock_Norm."):
            assert torch.equal(ours["encoder.norm." + key.split("attentionBlock_Norm.")[1]], value), key
        elif key.startswith(b + "self_att.model."):
            assert torch.equal(ours["encoder.layers." + key.split("self_att.model.")[1]], value), key
        elif key.startswith("audio_encoder.encoder."):
            assert torch.equal(ours["upstream.upstream.model." + key[len("audio_encoder.encoder."):]], value), key
        elif key.startswith("clip.model.") and key != "clip.model.token_embedding.weight":
            assert torch.equal(ours["clip.clip." + key[len("clip.model."):]], value), key
    table = ours["clip.clip.token_embedding.weight"]
    assert torch.equal(table[torch.tensor(VOCAB)], ref["clip.model.token_embedding.weight"])
    assert torch.equal(table, ref["clip.original_text_emb_weight"])
    keyword_proj = "cascaded_branch.linear_proj." if variant != "p" else None
    for name, prefix in (("parallel.proj.", PARALLEL_PROJ.get(variant)), ("keywords.proj.", keyword_proj)):
        if prefix is None:
            continue
        mine = {k[len(name):]: v for k, v in ours.items() if k.startswith(name)}
        theirs = {k[len(prefix):].replace("sequential.", ""): v for k, v in ref.items() if k.startswith(prefix)}
        assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine), name
    if variant != "p":
        for stat in ("weight", "bias", "running_mean", "running_var"):
            theirs, mine = ref[f"cascaded_branch.bn_layer.bn_layer.{stat}"], ours[f"keywords.bn.bn.{stat}"]
            if variant in ("c", "h"):  # reference index d*K + k, ours k*D + d
                for k, d in ((0, 0), (1, 0), (0, 1), (N_KEYWORDS - 1, TOKEN_DIM - 1), (2, 5)):
                    assert mine[k * TOKEN_DIM + d] == theirs[d * N_KEYWORDS + k], (stat, k, d)
                assert not torch.equal(mine, theirs)
            else:
                assert torch.equal(mine, theirs)
    if variant in ("cplus", "hplus"):
        for i in range(LAYOUTS[variant]["cif_layers"]):
            assert torch.equal(ours[f"cif.convs.{i}.weight"], ref[f"cascaded_branch.downsampling.conv.{3 * i}.weight"])
        assert torch.equal(ours["cif.proj.weight"], ref["cascaded_branch.downsampling.weight_proj.1.weight"])
    if LAYOUTS[variant]["temp_trainable"]:
        assert torch.equal(ours["contrastive.log_scale"], ref["criterion.temperature"])
    else:
        assert math.isclose(float(ours["contrastive.log_scale"]), math.log(1 / 0.07), rel_tol=1e-6)
    # the meta accounts for every reference key exactly once: mapped, frozen or ignored with a reason
    meta = read_model_file(imported[variant]["file"])["meta"]["reference"]
    mapped = {k.strip() for v in meta["mapped"].values() for k in v.split(",")}
    ignored = {k for keys in meta["ignored"].values() for k in keys}
    frozen = {k for k in ref if k.startswith(("audio_encoder.encoder.", "clip.model.", "clip.original_text"))}
    assert not (mapped & ignored) and not (mapped & frozen) and not (ignored & frozen)
    assert mapped | ignored | frozen == set(ref)


# ---------------------------------------------------------------------------------------------- forward
def _mha(x, pad, ref, prefix, heads):
    out, _ = F.multi_head_attention_forward(
        x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), D_MODEL, heads, ref[prefix + "in_proj_weight"],
        ref[prefix + "in_proj_bias"], None, None, False, 0.0, ref[prefix + "out_proj.weight"],
        ref[prefix + "out_proj.bias"], training=False, key_padding_mask=pad, need_weights=False)
    return out.transpose(0, 1)


def reference_attention(src, pad, ref, b, kind, heads):
    """The reference's attention block computed from its tensors with torch.nn.functional."""
    ln = lambda x, p: F.layer_norm(x, (D_MODEL,), ref[p + "weight"], ref[p + "bias"], 1e-5)  # noqa: E731
    if kind == "MultiheadAttentionAndNorm":
        return ln(src + _mha(src, pad, ref, b + "self_att.multihead_attn_layer.", heads),
                  b + "self_att.attentionBlock_Norm.")
    p = b + "self_att.model.layers.0."
    x = ln(src + _mha(src, pad, ref, p + "self_attn.", heads), p + "norm1.")
    ff = F.linear(F.gelu(F.linear(x, ref[p + "linear1.weight"], ref[p + "linear1.bias"])),
                  ref[p + "linear2.weight"], ref[p + "linear2.bias"])
    return ln(ln(x + ff, p + "norm2."), b + "self_att.model.norm.")


def reference_projection(x, ref, prefix):
    """A reference Linear, or its MLP (Linear, ReLU, Dropout, ..., Linear) in eval mode."""
    if prefix + "weight" in ref:
        return F.linear(x, ref[prefix + "weight"], ref[prefix + "bias"])
    i = 0
    while f"{prefix}sequential.{i}.weight" in ref:
        x = F.linear(x, ref[f"{prefix}sequential.{i}.weight"], ref[f"{prefix}sequential.{i}.bias"])
        if f"{prefix}sequential.{i + 3}.weight" in ref:
            x = F.relu(x)
        i += 3
    return x


def reference_keywords(kw, ref, clip):
    """Fixed-K keyword path: projection, d-major BatchNorm (eval), cosine VQ with the positional special-token
    mask [0, 2, 3], then the text encoder over CLIP's 77 positions with reduced SOT/EOT ids (2, 3)."""
    bsz, k = kw.shape[:2]
    z = reference_projection(kw, ref, "cascaded_branch.linear_proj.")
    bn = "cascaded_branch.bn_layer.bn_layer."
    flat = z.permute(0, 2, 1).reshape(bsz, -1)
    flat = (flat - ref[bn + "running_mean"]) / torch.sqrt(ref[bn + "running_var"] + 1e-5) * ref[bn + "weight"] \
        + ref[bn + "bias"]
    z = flat.reshape(bsz, TOKEN_DIM, k).permute(0, 2, 1)
    table = ref["clip.model.token_embedding.weight"]
    cos = F.cosine_similarity(z[:, :, None, :], table[None, None], dim=-1)
    cos[..., [0, 2, 3]] = float("-inf")
    reduced_ids = cos.argmax(-1)
    tokens = torch.zeros(bsz, 77, dtype=torch.long)
    tokens[:, 0], tokens[:, k + 1] = 2, 3
    x = table[tokens]
    x[:, 1:k + 1] = table[reduced_ids]
    x = x + clip.positional_embedding
    x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))
    emb = F.normalize(x[:, k + 1] @ clip.text_projection, dim=-1)
    return torch.tensor(VOCAB)[reduced_ids], emb


def reference_cif_alpha(frames, ref, layers, width):
    x = frames.transpose(1, 2)
    for i in range(layers):
        p = f"cascaded_branch.downsampling.conv.{3 * i}."
        x = F.relu(F.conv1d(x, ref[p + "weight"], ref[p + "bias"], padding=width // 2))
    p = "cascaded_branch.downsampling.weight_proj.1."
    return torch.sigmoid(F.linear(x.transpose(1, 2), ref[p + "weight"], ref[p + "bias"])).squeeze(-1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_equals_direct_computation_from_reference_tensors(imported, variant):
    """Two utterances of equal length (no padding, where our fixes and the reference coincide)."""
    from speechclip_plus.api import eval_forward

    model = _model(imported, variant)
    model.upstream.per_utterance = True
    ref, lay, b = imported[variant]["state"], LAYOUTS[variant], BASE[variant]
    g = torch.Generator().manual_seed(5)
    wav = 0.1 * torch.randn(2, 16000, generator=g)
    lens = torch.tensor([16000, 16000])
    out = eval_forward(model, wav, lens)
    with torch.no_grad():
        states, _ = model.upstream.hidden_states(wav, lens)  # the frozen HuBERT: checked equal to the reference's
        stacked = torch.stack(states)
        if variant == "h":  # normalize_hiddenstates
            stacked = F.layer_norm(stacked, (D_MODEL,))
        w = torch.softmax(ref["audio_encoder.weightedsum_layer.weights"], 0)
        feats = (w[:, None, None, None] * stacked).sum(0)
        src = torch.cat([ref[k].expand(2, -1, -1) for k in CLS_KEYS[variant]] + [feats], 1)
        enc = reference_attention(src, torch.zeros(2, src.shape[1], dtype=torch.bool), ref, b, lay["attention"],
                                  lay["heads"])
        if variant in ("p", "h", "hplus"):
            want = F.normalize(reference_projection(enc[:, 0], ref, PARALLEL_PROJ[variant]), dim=-1)
            torch.testing.assert_close(out["parallel"], want, atol=1e-5, rtol=1e-4)
        if variant in ("c", "h"):
            start = 1 if variant == "h" else 0
            ids, emb = reference_keywords(enc[:, start:start + N_KEYWORDS], ref, model.clip.clip)
            assert torch.equal(out["keyword_ids"], ids)
            torch.testing.assert_close(out["cascaded"], emb, atol=1e-5, rtol=1e-4)
        if variant in ("cplus", "hplus"):
            alpha = reference_cif_alpha(enc[:, N_CLS[variant]:], ref, lay["cif_layers"], lay["cif_width"])
            torch.testing.assert_close(out["cif_alpha"], alpha, atol=1e-5, rtol=1e-4)
            total = alpha.double().sum(1)
            count = total.floor().clamp(1, 75)
            count = count + ((total - count >= 0.5) & (count < 75)).double()  # tail handling (eval)
            assert out["keyword_lengths"].tolist() == count.long().tolist()


# ---------------------------------------------------------------------------------------------- safety
@pytest.mark.parametrize("where", ["top level", "inside the config namespace"])
@pytest.mark.parametrize("func,name", [(exec, "exec"), (os.system, "system")])
def test_crafted_checkpoint_with_malicious_reduce_is_refused_and_runs_nothing(parts, tmp_path, capsys, where, func,
                                                                               name, crafted):
    marker = tmp_path / "pwned"
    arg = f"open({str(marker)!r}, 'w').write('x')" if func is exec else f"touch {marker}"
    config = reference_config("c")
    top = None
    if where == "top level":
        top = {"callbacks": {"evil": crafted(func, arg)}}
    else:
        config["log_setting"]["hook"] = crafted(func, arg)
    ckpt = write_checkpoint(parts, "c", "evil.ckpt", config=config, top=top)
    out = tmp_path / "model.pt"
    assert run_import(parts, ckpt, out) == 1
    err = capsys.readouterr().err
    assert "refused" in err and name in err and "nothing in the file was executed" in err
    assert not marker.exists() and not out.exists()
    if where == "top level" and func is exec:  # the payload is live: an unrestricted load (child process) runs it
        subprocess.run([sys.executable, "-c", "import sys, torch; torch.load(sys.argv[1], weights_only=False)",
                        ckpt], capture_output=True, timeout=120)
        assert marker.exists()


def test_reference_stand_in_called_by_a_crafted_reduce_stays_inert(parts, tmp_path, crafted):
    """The allow-listed names are inert records: a pickle that *calls* one only stores the arguments."""
    from reference_checkpoints import OrderedNamespace
    from speechclip_plus.reference.checkpoint import InertRecord, load_reference_checkpoint, to_plain

    ckpt = lightning_checkpoint(reference_state("c", parts["hubert"], parts["clip"]), reference_config("c"))
    ckpt["callbacks"] = {"odd": crafted(OrderedNamespace, "rm -rf /")}
    path = save_reference_checkpoint(str(tmp_path / "odd.ckpt"), ckpt)
    loaded = load_reference_checkpoint(path)
    record = loaded["callbacks"]["odd"]
    assert isinstance(record, InertRecord) and record.args == ("rm -rf /",)
    assert to_plain(record) == "<inert avssl.base.ordered_namespace.OrderedNamespace>"
    logger = to_plain(loaded["hyper_parameters"]["config"])["trainer"]["logger"]
    assert logger == "<inert pytorch_lightning.loggers.wandb.WandbLogger>"


def test_unexpected_plain_global_is_refused_unless_allowed(parts, tmp_path, capsys):
    from fractions import Fraction

    config = reference_config("hplus")
    config["log_setting"]["ratio"] = Fraction(1, 3)
    ckpt = write_checkpoint(parts, "hplus", "fraction.ckpt", config=config)
    assert run_import(parts, ckpt, tmp_path / "a.pt") == 1
    assert "'fractions.Fraction'" in capsys.readouterr().err
    assert run_import(parts, ckpt, tmp_path / "b.pt", "--allow_global", "fractions.Fraction") == 0
    assert (tmp_path / "b.pt").is_file()


def test_unreadable_missing_and_configless_checkpoints(parts, imported, tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_text("not a checkpoint")
    assert run_import(parts, bad, tmp_path / "o.pt") == 1
    assert f"{bad}: cannot be read as a PyTorch checkpoint" in capsys.readouterr().err
    assert run_import(parts, tmp_path / "missing.ckpt", tmp_path / "o.pt") == 1
    assert "not found" in capsys.readouterr().err
    # a checkpoint without stored hyper-parameters needs the run's YAML
    state = imported["cplus"]["state"]
    bare = write_checkpoint(parts, "cplus", "bare.ckpt", state=state, config=None)
    assert run_import(parts, bare, tmp_path / "o.pt") == 1
    assert "pass the run's YAML with --config" in capsys.readouterr().err
    yml = tmp_path / "spchclip_c+.yaml"
    yml.write_text(yaml.safe_dump(reference_config("cplus")))
    assert run_import(parts, bare, tmp_path / "o.pt", "--config", str(yml)) == 0
    from speechclip_plus.api import read_model_file

    a, b = read_model_file(tmp_path / "o.pt"), read_model_file(imported["cplus"]["file"])
    assert a["config"] == b["config"]
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in b["state_dict"])
    assert not (tmp_path / "missing.ckpt").exists() and not list(tmp_path.glob(".o.tmp*"))


# ---------------------------------------------------------------------------------------------- bad keys
def _mutated(parts, variant, change):
    state = copy.copy(reference_state(variant, parts["hubert"], parts["clip"]))
    change(state)
    return state


@pytest.mark.parametrize("change,message", [
    (lambda s: s.__setitem__("cascaded_branch.gate.weight", torch.zeros(3)),
     "reference key cascaded_branch.gate.weight"),
    (lambda s: s.__setitem__("cascaded_branch.parallel_proj.weight", torch.zeros(47, D_MODEL)),
     "reference key cascaded_branch.parallel_proj.weight: shape (47, 32) does not fit our parallel.proj.weight"),
    (lambda s: s.pop("cascaded_branch.linear_proj.bias"), "our keywords.proj.bias receives no tensor"),
    (lambda s: s.pop("cascaded_branch.cls"), "reference key cascaded_branch.cls (CLS tokens of variant hplus)"),
    (lambda s: s.__setitem__("cascaded_branch.clip.model.ln_final.weight", torch.zeros(TOKEN_DIM)),
     "cascaded_branch.clip.model.ln_final.weight: the branch's copy of CLIP differs"),
    (lambda s: s.__setitem__("c_branch_proj_net.sequential.0.weight", torch.zeros(2, 2)),
     "an extra projection network after an encoder is not supported"),
    (lambda s: s.__setitem__("cascaded_branch.vector_quantizer.curr_temp", torch.tensor([0.5])),
     "vector_quantizer.curr_temp is 0.5"),
])
def test_unmapped_missing_or_misshapen_keys_are_errors_naming_them(parts, tmp_path, capsys, change, message):
    ckpt = write_checkpoint(parts, "hplus", "bad_keys.ckpt", state=_mutated(parts, "hplus", change))
    out = tmp_path / "model.pt"
    assert run_import(parts, ckpt, out) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_attention_layout_that_contradicts_the_config_is_an_error(parts, tmp_path, capsys):
    config = reference_config("h")
    config["model_settings"]["cascaded_branch"]["transformer_args"]["type"] = "MultiheadAttentionAndNorm"
    ckpt = write_checkpoint(parts, "h", "layout.ckpt", config=config)
    assert run_import(parts, ckpt, tmp_path / "m.pt") == 1
    err = capsys.readouterr().err
    assert "reference key cascaded_branch.self_att.model.layers.0." in err and "does not have" in err


@pytest.mark.parametrize("key,value", [
    ("model_settings.cascaded_branch.vq.args.temp", "learnable=0.1"),
    ("model_settings.cascaded_branch.type", "KW_CascadedBranch_Integrated"),
    ("audio_encoder.trainable", True),
    ("cl_loss.args.dcl", True),
    ("retrieval.audio_feat_src", "parallel"),
])
def test_reference_config_that_cannot_be_reproduced_is_an_error_naming_the_key(parts, tmp_path, capsys, key, value):
    config = reference_config("c")
    node = config
    *path, last = key.split(".")
    for part in path:
        node = node[part]
    node[last] = value
    ckpt = write_checkpoint(parts, "c", "badcfg.ckpt", config=config)
    assert run_import(parts, ckpt, tmp_path / "m.pt") == 1
    assert f"reference config key '{key}': {value!r}" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- frozen parts
def test_frozen_copy_that_differs_is_refused_or_used_on_request(parts, imported, tmp_path, capsys, caplog):
    import logging

    key = "audio_encoder.encoder.encoder.layers.1.fc2.weight"
    state = _mutated(parts, "hplus", lambda s: s.__setitem__(key, s[key] + 0.5))
    ckpt = write_checkpoint(parts, "hplus", "other_hubert.ckpt", state=state)
    assert run_import(parts, ckpt, tmp_path / "check.pt") == 1
    err = capsys.readouterr().err
    assert f"checkpoint tensor {key} differs from s3prl's hubert_local (max |difference| 0.5)" in err
    with caplog.at_level(logging.INFO, logger="speechclip_plus.import_reference"):
        assert run_import(parts, ckpt, tmp_path / "used.pt", "--frozen", "checkpoint") == 0
    assert "frozen upstream: using the checkpoint's copy" in caplog.text
    from speechclip_plus import SpeechCLIPPlus

    used = SpeechCLIPPlus.from_pretrained(tmp_path / "used.pt")
    torch.testing.assert_close(used.model.state_dict()["upstream.upstream.model.encoder.layers.1.fc2.weight"],
                               state[key])
    wav = 0.1 * torch.randn(8000, generator=torch.Generator().manual_seed(1))
    checked = SpeechCLIPPlus.from_pretrained(imported["hplus"]["file"])
    assert not torch.allclose(used.hidden_states(wav, 16000)[-2], checked.hidden_states(wav, 16000)[-2])


def test_vocabulary_from_file_or_recovered_and_mismatches(parts, imported, tmp_path, capsys):
    from speechclip_plus.api import read_model_file

    ckpt = imported["c"]["ckpt"]
    npy = tmp_path / "text_clip_vocab_usage_byfreq.npy"
    np.save(npy, np.array([[i, 1000 - n] for n, i in enumerate(VOCAB)], dtype=np.int64))
    assert run_import(parts, ckpt, tmp_path / "v.pt", "--vocab", str(npy)) == 0
    assert read_model_file(tmp_path / "v.pt")["vocab_ids"] == read_model_file(imported["c"]["file"])["vocab_ids"]
    shuffled = tmp_path / "shuffled.npy"
    np.save(shuffled, np.array([[i, 1] for i in VOCAB[:4] + VOCAB[5:] + VOCAB[4:5]], dtype=np.int64))
    assert run_import(parts, ckpt, tmp_path / "w.pt", "--vocab", str(shuffled)) == 1
    assert "differs from the full table at the vocabulary's ids" in capsys.readouterr().err
    # a reduced table that no longer matches CLIP's rows and no full table: recovery fails, naming the row
    state = _mutated(parts, "c", lambda s: (s.pop("clip.original_text_emb_weight"),
                                            s.pop("cascaded_branch.clip.original_text_emb_weight"),
                                            s["clip.model.token_embedding.weight"][7].add_(1.0)))
    state["cascaded_branch.clip.model.token_embedding.weight"] = state["clip.model.token_embedding.weight"]
    odd = write_checkpoint(parts, "c", "odd_table.ckpt", state=state)
    assert run_import(parts, odd, tmp_path / "x.pt") == 1
    assert "row 7 of the checkpoint's reduced token table" in capsys.readouterr().err
    assert run_import(parts, odd, tmp_path / "y.pt", "--vocab", str(npy), "--frozen", "checkpoint") == 0
    table = read_model_file(tmp_path / "y.pt")["state_dict"]["clip.clip.token_embedding.weight"]
    assert torch.equal(table[VOCAB[7]], state["clip.model.token_embedding.weight"][7])


def test_half_precision_clip_copy_is_checked_at_its_precision(parts, imported, tmp_path):
    """OpenAI's clip package keeps CLIP in float16 when loaded on a GPU: such copies are compared (and the
    vocabulary recovered) after rounding ours to float16."""
    from speechclip_plus.api import read_model_file

    def halve(s):
        for k in [k for k in s if "clip." in k and s[k].is_floating_point()]:
            s[k] = s[k].half()

    ckpt = write_checkpoint(parts, "c", "half.ckpt", state=_mutated(parts, "c", halve))
    assert run_import(parts, ckpt, tmp_path / "half.pt") == 0
    assert read_model_file(tmp_path / "half.pt")["vocab_ids"] == VOCAB


# ---------------------------------------------------------------------------------------------- use
def test_imported_model_works_with_api_scorer_extract_and_s3prl(imported, tmp_path, registered, make_data_dir):
    import json


    from speechclip_plus import SpeechCLIPPlus
    from speechclip_plus.bin.extract import main as extract_main
    from speechclip_plus.bin.score import main as score_main

    model_file = str(imported["hplus"]["file"])
    api = SpeechCLIPPlus.from_pretrained(model_file)
    wav = 0.1 * torch.randn(12000, generator=torch.Generator().manual_seed(2))
    assert api.embed_speech(wav, 16000).shape == (1, 48) and api.retrieval_branch == "parallel"
    assert all(k["token_id"] in VOCAB for k in api.keywords(wav, 16000))
    data, emb = make_data_dir(tmp_path, "test", n_images=2, caps_per_image=2, seed=4)
    out = tmp_path / "scored"
    assert score_main(["--model", model_file, "--data_dir", str(data), "--image_embeds", str(emb), "--out_dir",
                       str(out), "--num_plots", "0", "--no_progress", "--device", "cpu"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["retrieval"]) == {"parallel", "cascaded", "combined"}
    assert res["model"]["reference"]["checkpoint"] == "hplus.ckpt"
    assert "hplus.pt" in (out / "RESULTS.md").read_text()
    assert extract_main(["--model", model_file, "--data_dir", str(data), "--out_dir", str(tmp_path / "emb"),
                         "--no_progress"]) == 0
    import kaldiio

    vecs = dict(kaldiio.load_scp(str(tmp_path / "emb" / "embed.scp")))
    assert len(vecs) == 4 and all(v.shape == (48,) for v in vecs.values())
    from s3prl.nn import S3PRLUpstream

    with torch.random.fork_rng(devices=[]):
        upstream = S3PRLUpstream("speechclip_plus_local", path_or_url=model_file).eval()
    assert upstream.num_layers == api.model.upstream.num_layers + 1
    with torch.no_grad():
        hs, _ = upstream(wav[None], torch.tensor([len(wav)]))
    want = api.hidden_states(wav, 16000)[-1]
    torch.testing.assert_close(hs[-1][0, :len(want)], want, atol=1e-5, rtol=1e-4)
