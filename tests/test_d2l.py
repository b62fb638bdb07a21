"""Doc-to-LoRA on a tiny random Llama: shapes, chunk combination, streaming memory, the teacher cache,
training (overfit, resume), the maker and its PEFT output, and `generate --document` on bad input."""

from __future__ import annotations

import hashlib
import json
import math
import re
import weakref
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from support import D2L_CHUNK, D2L_DOCS, d2l_train_args
from transformers import AutoModelForCausalLM, AutoTokenizer

from hypernet import checkpoint, d2l, train_d2l
from hypernet.d2l import D2LConfig, DocToLoRA, chunk_ids, encode, internalize
from hypernet.makers import DocToLoRAMaker, TextToLoRAMaker
from hypernet.teacher import topk_kl
from hypernet.train_d2l import TeacherCache, TrainArgs, train
from loracast import adapter_format
from loracast.lora import LoRALinear, LoraSpec, applied, inject, to_torch
from loracast_cli.cli import main


def _hyper(tiny_base, scaler: str = "sqrt", live: bool = True, bias: bool = True) -> DocToLoRA:
    """A D2L for the tiny Llama; `live` gives B non-zero weights so the adapter really acts."""
    spec = LoraSpec(("down_proj",), 4, 8.0, True)
    hyper = train_d2l.build_model(spec, tiny_base.model, d2l_train_args(Path(), Path(), "", 0, chunk_scaler=scaler))
    if not bias:
        hyper = DocToLoRA(replace(hyper.cfg, bias_adapter=False))
    torch.manual_seed(3)
    if live:
        with torch.no_grad():
            for m, (fan_in, _) in hyper.cfg.shapes.items():
                hyper.heads[m].weight[fan_in:].normal_(0, 5.0)
                if bias:
                    hyper.bias_B[m].normal_(0, 0.05)
    return hyper.eval()


def _chunks(tiny_base, n: int, size: int = D2L_CHUNK) -> list[list[int]]:
    g = torch.Generator().manual_seed(n)
    return torch.randint(10, 1000, (n, size), generator=g).tolist()


def _ids() -> torch.Tensor:
    return torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))


def test_early_exit_encoding_equals_the_models_own_hidden_states(tiny_base):
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # a right-padded chunk
    with torch.no_grad():
        ref = tiny_base.model.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    got = encode(tiny_base.model, ids, mask, 1)  # (the last entry of hidden_states has the final norm applied)
    assert torch.allclose(got[mask.bool()], ref[1][mask.bool()], atol=1e-6)


@pytest.mark.parametrize("chunks", [1, 3])
def test_adapter_shapes_for_one_and_several_chunks(tiny_base, chunks):
    hyper = _hyper(tiny_base)
    cfg = hyper.cfg
    adapter = internalize(hyper, tiny_base.model, _chunks(tiny_base, chunks))
    assert set(adapter) == set(cfg.targets.names())
    fan_in, fan_out = cfg.shapes["down_proj"]
    for a, b in adapter.values():
        assert a.shape == (cfg.r * (chunks + 1), fan_in)  # + 1: the bias adapter's own block
        assert b.shape == (fan_out, cfg.r * (chunks + 1))
    # Batched training form: documents of 1 and `chunks` chunks, ranks padded to the larger.
    states = torch.randn(1 + chunks, D2L_CHUNK, cfg.hidden_size)
    batched = hyper(states, None, [1, chunks])
    a, b = batched[(0, "down_proj")]
    assert a.shape == (2, cfg.rank(chunks), fan_in) and b.shape == (2, fan_out, cfg.rank(chunks))
    assert torch.all(a[0, cfg.rank(1) :] == 0) and torch.all(b[0, :, cfg.rank(1) :] == 0)


def test_untrained_d2l_leaves_the_base_model_unchanged(tiny_base):
    hyper = _hyper(tiny_base, live=False)
    wrappers = inject(tiny_base.model, hyper.cfg.spec)
    ids = _ids()
    adapter = internalize(hyper, tiny_base.model, _chunks(tiny_base, 2))
    with torch.no_grad():
        plain = tiny_base.model(ids).logits
        with applied(wrappers, adapter):
            adapted = tiny_base.model(ids).logits
    assert torch.equal(plain, adapted)
    assert all(a.abs().sum() > 0 for a, _ in adapter.values())  # A is live, so B gets gradients


@pytest.mark.parametrize("scaler", ["none", "sqrt", "linear"])
def test_two_chunk_adapter_is_the_scaled_sum_of_its_chunks(tiny_base, scaler):
    hyper = _hyper(tiny_base, scaler)
    c1, c2 = _chunks(tiny_base, 2)
    both = internalize(hyper, tiny_base.model, [c1, c2])
    with torch.no_grad():
        per_chunk = [hyper.chunk_loras(encode(tiny_base.model, torch.tensor([c]), None, 1)) for c in (c1, c2)]
    scale = {"none": 1.0, "sqrt": 2**-0.5, "linear": 0.5}[scaler]
    x = torch.randn(5, hyper.cfg.shapes["down_proj"][0])
    for layer in range(hyper.cfg.num_layers):
        a, b = both[(layer, "down_proj")]
        want = hyper.bias_B["down_proj"][layer] @ hyper.bias_A["down_proj"][layer]
        for loras in per_chunk:
            ca, cb = loras["down_proj"]
            want = want + scale * cb[0, layer] @ ca[0, layer]
        assert torch.allclose(b @ a, want, atol=1e-6)
        # And as the LoRA layer applies it: one rank-concatenated adapter == the deltas added.
        lin = LoRALinear(torch.nn.Linear(x.shape[1], b.shape[0], bias=False), 1.0)
        lin.A, lin.B = a, b
        assert torch.allclose(lin(x) - lin.base(x), x @ want.T, atol=1e-5)


def test_without_the_bias_adapter_the_rank_is_r_times_chunks(tiny_base):
    hyper = _hyper(tiny_base, bias=False)
    a, b = internalize(hyper, tiny_base.model, _chunks(tiny_base, 3))[(0, "down_proj")]
    assert a.shape[0] == b.shape[1] == 3 * hyper.cfg.r


def test_chunks_stream_one_at_a_time(tiny_base, monkeypatch):
    """The chunk iterator is consumed lazily and a chunk's hidden states are gone before the next is encoded."""
    hyper = _hyper(tiny_base)
    alive: list[weakref.ref] = []
    events: list[str] = []
    real_encode = d2l.encode

    def spying_encode(*args, **kwargs):
        assert all(ref() is None for ref in alive), "an earlier chunk's hidden states are still alive"
        states = real_encode(*args, **kwargs)
        alive.append(weakref.ref(states))
        events.append("encode")
        return states

    def chunks():
        for c in _chunks(tiny_base, 8):
            events.append("next")
            yield c

    monkeypatch.setattr(d2l, "encode", spying_encode)
    adapter = internalize(hyper, tiny_base.model, chunks())
    assert events == ["next", "encode"] * 8
    assert adapter[(0, "down_proj")][0].shape[0] == hyper.cfg.r * 9


def _peak_bytes(fn) -> int:
    """Peak CPU memory torch allocated while `fn` ran, from the profiler's allocation events."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def test_peak_memory_does_not_grow_with_the_number_of_chunks(tiny_base):
    hyper = _hyper(tiny_base)
    size = 256  # long chunks: the encoder's working memory, not the (small) adapter, sets the peak here

    def run(n: int) -> int:
        return _peak_bytes(lambda: internalize(hyper, tiny_base.model, iter(_chunks(tiny_base, n, size))))

    two, eight = run(2), run(8)
    cfg = hyper.cfg
    adapter_growth = 6 * 4 * cfg.num_layers * sum(cfg.r * (i + o) for i, o in cfg.shapes.values())  # 6 more chunks
    assert eight <= 1.1 * two + 3 * adapter_growth, (two, eight, adapter_growth)
    # For contrast, encoding all 8 chunks at once (what streaming avoids) needs several times the memory.
    ids = torch.tensor(_chunks(tiny_base, 8, size))
    assert _peak_bytes(lambda: encode(tiny_base.model, ids, None, 1)) > 3 * two


def _product(adapter, key=(0, "down_proj")) -> torch.Tensor:
    a, b = adapter[key]
    return b @ a


def _best(product: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-`rank` approximation of `product`, from its full SVD (only affordable at tiny sizes)."""
    u, s, vh = torch.linalg.svd(product.double(), full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).float()


def test_truncate_gives_the_best_low_rank_approximation_without_the_product():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 40, 64, generator=g), torch.randn(3, 32, 40, generator=g)  # batched over 3 layers
    a_kept, b_kept = d2l.truncate(a, b, 10)
    assert a_kept.shape == (3, 10, 64) and b_kept.shape == (3, 32, 10)
    for layer in range(3):
        assert torch.allclose(b_kept[layer] @ a_kept[layer], _best(b[layer] @ a[layer], 10), atol=1e-4)
    # Singular values are split evenly, so both factors carry the same norm per rank row.
    assert torch.allclose(a_kept.norm(dim=-1), b_kept.norm(dim=-2), rtol=1e-4)
    assert d2l.truncate(a, b, 40) == (a, b)  # within the cap: untouched


def test_a_cap_at_or_above_the_true_rank_changes_nothing(tiny_base):
    """12 chunks of rank 4 are truncated to 32 after each chunk from the 9th on; down_proj is 64 -> 32, so the
    delta's true rank is at most 32 and every truncation is lossless."""
    hyper = _hyper(tiny_base)
    chunks = _chunks(tiny_base, 12)
    plain = internalize(hyper, tiny_base.model, chunks, max_rank=10**6)
    capped = internalize(hyper, tiny_base.model, chunks, max_rank=32)
    assert plain[(0, "down_proj")][0].shape[0] == hyper.cfg.rank(12) == 52
    for key in plain:
        assert capped[key][0].shape[0] == capped[key][1].shape[1] == 32
        assert torch.allclose(_product(capped, key), _product(plain, key), atol=1e-5)


def test_a_cap_below_the_true_rank_gives_the_best_approximation(tiny_base):
    """2 chunks of rank 4 and a cap of 4: one truncation, after the 2nd chunk (no bias block here), so the
    result is exactly the best approximation of the uncapped delta."""
    hyper = _hyper(tiny_base, bias=False)
    chunks = _chunks(tiny_base, 2)
    plain = internalize(hyper, tiny_base.model, chunks, max_rank=10**6)
    capped = internalize(hyper, tiny_base.model, chunks, max_rank=4)
    for key in plain:
        assert capped[key][0].shape[0] == capped[key][1].shape[1] == 4
        want = _best(_product(plain, key), 4)
        assert torch.allclose(_product(capped, key), want, atol=1e-5)
        assert (_product(plain, key) - want).norm() > 0.05  # the cap really cut something (singular values 5-8)
    # Many truncations while streaming: the rank stays at the cap and the delta stays close to the uncapped one.
    hyper = _hyper(tiny_base)
    chunks = _chunks(tiny_base, 24)
    plain, capped = (internalize(hyper, tiny_base.model, chunks, max_rank=cap) for cap in (10**6, 14))
    for key in plain:
        assert capped[key][0].shape[0] == 14
        full = _product(plain, key)
        best_error = (full - _best(full, 14)).norm()
        assert best_error <= (full - _product(capped, key)).norm() <= 1.5 * best_error


def test_the_cap_is_in_the_config_and_old_checkpoints_load_with_the_default(tiny_d2l, tmp_path):
    from safetensors.torch import load_file, save_file

    assert D2LConfig.max_rank == 64
    meta = checkpoint.read_metadata(tiny_d2l)
    config = json.loads(meta["config"])
    assert config["max_rank"] == 64  # recorded in new checkpoints
    del config["max_rank"]  # as a checkpoint from before the cap stores it
    old = tmp_path / "old.safetensors"
    save_file(load_file(tiny_d2l), old, metadata={**meta, "config": json.dumps(config)})
    hyper, _ = checkpoint.load(old, ("DocToLoRA",))
    assert hyper.cfg.max_rank == 64
    with pytest.raises(ValueError, match="max_rank"):
        D2LConfig.from_dict({**config, "max_rank": 0})


def test_with_a_cap_peak_memory_does_not_grow_with_the_number_of_chunks(tiny_base):
    """Short chunks, so the adapter rather than the encoder sets the peak: uncapped, it grows with the chunks."""
    hyper = _hyper(tiny_base)

    def run(n: int, cap: int) -> int:
        return _peak_bytes(lambda: internalize(hyper, tiny_base.model, iter(_chunks(tiny_base, n)), max_rank=cap))

    few, many = run(4, 8), run(64, 8)
    assert many <= 1.1 * few, (few, many)
    assert run(64, 10**6) > 2 * few  # the same measurement sees plain concatenation grow


def test_topk_kl_is_zero_when_the_student_matches_and_positive_otherwise():
    logits = torch.randn(3, 50)
    top = torch.log_softmax(logits, -1).topk(50)
    assert topk_kl(logits, top.indices, top.values).abs() < 1e-6  # k = vocab: the exact KL
    top16 = torch.log_softmax(logits, -1).topk(16)
    assert topk_kl(logits, top16.indices, top16.values) > 0  # mass outside the top-16 is penalized
    assert topk_kl(torch.randn(3, 50), top.indices, top.values) > 0


def test_teacher_targets_are_computed_once_and_reused(tiny_base, tmp_path, monkeypatch):
    calls = []
    real = train_d2l.run_teacher

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_d2l, "run_teacher", counting)
    first = TeacherCache(tmp_path, tiny_base, 16, 6).get(D2L_DOCS[0])
    again = TeacherCache(tmp_path, tiny_base, 16, 6).get(D2L_DOCS[0])  # a new process would do the same
    assert len(calls) == 1
    assert len(first) == len(D2L_DOCS[0].qas)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a.answer_ids, b.answer_ids) and torch.equal(a.topk_ids, b.topk_ids)
        assert torch.equal(a.topk_logprobs, b.topk_logprobs)
        assert a.topk_ids.shape == (len(a.answer_ids), 16)
    TeacherCache(tmp_path, tiny_base, 8, 6).get(D2L_DOCS[0])  # another k is another key
    assert len(calls) == 2
    written = sorted(p.suffix for p in tmp_path.rglob("*") if p.is_file())
    assert written == [".safetensors", ".safetensors"]  # whole files only: no temporary left beside them


@pytest.fixture(scope="module")
def peaked_base_dir(tiny_base_dir, tmp_path_factory) -> Path:
    """The tiny Llama with 12x larger (tied) embeddings: its next-token distributions are peaked and depend on the
    context, as a trained model's do; the random one's are nearly uniform and leave distillation little to fit."""
    path = tmp_path_factory.mktemp("peaked-llama")
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(12)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_base_dir).save_pretrained(path)
    return path


def test_training_overfits_one_repeated_document(tmp_path, peaked_base_dir):
    args = d2l_train_args(tmp_path, peaked_base_dir, "overfit", 20, lr=1e-2, warmup=2)
    train(args, documents=[D2L_DOCS[0]])
    losses = [e["loss"] for e in json.loads((args.work_dir / "d2l-log.json").read_text())]
    assert all(math.isfinite(loss) for loss in losses)
    # It falls and settles (the floor is the tiny model's: 32 dims cannot put all mass on the teacher's top-16).
    assert losses[-1] < losses[0] - 0.1, losses
    assert max(losses[-5:]) - min(losses[-5:]) < 0.01, losses


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path, tiny_base_dir, monkeypatch):
    calls = []
    real = train_d2l.run_teacher
    monkeypatch.setattr(train_d2l, "run_teacher", lambda *a, **k: calls.append(1) or real(*a, **k))
    straight = d2l_train_args(tmp_path, tiny_base_dir, "straight", 4)
    train(straight, D2L_DOCS)
    assert len(calls) == len(D2L_DOCS)
    interrupted = d2l_train_args(tmp_path, tiny_base_dir, "resumed", 2)
    train(interrupted, D2L_DOCS)
    interrupted.steps = 4  # the second call finds the state at step 2 and carries on
    meta = train(interrupted, D2L_DOCS)
    assert len(calls) == 2 * len(D2L_DOCS)  # each work dir ran the teacher once; the resumed run reused its cache

    def losses(args: TrainArgs) -> list[tuple[int, float]]:
        return [(e["step"], e["loss"]) for e in json.loads((args.work_dir / "d2l-log.json").read_text())]

    assert losses(interrupted) == losses(straight)
    a, _ = checkpoint.load(straight.out, ("DocToLoRA",))
    b, stored = checkpoint.load(interrupted.out, ("DocToLoRA",))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert stored["data_sha256"] == meta["data_sha256"] == train_d2l.documents_hash(D2L_DOCS)
    assert stored["hypernet_version"] == "d2l-1" and len(stored["base_fingerprint"]) == 64
    assert float(stored["train_s_all_runs"]) > 0


LONG_DOC = " ".join(f"Fact {i}: the tower of Velm{i} is {i * 7} metres tall." for i in range(12))


@pytest.mark.parametrize("max_rank", [None, 6])  # the checkpoint's cap (64, above this rank), and a real cut
def test_the_maker_round_trips_through_peft(tiny_d2l, tiny_base, tiny_base_dir, tmp_path, max_rank):
    maker = DocToLoRAMaker(tiny_d2l, tiny_base, max_rank)
    chunks = len(chunk_ids(tiny_base.tokenizer, LONG_DOC, D2L_CHUNK))
    assert chunks >= 3
    adapter = maker.make_adapter(LONG_DOC)
    rank = maker.spec.r * (chunks + 1) if max_rank is None else max_rank
    assert adapter[(0, "down_proj")][0].shape[0] == rank
    out = maker.save(LONG_DOC, tmp_path / "adapter", str(tiny_base_dir))

    stored, spec, meta = adapter_format.load(out, expected_fingerprint=tiny_base.fingerprint)
    assert spec.r == rank == json.loads((out / adapter_format.CONFIG_FILE).read_text())["r"]
    assert meta["loracast.document_sha256"] == hashlib.sha256(LONG_DOC.encode()).hexdigest()
    assert meta["loracast.hypernet_version"] == "d2l-1"
    assert b"Velm" not in b"".join(p.read_bytes() for p in out.iterdir())  # never the text itself

    ids = _ids()
    wrappers = inject(tiny_base.model, maker.spec)
    with torch.no_grad(), applied(wrappers, to_torch(stored)):
        ours = tiny_base.model(ids).logits
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base_dir), out).eval()
    with torch.no_grad():
        theirs = peft(ids).logits
        plain = tiny_base.model(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(ours, plain, atol=1e-3)  # the adapter really acts


def test_the_maker_fits_the_coordinators_protocol(tiny_d2l, tiny_base):
    from coordinator.server import Hypernet

    net = Hypernet.of("d2l", DocToLoRAMaker(tiny_d2l, tiny_base))
    assert net.version == "d2l-1" and net.kind == "d2l"
    assert net.describe().rank == 4  # the per-chunk rank; each adapter's own rank: maker.spec_for(adapter)


def test_checkpoint_kinds_are_not_confused(tiny_d2l, tiny_t2l, tiny_base):
    with pytest.raises(checkpoint.CheckpointError, match="DocToLoRA checkpoint"):
        TextToLoRAMaker(tiny_d2l)
    with pytest.raises(checkpoint.CheckpointError, match="TextToLoRA checkpoint"):
        DocToLoRAMaker(tiny_t2l, tiny_base)
    cfg = D2LConfig(hidden_size=8, num_layers=4, shapes={"down_proj": (16, 8)}, encoder_layers=1)
    assert D2LConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_shipped_t2l_checkpoints_still_load():
    for path in (checkpoint.DEFAULT_T2L, checkpoint.DEFAULT_MTL):
        model, meta = checkpoint.load(path)
        assert meta["hypernet_version"] == "t2l-1"
        assert sum(p.numel() for p in model.parameters()) > 0


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_generate_document_writes_an_adapter_and_shows_its_internalization(tiny_d2l, tiny_base_dir, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text(LONG_DOC, encoding="utf-8")
    out = tmp_path / "adapter"
    argv = ["generate", "--document", str(doc), "--out", str(out), "--checkpoint", str(tiny_d2l)]
    assert main([*argv, "--base", str(tiny_base_dir), "--budget-seconds", "1"]) == 0
    _, spec, meta = adapter_format.load(out)
    assert meta["loracast.document_sha256"] == hashlib.sha256(doc.read_bytes()).hexdigest()
    assert spec.target_modules == ("down_proj",) and spec.r > 4
    err = capsys.readouterr().err
    assert "internalizing (teacher)" in err and "internalizing (done): 100%" in err  # the progress bar

    with pytest.raises(SystemExit):
        main([*argv, "--budget-seconds", "-2"])
    assert "the budget must be 0 seconds or more, not -2" in capsys.readouterr().err
    assert main(["generate", "--description", "Reverse it.", "--out", str(out), "--budget-seconds", "1"]) == 2
    assert _error_line(capsys).endswith("--budget-seconds is for --document: a description's adapter is one pass")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "document .* is empty"),
        (b" \n\t\n", "document .* is empty"),
        (b"caf\xe9 au lait", "not UTF-8 text \\(bad byte at offset 3\\)"),
        (b"\x7fELF\x02\x01\x01\x00\x00\x00", "looks like a binary file"),
        (b"a" * 2000, "over the 1000-byte limit"),
    ],
)
def test_generate_document_refuses_bad_input_and_writes_nothing(tiny_d2l, tmp_path, capsys, content, message):
    doc = tmp_path / "in" / "doc.txt"
    doc.parent.mkdir()
    doc.write_bytes(content)
    out = tmp_path / "out" / "adapter"
    argv = ["generate", "--document", str(doc), "--out", str(out), "--checkpoint", str(tiny_d2l)]
    assert main([*argv, "--max-document-bytes", "1000"]) == 2
    assert re.search(message, _error_line(capsys))
    assert not (tmp_path / "out").exists()


def test_generate_document_and_description_are_exclusive(tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("text")
    with pytest.raises(SystemExit):
        main(["generate", "--document", str(doc), "--description", "x", "--out", str(tmp_path / "a")])
    assert "not allowed with" in capsys.readouterr().err
    assert main(["generate", "--document", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "a")]) == 2
    assert "does not exist" in _error_line(capsys)


def test_train_d2l_is_wired_with_its_own_defaults(tmp_path, monkeypatch):
    seen: list[TrainArgs] = []
    result = {"final_loss_50": 0.0, "wall_s_this_run": 0}
    monkeypatch.setattr(train_d2l, "train", lambda args: seen.append(args) or result)
    argv = ["train", "d2l", "--data", str(tmp_path), "--work-dir", str(tmp_path), "--chunk-scaler", "linear"]
    assert main([*argv, "--steps", "7"]) == 0
    (args,) = seen
    assert args.out == checkpoint.DEFAULT_D2L and args.steps == 7 and args.chunk_scaler == "linear"
    assert args.target_modules == ("down_proj",) and args.batch_size == TrainArgs.batch_size
