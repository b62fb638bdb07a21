"""`loracast bench`: the ratios it reports are read from the sections' own results, judged against their bars, and
a bad selection is refused before anything runs. (The sections themselves run on the real base model for an hour:
`loracast bench`, not the tests.)"""

from __future__ import annotations

import pytest

from loracast_cli import cli

suite = cli.bench_suite()


def _sections() -> dict:
    """The fields each section's JSON carries that the ratios are read from (values as a run would write)."""
    return {
        "t2l_vs_lora": {
            "ok": True,
            "wall_s": 60.0,
            "command": "x",
            "result": {"t2l_vs_lora_training": 850.0, "t2l_vs_lora_training_is_lower_bound": False},
        },
        "d2l_vs_cd": {
            "ok": True,
            "wall_s": 60.0,
            "command": "x",
            "result": {"d2l_vs_context_distillation": 3.5, "ratio_is_lower_bound": True},
        },
        "answering": {
            "ok": True,
            "wall_s": 60.0,
            "command": "x",
            "result": {
                "comparison": {
                    "cumulative": {"1": {"ratio": 0.4}, "10": {"ratio": 2.5}},
                    "answering_peak_mb": {"adapter": 400.0, "in_context": 600.0},
                }
            },
        },
        "decode": {"ok": False, "wall_s": 1.0, "command": "x", "result": None},
    }


def test_ratios_come_from_the_sections_and_are_judged_against_their_bars():
    summary = suite.summarize(_sections())
    ratios, met = summary["ratios"], summary["met"]
    assert ratios["t2l_vs_lora_training"] == 850.0 and met["t2l_vs_lora_training"] is True
    assert ratios["d2l_vs_context_distillation"] == 3.5 and met["d2l_vs_context_distillation"] is False
    assert summary["lower_bound"]["d2l_vs_context_distillation"] is True
    assert summary["lower_bound"]["t2l_vs_lora_training"] is False
    assert ratios["adapter_vs_in_context_latency_10q"] == 2.5
    assert ratios["adapter_vs_in_context_memory_2k"] == 1.5 and met["adapter_vs_in_context_memory_2k"] is True
    # A failed section leaves its ratios null (never a stale or made-up number) and not judged.
    assert ratios["onnx_vs_torch_decode"] is None and met["onnx_vs_torch_decode"] is None
    assert set(ratios) == {
        "t2l_vs_lora_training",
        "d2l_vs_context_distillation",
        "onnx_vs_torch_decode",
        "onnx_vs_llamacpp_decode",
        "adapter_vs_in_context_latency_10q",
        "adapter_vs_in_context_memory_2k",
    }
    assert summary["sections"]["decode"]["ok"] is False and "result" not in summary["sections"]["decode"]


def test_the_report_and_plot_show_each_ratio_and_failure(tmp_path):
    runs = _sections()
    summary = suite.summarize(runs) | {"command": "loracast bench", "date": "d", "machine": "m", "wall_s": 240.0}
    text = suite.markdown(summary, runs)
    assert "| `d2l_vs_context_distillation` | >3.50x | 5.00x | **no** |" in text
    assert "| `onnx_vs_torch_decode` | - | 4.00x | - |" in text
    assert "| decode | **failed** |" in text
    suite.plot(summary, tmp_path / "ratios.png")
    assert (tmp_path / "ratios.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_unknown_section_is_refused_in_one_line(capsys):
    assert cli.main(["bench", "--only", "decode,nonsense", "--json", "unused.json"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("loracast: error: unknown section(s) nonsense") and "\n" not in err


def test_every_section_can_be_selected_alone():
    for section in suite.SECTIONS:
        if section.name == "decode" and not suite.importlib.util.find_spec("llama_cpp"):
            with pytest.raises(cli.UserError, match=r"pip install -e '\.\[bench\]'"):
                suite.selected([section.name], [])
        else:
            assert [s.name for s in suite.selected([section.name], [])] == [section.name]
