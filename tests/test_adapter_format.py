"""The PEFT adapter directory: PEFT loads it unchanged, provenance is checked, writes are atomic."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

from loracast import adapter_format
from loracast.adapter_format import AdapterError
from loracast.lora import LoraSpec, applied, inject, targets_of

META = {adapter_format.META_FINGERPRINT: "f" * 64}


def random_adapter(model, spec: LoraSpec, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    targets = targets_of(model, spec)
    return {
        (layer, m): (
            torch.randn(spec.r, targets.shapes[m].in_features, generator=g) * 0.3,
            torch.randn(targets.shapes[m].out_features, spec.r, generator=g) * 0.3,
        )
        for layer, m in targets.names()
    }


def test_peft_loads_our_adapter_and_computes_the_same_logits(tiny_base, tmp_path):
    spec = LoraSpec(("q_proj", "v_proj", "down_proj"), r=4, alpha=8.0)
    pristine = copy.deepcopy(tiny_base.model)  # PEFT needs a model without our wrappers
    adapter = random_adapter(tiny_base.model, spec)
    out = adapter_format.save(tmp_path / "adapter", adapter, spec, "tiny", META)

    ids = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(3))
    wrappers = inject(tiny_base.model, spec)
    with torch.no_grad():
        plain = tiny_base.model(ids).logits
        with applied(wrappers, adapter):
            ours = tiny_base.model(ids).logits
    peft_model = PeftModel.from_pretrained(pristine, out).eval()
    with torch.no_grad():
        theirs = peft_model(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-5
    assert (ours - plain).abs().max().item() > 1e-3  # the adapter is not a no-op

    loaded, loaded_spec, meta = adapter_format.load(out, expected_fingerprint="f" * 64)
    assert loaded_spec == spec
    assert meta[adapter_format.META_FINGERPRINT] == "f" * 64
    assert all(
        torch.equal(torch.as_tensor(loaded[k][0]), adapter[k][0])
        and torch.equal(torch.as_tensor(loaded[k][1]), adapter[k][1])
        for k in adapter
    )


def test_adapter_for_another_base_is_refused(tiny_base, tmp_path):
    spec = LoraSpec()
    out = adapter_format.save(tmp_path / "a", random_adapter(tiny_base.model, spec), spec, "tiny", META)
    with pytest.raises(AdapterError, match="made for base model"):
        adapter_format.load(out, expected_fingerprint=tiny_base.fingerprint)


def test_existing_non_adapter_directory_is_left_untouched(tiny_base, tmp_path):
    spec = LoraSpec()
    target = tmp_path / "photos"
    target.mkdir()
    (target / "holiday.jpg").write_bytes(b"jpeg")
    with pytest.raises(AdapterError, match="not a LoRA adapter directory"):
        adapter_format.save(target, random_adapter(tiny_base.model, spec), spec, "tiny", META)
    assert [p.name for p in target.iterdir()] == ["holiday.jpg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # no temporary directory left behind


def test_an_existing_adapter_is_replaced_whole(tiny_base, tmp_path):
    spec = LoraSpec()
    first = random_adapter(tiny_base.model, spec, seed=1)
    second = random_adapter(tiny_base.model, spec, seed=2)
    adapter_format.save(tmp_path / "a", first, spec, "tiny", META)
    adapter_format.save(tmp_path / "a", second, spec, "tiny", META)
    loaded, _, _ = adapter_format.load(tmp_path / "a")
    assert torch.equal(torch.as_tensor(loaded[(0, "q_proj")][0]), second[(0, "q_proj")][0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_corrupt_weights_are_reported(tiny_base, tmp_path):
    spec = LoraSpec()
    out = adapter_format.save(tmp_path / "a", random_adapter(tiny_base.model, spec), spec, "tiny", META)
    data = (out / adapter_format.WEIGHTS_FILE).read_bytes()
    (out / adapter_format.WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="corrupt adapter"):
        adapter_format.load(out)


def test_an_adapter_must_record_its_base(tiny_base, tmp_path):
    spec = LoraSpec()
    with pytest.raises(AdapterError, match="fingerprint"):
        adapter_format.save(tmp_path / "a", random_adapter(tiny_base.model, spec), spec, "tiny", {})
    assert not (tmp_path / "a").exists()
