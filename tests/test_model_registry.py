"""The model registry: every entry's metadata matches the network it builds; options are checked."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lrfeatures.config import ModelConfig
from lrfeatures.errors import ConfigError
from lrfeatures.models import registry
from lrfeatures.models.registry import (MODELS, ModelEntry, build_model, model_entry, model_names,
                                        register_model, resolve_options, si_parameters)
from lrfeatures.models.vit import ViTOptions

TINY_VIT = {"heads": 2, "dim_head": 4, "mlp_dim": 8}
# A small build of every registered model: (config, input shape, outputs). A new model must add one.
SMALL = {
    "mlp-si": (ModelConfig(name="mlp-si", width=8, depth=2), (16,), 1),
    "convnet-si": (ModelConfig(name="convnet-si", width=2, depth=2), (3, 8, 8), 5),
    "resnet18-si": (ModelConfig(name="resnet18-si", width=2), (3, 8, 8), 5),
    "resnet18": (ModelConfig(name="resnet18", width=2), (3, 8, 8), 5),
    "vit": (ModelConfig(name="vit", width=8, depth=1, options=TINY_VIT), (3, 8, 8), 5),
    "vit-si": (ModelConfig(name="vit-si", width=8, depth=1, options=TINY_VIT), (3, 8, 8), 5),
}


def small(name: str, seed: int = 0, **options) -> torch.nn.Module:
    """Model `name` at its SMALL size, with `options` on top of its small options."""
    cfg, shape, outputs = SMALL[name]
    cfg = dataclasses.replace(cfg, options={**cfg.options, **options})
    return build_model(cfg, shape, outputs, seed)


def one_line_error(match: str, fn, *args) -> str:
    """fn(*args) raises a one-line ConfigError matching `match`; its message."""
    with pytest.raises(ConfigError, match=match) as err:
        fn(*args)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_every_registered_model_has_a_small_build_and_complete_metadata():
    assert set(MODELS) == set(SMALL)
    for name, entry in MODELS.items():
        assert isinstance(entry, ModelEntry) and entry.name == name and model_entry(name) is entry
        assert entry.input_kind in ("vector", "image")
        assert entry.si_group in ("all", "partial", "none")
        assert entry.has_si_group == (entry.si_group != "none")
        assert entry.engines and entry.description
        assert entry.options is None or dataclasses.is_dataclass(entry.options)


def test_the_declared_metadata():
    kinds = {name: (e.input_kind, e.si_group, e.engines) for name, e in MODELS.items()}
    assert kinds == {
        "mlp-si": ("vector", "all", ("native", "grid", "reference")),
        "convnet-si": ("image", "all", ("fused", "images")),
        "resnet18-si": ("image", "all", ("fused", "images")),
        "resnet18": ("image", "none", ("fused", "images")),
        "vit": ("image", "none", ("fused", "images")),
        "vit-si": ("image", "partial", ("fused", "images")),
    }
    assert MODELS["vit"].options is ViTOptions and MODELS["vit-si"].options is ViTOptions
    assert all(MODELS[n].options is None for n in ("mlp-si", "convnet-si", "resnet18-si", "resnet18"))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_si_group_metadata_matches_the_built_model(name):
    model = small(name)
    si = {id(p) for p in si_parameters(model)}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert si <= trainable  # an SI parameter is always trained (on the sphere)
    expected = {"all": si == trainable and bool(si),
                "partial": bool(si) and si < trainable,
                "none": not si}
    assert expected[MODELS[name].si_group]


@pytest.mark.parametrize("name", sorted(SMALL))
def test_same_seed_same_weights_other_seed_other_weights(name):
    a, b, c = small(name, seed=3), small(name, seed=3), small(name, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_building_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    small("vit-si")
    assert torch.equal(torch.random.get_rng_state(), state)


def test_model_names_filter_by_input_kind():
    assert model_names() == sorted(MODELS)
    assert model_names("vector") == ["mlp-si"]
    assert model_names("image") == ["convnet-si", "resnet18", "resnet18-si", "vit", "vit-si"]
    one_line_error("unknown input kind 'audio'", model_names, "audio")


def test_unknown_model_error_is_one_line_and_lists_the_names():
    for fn, arg in ((model_entry, "vgg"), (lambda n: resolve_options(n, {}), "vgg"),
                    (lambda n: build_model(ModelConfig(name=n), (16,), 1, 0), "vgg")):
        message = one_line_error("unknown model 'vgg'", fn, arg)
        assert all(name in message for name in MODELS)


@pytest.mark.parametrize("name, shape", [("vit", (32,)), ("convnet-si", (32, 32)), ("resnet18", (3, 32, 32, 1)),
                                         ("mlp-si", (3, 8, 8)), ("mlp-si", (4, 4))])
def test_a_shape_of_the_wrong_input_kind_is_a_one_line_error(name, shape):
    kind = MODELS[name].input_kind
    message = one_line_error(f"{name} needs {'image' if kind == 'image' else 'flat vector'} inputs",
                             build_model, ModelConfig(name=name), shape, 1, 0)
    assert str(shape) in message


def test_resolve_options_fills_the_defaults():
    defaults = {"heads": 8, "dim_head": 64, "mlp_dim": 512, "patch": 4, "dropout": 0.1, "emb_dropout": 0.1}
    assert resolve_options("vit", {}) == defaults == dataclasses.asdict(ViTOptions())
    got = resolve_options("vit-si", {"heads": 2, "dropout": 0})
    assert got == {**defaults, "heads": 2, "dropout": 0.0} and isinstance(got["dropout"], float)
    assert resolve_options("mlp-si", {}) == {}


@pytest.mark.parametrize("name, options, match", [
    ("vit", {"hedas": 2}, "unknown model option 'hedas' for vit; known: heads, dim_head, mlp_dim, patch"),
    ("vit", {"heads": "8"}, "model.options.heads must be a whole number"),
    ("vit", {"heads": 2.5}, "model.options.heads must be a whole number"),
    ("vit", {"heads": True}, "model.options.heads must be a whole number"),
    ("vit-si", {"dropout": "high"}, "model.options.dropout must be a number"),
    ("vit", {"heads": 0}, "model.options.heads=0 must be >= 1"),
    ("vit", {"dim_head": -1}, "model.options.dim_head=-1 must be >= 1"),
    ("vit", {"mlp_dim": 0}, "model.options.mlp_dim=0 must be >= 1"),
    ("vit", {"patch": 1}, "model.options.patch=1 must be >= 2"),
    ("vit", {"dropout": 1.0}, r"model.options.dropout=1.0 must be in \[0, 1\)"),
    ("vit-si", {"emb_dropout": -0.1}, r"model.options.emb_dropout=-0.1 must be in \[0, 1\)"),
    ("mlp-si", {"heads": 2}, "model mlp-si takes no options, but model.options sets heads"),
    ("vit", [("heads", 2)], "model.options must be a table"),
])
def test_bad_options_are_one_line_errors(name, options, match):
    one_line_error(match, resolve_options, name, options)
    cfg, shape, outputs = SMALL[name]
    one_line_error(match, build_model, dataclasses.replace(cfg, options=options), shape, outputs, 0)


def test_options_change_the_built_model():
    base = small("vit")
    wider = small("vit", heads=4, mlp_dim=16)
    assert base.blocks[0].attn.heads == 2 and wider.blocks[0].attn.heads == 4
    assert base.blocks[0].attn.to_qkv.weight.shape == (3 * 2 * 4, 8)
    assert wider.blocks[0].attn.to_qkv.weight.shape == (3 * 4 * 4, 8)
    assert wider.blocks[0].ff.fc1.out_features == 16
    assert small("vit", patch=2).pos_embedding.shape == (1, 16 + 1, 8)
    assert small("vit", dropout=0.0).blocks[0].ff.drop.p == 0.0


def test_register_model_defaults_and_checks(monkeypatch):
    monkeypatch.setattr(registry, "MODELS", {})

    @register_model("toy")
    def build_toy(cfg, input_shape, num_outputs):
        """A toy model."""
        return torch.nn.Linear(input_shape[0], num_outputs)

    entry = registry.MODELS["toy"]
    assert (entry.input_kind, entry.si_group, entry.options, entry.engines) == (
        "vector", "all", None, ("grid", "reference"))
    assert entry.description == "A toy model." and entry.builder is build_toy
    assert registry.build_model(ModelConfig(name="toy"), (3,), 2, 0).weight.shape == (2, 3)
    register_model("toy-image", input_kind="image", si_group="none")(build_toy)
    assert registry.MODELS["toy-image"].engines == ("images",)
    assert not registry.MODELS["toy-image"].has_si_group
    for bad in ({"input_kind": "audio"}, {"si_group": "some"}, {"options": dict}):
        with pytest.raises(ValueError):
            register_model("bad", **bad)
