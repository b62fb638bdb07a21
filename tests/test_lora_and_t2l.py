"""The LoRA layer and the T2L hypernetwork on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from hypernet.t2l import MultiTaskLoRA, T2LConfig, TextToLoRA
from hypernet.train_t2l import build_model
from loracast.lora import LoraSpec, applied, inject, targets_of


def _ids(base, n: int = 2) -> torch.Tensor:
    return torch.randint(0, 1000, (n, 12), generator=torch.Generator().manual_seed(1))


def test_hypernet_shapes_cover_every_layer_and_module(tiny_base):
    spec = LoraSpec(("q_proj", "v_proj", "down_proj"), r=4)
    targets = targets_of(tiny_base.model, spec)
    hyper = build_model("t2l", 384, spec, tiny_base.model)
    adapter = hyper(torch.randn(3, 384))
    assert set(adapter) == set(targets.names())
    for (_, module), (a, b) in adapter.items():
        shape = targets.shapes[module]
        assert a.shape == (3, 4, shape.in_features)
        assert b.shape == (3, shape.out_features, 4)


def test_fresh_hypernet_leaves_the_base_model_unchanged(tiny_base):
    spec = LoraSpec()
    wrappers = inject(tiny_base.model, spec)
    ids = _ids(tiny_base)
    with torch.no_grad():
        plain = tiny_base.model(ids).logits
        adapter = build_model("t2l", 384, spec, tiny_base.model)(torch.randn(2, 384))
        with applied(wrappers, adapter):
            adapted = tiny_base.model(ids).logits
    assert torch.equal(plain, adapted)
    assert all(a.abs().sum() > 0 for a, _ in adapter.values())  # A is live, so B can learn


def test_per_example_adapters_match_one_at_a_time(tiny_base):
    spec = LoraSpec()
    wrappers = inject(tiny_base.model, spec)
    hyper = build_model("t2l", 384, spec, tiny_base.model)
    with torch.no_grad():
        for head in hyper.heads.values():
            head.weight.normal_(0, 0.5)
        adapter = hyper(torch.randn(2, 384))
        ids = _ids(tiny_base)
        with applied(wrappers, adapter):
            batched = tiny_base.model(ids).logits
        for row in range(2):
            single = {k: (a[row], b[row]) for k, (a, b) in adapter.items()}
            with applied(wrappers, single):
                alone = tiny_base.model(ids[row : row + 1]).logits
            assert torch.allclose(batched[row], alone[0], atol=1e-5)
        plain = tiny_base.model(ids).logits
    assert not torch.allclose(batched, plain, atol=1e-3)  # the adapter really acts


def test_config_round_trips_and_mtl_ignores_the_description():
    cfg = T2LConfig(embed_dim=8, num_layers=2, shapes={"q_proj": (16, 16)}, r=2)
    assert T2LConfig.from_dict(cfg.to_dict()) == cfg
    mtl = MultiTaskLoRA(cfg)
    one, two = mtl(torch.randn(1, 8)), mtl(torch.randn(1, 8))
    assert all(torch.equal(one[k][0], two[k][0]) for k in one)
    assert isinstance(TextToLoRA(cfg)(torch.randn(1, 8))[(1, "q_proj")][1], torch.Tensor)


def test_configs_of_checkpoints_from_before_the_shared_adapter_left_still_load():
    cfg = T2LConfig(embed_dim=8, num_layers=2, shapes={"q_proj": (16, 16)}, r=2)
    assert T2LConfig.from_dict({**cfg.to_dict(), "shared_adapter": False}) == cfg  # the shipped checkpoint's
    with pytest.raises(ValueError, match="--shared-adapter checkpoint"):
        T2LConfig.from_dict({**cfg.to_dict(), "shared_adapter": True})
