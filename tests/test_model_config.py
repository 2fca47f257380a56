"""PalmConfig: presets with Table 1's shapes, validation messages, overrides."""

from __future__ import annotations

import dataclasses

import pytest

from pathways_lite.model.config import PRESETS, PalmConfig


@pytest.mark.parametrize(
    ("name", "layers", "heads", "d_model", "d_ff"),
    [
        ("palm-8b", 32, 16, 4096, 16384),
        ("palm-62b", 64, 32, 8192, 32768),
        ("palm-540b", 118, 48, 18432, 73728),
    ],
)
def test_paper_presets_have_table1_shapes(name, layers, heads, d_model, d_ff):
    cfg = PalmConfig.from_preset(name)
    assert (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.mlp_dim) == (layers, heads, d_model, d_ff)
    assert cfg.head_dim == 256
    assert cfg.vocab_size == 256_000
    assert cfg.norm == "rms" and cfg.rope_base == 10_000.0 and cfg.z_loss == 1e-4


def test_presets_registry_and_classmethods_agree():
    assert set(PRESETS) == {"palm-8b", "palm-62b", "palm-540b", "palm-tiny", "palm-small"}
    assert PalmConfig.from_preset("palm-tiny") == PalmConfig.palm_tiny()
    assert PalmConfig.from_preset("palm-8b") == PalmConfig()  # the defaults are PaLM 8B


def test_unknown_preset_error_names_it_and_lists_presets():
    with pytest.raises(ValueError, match="'palm-9000'") as exc:
        PalmConfig.from_preset("palm-9000")
    assert "palm-8b" in str(exc.value) and "palm-tiny" in str(exc.value)


def test_overrides_replace_fields_and_reject_unknown_keys():
    cfg = PalmConfig.palm_tiny().with_overrides({"vocab_size": 1000, "norm": "layernorm"})
    assert cfg.vocab_size == 1000 and cfg.norm == "layernorm"
    assert PalmConfig.from_preset("palm-tiny", vocab_size=777).vocab_size == 777
    with pytest.raises(ValueError, match="'vocab'"):
        PalmConfig.palm_tiny().with_overrides({"vocab": 1000})


def test_d_ff_defaults_to_four_times_d_model_and_follows_replace():
    cfg = PalmConfig.palm_tiny()
    assert cfg.d_ff is None and cfg.mlp_dim == 4 * cfg.d_model
    assert dataclasses.replace(cfg, d_model=32).mlp_dim == 128
    assert cfg.with_overrides({"d_ff": 100}).mlp_dim == 100


@pytest.mark.parametrize(
    ("overrides", "quoted"),
    [
        ({"d_model": 0}, "d_model=0"),
        ({"n_heads": -2}, "n_heads=-2"),
        ({"head_dim": 15}, "head_dim=15"),
        ({"d_ff": 0}, "d_ff=0"),
        ({"norm": "batchnorm"}, "norm='batchnorm'"),
        ({"dtype": "int8"}, "dtype='int8'"),
        ({"norm_eps": 0.0}, "norm_eps=0.0"),
        ({"vocab_size": 1.5}, "vocab_size=1.5"),
        ({"z_loss": -1.0}, "z_loss=-1.0"),
    ],
)
def test_invalid_values_raise_sentences_quoting_them(overrides, quoted):
    with pytest.raises(ValueError) as exc:
        PalmConfig.palm_tiny().with_overrides(overrides)
    assert quoted in str(exc.value)


def test_config_is_frozen_and_hashable():
    cfg = PalmConfig.palm_tiny()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 8  # type: ignore[misc]
    assert hash(cfg) == hash(PalmConfig.palm_tiny())


def test_from_dict_rebuilds_a_config_from_its_dict_and_struct_floats():
    cfg = PalmConfig.palm_tiny().with_overrides({"d_ff": 96, "dtype": "float32"})
    assert PalmConfig.from_dict(cfg.to_dict()) == cfg
    # A protobuf Struct carries every number as a float: whole ones become int fields.
    as_struct = {k: float(v) if isinstance(v, int) else v for k, v in cfg.to_dict().items()}
    rebuilt = PalmConfig.from_dict(as_struct)
    assert rebuilt == cfg and isinstance(rebuilt.d_model, int)
    assert PalmConfig.from_dict({}) == PalmConfig()  # absent fields take the defaults


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"d_modle": 64}, "model.config.d_modle: unknown key 'd_modle'; PalmConfig fields"),
        ({"d_model": 64.5}, "model.config.d_model=64.5 has the wrong kind"),
        ({"norm": 3}, "model.config.norm=3 has the wrong kind"),
        ({"head_dim": 15}, "model.config: head_dim=15 must be even"),
    ],
)
def test_from_dict_rejects_a_bad_key_or_value_naming_the_field(values, named):
    with pytest.raises(ValueError) as err:
        PalmConfig.from_dict(values, path="model.config")
    assert named in str(err.value)


def test_optim_config_from_dict_keeps_each_kind_of_weight_decay():
    from pathways_lite.model.optim import OptimConfig

    for wd in ("dynamic", 0.01, None):
        cfg = OptimConfig.from_dict({"warmup_steps": 7.0, "weight_decay": wd, "beta1": None})
        assert cfg == OptimConfig(warmup_steps=7, weight_decay=wd, beta1=None)
    with pytest.raises(ValueError, match="optimizer.config.lr: unknown key 'lr'"):
        OptimConfig.from_dict({"lr": 1.0}, path="optimizer.config")
