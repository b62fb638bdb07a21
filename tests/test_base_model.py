"""Base-model loading by path and the fingerprint every adapter records."""

from __future__ import annotations

import copy

import pytest
import torch

from loracast import base_model


def test_fingerprint_is_stable_and_sees_every_weight(tiny_base, tiny_base_dir):
    again = base_model.load(str(tiny_base_dir))
    assert again.fingerprint == tiny_base.fingerprint == base_model.fingerprint(again.model)
    changed = copy.deepcopy(again.model)
    with torch.no_grad():
        changed.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    assert base_model.fingerprint(changed) != tiny_base.fingerprint


def test_a_path_without_a_model_is_a_clear_error(tmp_path):
    with pytest.raises(base_model.BaseModelError, match=r"no config\.json"):
        base_model.load(str(tmp_path))
