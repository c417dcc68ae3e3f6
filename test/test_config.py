"""Config loading: defaults, YAML, overrides, validation and path resolution."""
import os

import pytest
import yaml

from speechclip_plus.config import ConfigError, DEFAULTS, load_config, model_config, parse_overrides, save_config

REPO = os.path.join(os.path.dirname(__file__), "..")
CONF_DIR = os.path.join(REPO, "speechclip_plus", "conf")
VARIANTS = ("p", "c", "cplus", "h", "hplus")


def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_defaults_are_valid():
    cfg = load_config()
    assert cfg == DEFAULTS


def test_yaml_then_overrides_win(tmp_path):
    path = write(tmp_path / "c.yaml", {"model": {"cif": {"threshold": 0.8}}, "train": {"lr": 0.5}})
    cfg = load_config(path, ["--model.cif.threshold", "0.9", "--train.batch_size=4", "--model.parallel.projection",
                             "[16, 8]"])
    assert cfg["model"]["cif"]["threshold"] == 0.9
    assert cfg["train"]["lr"] == 0.5
    assert cfg["train"]["batch_size"] == 4
    assert cfg["model"]["parallel"]["projection"] == [16, 8]
    assert cfg["model"]["cif"]["max_keywords"] == 75  # untouched default


def test_int_accepted_for_float_and_stored_as_float(tmp_path):
    cfg = load_config(None, ["--model.cif.threshold", "1"])
    assert isinstance(cfg["model"]["cif"]["threshold"], float)


def test_unknown_key_lists_valid_keys(tmp_path):
    path = write(tmp_path / "bad.yaml", {"model": {"cif": {"treshold": 1.0}}})
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert path in msg and "model.cif.treshold" in msg and "threshold" in msg and "\n" not in msg


def test_unknown_override_names_key():
    with pytest.raises(ConfigError, match="command line: unknown key 'train.lrr'"):
        load_config(None, ["--train.lrr", "1"])


def test_wrong_type_names_key(tmp_path):
    path = write(tmp_path / "bad.yaml", {"train": {"batch_size": "big"}})
    with pytest.raises(ConfigError, match=r"'train.batch_size' must be int, got str"):
        load_config(path)
    with pytest.raises(ConfigError, match="train.log_grad_norms"):
        load_config(None, ["--train.log_grad_norms", "3"])
    with pytest.raises(ConfigError, match=r"'train.valid_every' must be str or int, got bool"):
        load_config(None, ["--train.valid_every", "true"])
    assert load_config(None, ["--train.valid_every", "7"])["train"]["valid_every"] == 7
    assert load_config(None)["train"]["valid_every"] == "epoch"
    with pytest.raises(ConfigError, match="train.valid_every: 'often'"):
        load_config(None, ["--train.valid_every", "often"])
    with pytest.raises(ConfigError, match="train.precision: 'fp8'"):
        load_config(None, ["--train.precision", "fp8"])


def test_bad_values_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="model.variant"):
        load_config(None, ["--model.variant", "q"])
    with pytest.raises(ConfigError, match="not found: .*nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))
    (tmp_path / "broken.yaml").write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(str(tmp_path / "broken.yaml"))
    with pytest.raises(ConfigError, match="parallel.weight must be > 0"):
        load_config(None, ["--model.variant", "h", "--model.parallel.weight", "0"])
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--train.lr"])


def test_relative_paths_resolve_against_the_yaml_dir(tmp_path):
    sub = tmp_path / "conf"
    sub.mkdir()
    path = write(sub / "c.yaml", {"model": {"clip": {"vocab": "../vocab.txt", "name": "ViT-B-32",
                                                     "pretrained": "openai"}}})
    cfg = load_config(path)
    assert cfg["model"]["clip"]["vocab"] == str(tmp_path / "vocab.txt")
    assert cfg["model"]["clip"]["name"] == "ViT-B-32"  # an architecture name is not a path
    assert cfg["model"]["clip"]["pretrained"] == "openai"


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["--train.lr", "0.003"])
    save_config(cfg, str(tmp_path / "exp" / "config.yaml"))
    assert load_config(str(tmp_path / "exp" / "config.yaml")) == cfg
    assert not [p for p in os.listdir(tmp_path / "exp") if ".tmp" in p]


@pytest.mark.parametrize("name", sorted(os.listdir(CONF_DIR)))
def test_shipped_configs_load(name):
    cfg = load_config(os.path.join(CONF_DIR, name))
    assert model_config(cfg)["variant"] in ("p", "c", "cplus", "h", "hplus")


# The reference's settings per config (ShampooWang/SpeechCLIP_plus config/speechCLIP+/..., atosystem/SpeechCLIP
# config/speechCLIP/...): the branch of retrieval.audio_feat_src, and the loss weights w_p / w_c.
REFERENCE_BRANCH = {
    ("flickr", "base", "h"): "cascaded", ("flickr", "large", "h"): "cascaded", ("coco", "large", "h"): "cascaded",
    ("flickr", "base", "hplus"): "parallel", ("flickr", "large", "hplus"): "cascaded",
    ("coco", "large", "hplus"): "parallel",
}
RECIPE_CONFS = [("flickr", os.path.join(REPO, "egs", "flickr8k", "conf")), ("flickr", CONF_DIR),
                ("coco", os.path.join(REPO, "egs", "spokencoco", "conf"))]


@pytest.mark.parametrize("corpus,conf_dir,name", [(c, d, f"{s}_{v}.yaml") for c, d in RECIPE_CONFS
                                                  for s in ("base", "large") for v in VARIANTS])
def test_reference_configs_carry_the_reference_training(corpus, conf_dir, name):
    cfg = load_config(os.path.join(conf_dir, name))
    size, variant = name[:-5].split("_")
    m, t = cfg["model"], cfg["train"]
    default_branch = "parallel" if variant == "p" else "cascaded"
    expected = REFERENCE_BRANCH.get(("flickr" if size == "base" else corpus, size, variant), default_branch)
    assert m["retrieval_branch"] == expected
    assert t["valid_every"] == "epoch" and t["bucketing"] is False and t["precision"] == "auto"
    assert m["upstream"]["raw_last_layer"] is (size == "large")
    assert m["upstream"]["name"] == ("hubert_base" if size == "base" else "hubert_large_ll60k")
    assert (t["lr"], t["weight_decay"], t["warmup_steps"], t["max_steps"], t["final_lr"], t["grad_clip"],
            t["seed"], t["optimizer"]) == (1e-4, 1e-6, 5000, 50000, 1e-8, 4.0, 7122, "adam")
    assert m["max_audio_len"] == 102400 and m["cascaded"]["vq_temperature"] == 0.1
    assert m["loss"]["per_branch_temperature"] is False
    if variant in ("cplus", "hplus"):
        c = m["cif"]
        assert (c["scaling_steps"], c["quantity_weight"], c["target"], c["dropout"]) == (5000, 0.25, "duration", 0.5)
    weights = (m["parallel"]["weight"], m["cascaded"]["weight"])
    assert weights == ((0.5, 1.5) if (corpus, size, variant) == ("flickr", "large", "hplus") else (1.0, 1.0))
