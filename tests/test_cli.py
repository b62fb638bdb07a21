"""`loracast generate` and `loracast answer`: results on good input, one-line errors on bad input."""

from __future__ import annotations

import hashlib
import subprocess
import sys

from peft import PeftModel
from transformers import AutoModelForCausalLM

from loracast import adapter_format
from loracast_cli.cli import main


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_generate_writes_a_peft_adapter_with_provenance(tiny_t2l, tiny_base_dir, tiny_base, tmp_path):
    out = tmp_path / "adapter"
    assert (
        main(
            [
                "generate",
                "--description",
                "Reverse the list.",
                "--out",
                str(out),
                "--checkpoint",
                str(tiny_t2l),
                "--base",
                str(tiny_base_dir),
            ]
        )
        == 0
    )
    _, spec, meta = adapter_format.load(out, expected_fingerprint=tiny_base.fingerprint)
    assert meta["loracast.description_sha256"] == hashlib.sha256(b"Reverse the list.").hexdigest()
    assert meta["loracast.hypernet_version"]
    assert spec.target_modules == ("q_proj", "v_proj")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base_dir), out)
    assert model.peft_config["default"].r == spec.r


def test_empty_description_is_refused_and_writes_nothing(tiny_t2l, tmp_path, capsys):
    out = tmp_path / "adapter"
    assert main(["generate", "--description", "  \n ", "--out", str(out), "--checkpoint", str(tiny_t2l)]) == 2
    assert "description is empty" in _error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_missing_and_corrupt_checkpoints_are_one_line_errors(tmp_path, capsys):
    out = tmp_path / "adapter"
    assert main(["generate", "--description", "x", "--out", str(out), "--checkpoint", str(tmp_path / "no")]) == 2
    assert "does not exist" in _error_line(capsys)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 100)
    assert main(["generate", "--description", "x", "--out", str(out), "--checkpoint", str(bad)]) == 2
    assert "corrupt" in _error_line(capsys)
    assert not out.exists()


def test_output_directory_that_is_not_an_adapter_is_kept(tiny_t2l, tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("keep me")
    assert main(["generate", "--description", "x", "--out", str(out), "--checkpoint", str(tiny_t2l)]) == 2
    assert "not a LoRA adapter directory" in _error_line(capsys)
    assert (out / "todo.txt").read_text() == "keep me"


def test_answer_refuses_an_adapter_made_for_another_base(tiny_t2l, tiny_base_dir, tmp_path):
    out = tmp_path / "adapter"
    assert main(["generate", "--description", "x", "--out", str(out), "--checkpoint", str(tiny_t2l)]) == 0
    meta_path = out / adapter_format.WEIGHTS_FILE
    adapter, spec, meta = adapter_format.load(out)
    adapter_format.save(out, adapter, spec, "tiny", {**meta, adapter_format.META_FINGERPRINT: "0" * 64})
    assert meta_path.exists()
    # A real process: the exit status and the single line on stderr are what scripts see.
    proc = subprocess.run(
        [sys.executable, "-m", "loracast_cli.cli", "answer", "--adapter", str(out), "--base", str(tiny_base_dir), "hi"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "made for base model 000000000000" in proc.stderr
