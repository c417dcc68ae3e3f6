"""Config loading: defaults, YAML, overrides, validation, path resolution and ``base:`` inheritance."""
import glob
import os

import pytest
import yaml

from speechclip_plus.config import (ConfigError, DEFAULTS, load_config, model_config, parse_overrides,
                                    read_config_files, save_config)

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
    with pytest.raises(ConfigError, match=r"unknown key 'model\.cif\.treshold'") as e:
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


# ---------------------------------------------------------------------------------------------- base: inheritance
def test_base_chain_overrides_key_by_key_and_resolves_paths_in_each_files_dir(tmp_path):
    """root.yaml <- mid/mid.yaml <- top/top.yaml: a nested key of a later file replaces only that key; a list is
    replaced whole; relative paths resolve against the directory of the file that sets them."""
    (tmp_path / "mid").mkdir()
    (tmp_path / "top").mkdir()
    write(tmp_path / "root.yaml", {"model": {"variant": "c", "cif": {"threshold": 0.7, "conv_width": 5},
                                             "clip": {"vocab": "vocab_root.txt"},
                                             "parallel": {"projection": [32, 16]}},
                                   "train": {"lr": 0.5, "batch_size": 4}})
    write(tmp_path / "mid" / "mid.yaml", {"base": "../root.yaml", "model": {"cif": {"threshold": 0.8},
                                                                            "upstream": {"ckpt": "up.pt"}}})
    top = write(tmp_path / "top" / "top.yaml", {"base": "../mid/mid.yaml", "model": {"variant": "cplus",
                                                                                     "parallel": {"projection": [8]}},
                                                "train": {"batch_size": 2}})
    cfg = load_config(top, ["--train.lr", "0.25"])
    m = cfg["model"]
    assert (m["variant"], m["cif"]["threshold"], m["cif"]["conv_width"]) == ("cplus", 0.8, 5)
    assert m["parallel"]["projection"] == [8]
    assert m["clip"]["vocab"] == str(tmp_path / "vocab_root.txt")  # root.yaml's dir
    assert m["upstream"]["ckpt"] == str(tmp_path / "mid" / "up.pt")  # mid.yaml's dir
    assert (cfg["train"]["batch_size"], cfg["train"]["lr"]) == (2, 0.25)  # the file, then the command line
    assert "base" not in cfg and list(cfg) == list(DEFAULTS)


def test_base_missing_cyclic_or_malformed_is_an_error_naming_the_files(tmp_path):
    a = write(tmp_path / "a.yaml", {"base": "b.yaml", "train": {"lr": 0.1}})
    b = write(tmp_path / "b.yaml", {"base": "c.yaml"})
    write(tmp_path / "c.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match=r"a\.yaml: the base configs form a cycle: .*a\.yaml -> .*b\.yaml -> "
                                          r".*c\.yaml -> .*a\.yaml"):
        load_config(a)
    write(tmp_path / "self.yaml", {"base": "self.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(tmp_path / "self.yaml"))
    write(tmp_path / "b.yaml", {"base": "gone.yaml"})
    with pytest.raises(ConfigError, match=rf"{b}: base config 'gone\.yaml' not found \({tmp_path / 'gone.yaml'}\)"):
        load_config(a)
    write(tmp_path / "b.yaml", {"base": "no_such_packaged_config"})
    with pytest.raises(ConfigError, match=r"base config 'no_such_packaged_config' not found .*packaged config name: "
                                          r".*base_hplus"):
        load_config(a)
    write(tmp_path / "b.yaml", {"base": ["x.yaml"]})
    with pytest.raises(ConfigError, match=rf"{b}: 'base' must be a config file or a packaged config name"):
        load_config(a)
    write(tmp_path / "b.yaml", {"model": {"base": "c.yaml"}})  # only a file's top level names a base
    with pytest.raises(ConfigError, match=rf"{b}: unknown key 'model.base'"):
        load_config(a)
    write(tmp_path / "b.yaml", {"train": {"lrr": 1}})  # errors inside a base name the base
    with pytest.raises(ConfigError, match=rf"{b}: unknown key 'train.lrr'"):
        load_config(a)


def test_a_packaged_config_name_is_a_base(tmp_path):
    mine = write(tmp_path / "mine.yaml", {"base": "base_hplus", "train": {"lr": 5.0e-5}})
    cfg, packaged = load_config(mine), load_config(os.path.join(CONF_DIR, "base_hplus.yaml"))
    assert cfg["train"]["lr"] == 5.0e-5
    assert {**cfg, "train": {**cfg["train"], "lr": packaged["train"]["lr"]}} == packaged


def test_print_config_and_saved_config_are_resolved_without_base(tmp_path, capsys):
    from speechclip_plus.bin.show_config import main as show
    from speechclip_plus.bin.train import main as train

    mine = write(tmp_path / "mine.yaml", {"base": "tiny_cplus", "model": {"cif": {"threshold": 0.9}}})
    assert train(["--config", mine, "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert "base" not in printed and printed == load_config(mine)
    assert printed["model"]["variant"] == "cplus" and printed["model"]["cif"]["threshold"] == 0.9
    assert show(["--config", mine]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == printed
    save_config(load_config(mine), str(tmp_path / "exp" / "config.yaml"))
    saved = (tmp_path / "exp" / "config.yaml").read_text()
    assert "base:" not in saved and load_config(str(tmp_path / "exp" / "config.yaml")) == printed


def _shipped_configs():
    """Every toolkit config the repository ships (not the s3prl feature configs beside them)."""
    found = []
    for conf_dir in [CONF_DIR] + sorted(glob.glob(os.path.join(REPO, "egs", "*", "conf"))):
        for name in sorted(os.listdir(conf_dir)):
            path = os.path.join(conf_dir, name)
            if name.endswith(".yaml") and set(yaml.safe_load(open(path)) or {}) <= {"model", "train", "data", "base"}:
                found.append(os.path.relpath(path, REPO))
    return found


@pytest.mark.parametrize("rel", _shipped_configs())
def test_every_shipped_config_resolves_within_its_own_directory(rel):
    """Each resolves; its bases all sit in its own conf/ (a recipe's conf/ is what it runs); a variant config
    carries the variant its name says and a header comment; a shared base names no variant."""
    path = os.path.join(REPO, rel)
    files = [f for f, _ in read_config_files(path)]
    assert {os.path.dirname(os.path.abspath(f)) for f in files} == {os.path.dirname(os.path.abspath(path))}
    cfg = load_config(path)
    assert "base" not in cfg and model_config(cfg)["variant"] in VARIANTS
    stem = os.path.basename(rel)[:-5]
    text = open(path).read()
    if stem.endswith("_common"):
        assert "variant" not in (yaml.safe_load(text).get("model") or {}) and len(files) == 1
    else:
        assert stem.rsplit("_", 1)[1] == cfg["model"]["variant"] and text.startswith("# ")
        assert len(files) == 2 and files[0].endswith(f"{stem.split('_')[0]}_common.yaml")


@pytest.mark.parametrize("conf_dir", [CONF_DIR, os.path.join(REPO, "egs", "flickr8k", "conf"),
                                      os.path.join(REPO, "egs", "spokencoco", "conf")])
def test_each_size_shares_its_frozen_models_and_training_through_its_common_base(conf_dir):
    """What a base_/large_common.yaml states holds in every config of that size, and no variant config states it
    again (each states only what differs)."""
    for size, upstream, clip in (("base", "hubert_base", "ViT-B-32"), ("large", "hubert_large_ll60k", "ViT-L-14")):
        common = yaml.safe_load(open(os.path.join(conf_dir, f"{size}_common.yaml")))
        for v in VARIANTS:
            path = os.path.join(conf_dir, f"{size}_{v}.yaml")
            own, cfg = yaml.safe_load(open(path)), load_config(path)
            assert own["base"] == f"{size}_common.yaml"
            assert (cfg["model"]["upstream"]["name"], cfg["model"]["clip"]["name"]) == (upstream, clip)
            for section, values in common.items():
                for key, value in values.items():
                    for sub, leaf in (value.items() if isinstance(value, dict) else [(None, value)]):
                        got = cfg[section][key] if sub is None else cfg[section][key][sub]
                        assert got == leaf, (path, section, key, sub)
                        mine = (own.get(section) or {}).get(key)
                        assert (mine if sub is None else (mine or {}).get(sub)) is None, \
                            f"{path} repeats {section}.{key}{'.' + sub if sub else ''} of {size}_common.yaml"
