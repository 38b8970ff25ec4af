import pytest
import yaml

from qlora_lab.config import (
    DEFAULT_DATA,
    DEFAULT_MODEL,
    RunConfig,
    config_from_dict,
    load_yaml,
    parse_overrides,
)
from qlora_lab.errors import UserError


def test_defaults_are_the_seed_recipe():
    cfg = RunConfig()
    assert cfg.model.name == DEFAULT_MODEL and cfg.data.source == DEFAULT_DATA
    assert (cfg.quant.bits, cfg.quant.quant_type, cfg.quant.double_quant) == (4, "nf4", True)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 32, 0.0)
    assert cfg.lora.target_modules == "all-linear"
    assert cfg.train.learning_rate == 4e-4 and cfg.train.lr_scheduler == "cosine"
    assert cfg.train.gradient_checkpointing and cfg.data.max_seq_len == 1024
    assert cfg.data.eval_fraction > 0


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"lora": {"r": 8}, "train": {"learning_rate": "1e-3"}}))
    cfg = config_from_dict(load_yaml(path))
    assert cfg.lora.r == 8 and cfg.train.learning_rate == 1e-3
    cfg = config_from_dict(parse_overrides(["lora.r=32", "train.max_steps=5"]), cfg)
    assert cfg.lora.r == 32 and cfg.train.max_steps == 5 and cfg.train.learning_rate == 1e-3


@pytest.mark.parametrize("values, fragment", [
    ({"lora": {"rank": 8}}, "unknown config key lora.rank"),
    ({"loras": {}}, "unknown config section 'loras'"),
    ({"lora": {"r": "big"}}, "lora.r = 'big' has the wrong type"),
    ({"lora": {"r": 0}}, "lora.r = 0 is invalid"),
    ({"quant": {"bits": 8}}, "quant.bits = 8 is invalid"),
    ({"train": {"micro_batch_size": -1}}, "train.micro_batch_size = -1"),
    ({"train": {"gradient_checkpointing": "yes"}}, "wrong type"),
    ({"data": "x"}, "config section data must be a mapping"),
])
def test_bad_values_are_one_line_errors(values, fragment):
    with pytest.raises(UserError) as err:
        config_from_dict(values)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_malformed_set_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="--set 'lora' is malformed"):
        parse_overrides(["lora"])
    with pytest.raises(UserError, match="does not exist"):
        load_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        load_yaml(bad)


@pytest.mark.parametrize("text, fragment", [
    ("lora:\n\tr: 8\n", "line 2, column 1: found character '\\t'"),
    ("lora: [1, 2\n", "line 2, column 1: expected ',' or ']'"),
    ("lora:\n  r: 8\nlora:\n  alpha: 4\n", "line 3: key 'lora' is given twice"),
    ("lora:\n  r: 8\n  r: 64\n", "line 3: key 'r' is given twice"),
    ("{lora: {r: 8}, lora: {r: 16}}\n", "line 1: key 'lora' is given twice"),
])
def test_yaml_mistakes_name_their_line(tmp_path, text, fragment):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(UserError) as err:
        load_yaml(bad)
    assert fragment in str(err.value) and str(bad) in str(err.value)
    assert "\n" not in str(err.value)


def test_an_anchor_used_twice_is_not_a_duplicate(tmp_path):
    ok = tmp_path / "ok.yaml"
    ok.write_text("lora: &l {r: 8, alpha: 16}\nother: [*l, *l]\n")
    assert load_yaml(ok)["lora"] == {"r": 8, "alpha": 16}


@pytest.mark.parametrize("value", ["[q_proj,v_proj]", "[q_proj, v_proj]", "q_proj,v_proj"])
def test_set_takes_lists(value):
    cfg = config_from_dict(parse_overrides([f"lora.target_modules={value}"]))
    assert cfg.lora.target_modules == "q_proj,v_proj"
    from_yaml = config_from_dict({"lora": {"target_modules": ["q_proj", "v_proj"]}})
    assert from_yaml == cfg


@pytest.mark.parametrize("value", ["[all-linear,q_proj]", "q_proj, all-linear"])
def test_all_linear_mixed_with_names_is_one_line(value):
    # It had been read as a layer named "all-linear", which no model has.
    with pytest.raises(UserError, match="'all-linear' alone, or layer names without it"):
        config_from_dict(parse_overrides([f"lora.target_modules={value}"]))
    assert config_from_dict(parse_overrides(["lora.target_modules=[all-linear]"])
                            ).lora.target_names() is None


def test_lab_and_config_share_one_set_grammar():
    from qlora_lab.config import set_list, split_set_pair
    from qlora_lab.lab import parse_overrides as lab_overrides

    # The same text reads as the same value whichever command it is given to.
    for text in ("8", "2e-4", "true", "[0, 1]", "a b", "x=y"):
        (_, config_value), (_, lab_value) = (split_set_pair(f"lora.r={text}", 2),
                                             split_set_pair(f"seeds={text}", 1))
        assert config_value == lab_value
    assert set_list("0, 1") == set_list([0, 1]) == [0, 1] and set_list(7) == [7]
    assert lab_overrides(["seeds=[0, 1]"]) == lab_overrides(["seeds=0,1"]) == {"seeds": (0, 1)}
    assert lab_overrides(["quant_variants=[nf4, 16bit]"]) == {"quant_variants": ("nf4", "16bit")}
    for bad in ("stability_steps=7.5", "seeds=[0, x]", "learning_rate=.nan"):
        with pytest.raises(UserError, match="lab --set"):
            lab_overrides([bad])


@pytest.mark.parametrize("mix", [",,,", " , ", "[]"])
def test_a_mix_that_names_no_source_is_refused_in_one_line(mix):
    with pytest.raises(UserError, match=r"config key data\.mix .*is invalid") as info:
        config_from_dict({"data": {"mix": mix}})
    assert "\n" not in str(info.value)


def test_deep_yaml_is_refused_whatever_the_recursion_limit():
    """torch.compile raises the interpreter's recursion limit; the depth bound must not move."""
    import sys

    from qlora_lab.config import MAX_YAML_DEPTH, parse_yaml_text

    def nested(levels: int) -> str:
        return "".join("  " * i + "k:\n" for i in range(levels)) + "  " * levels + "v"

    original = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)
    try:
        with pytest.raises(UserError, match="nested too deeply"):
            parse_yaml_text(nested(700), "config.yaml")
        assert parse_yaml_text(nested(MAX_YAML_DEPTH - 1), "config.yaml") is not None
    finally:
        sys.setrecursionlimit(original)


@pytest.mark.parametrize("value,expected", [("auto", "auto"), (True, True), (False, False)])
def test_compile_takes_a_bool_or_auto(value, expected):
    assert config_from_dict({"train": {"compile": value}}).train.compile == expected


def test_compile_refuses_other_words_in_one_line():
    with pytest.raises(UserError, match=r"train\.compile = 'yes' has the wrong type: expected "
                                        r"bool or 'auto'"):
        config_from_dict({"train": {"compile": "yes"}})
