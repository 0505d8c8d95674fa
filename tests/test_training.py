"""lmkit.training in-process: results, checkpoints that carry everything, safe loading."""

import json
import os
from pathlib import Path

import pytest
import torch
from support import compose_config

from lmkit.run.checkpoint import load_checkpoint, restore
from lmkit.run.train import train


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A few steps on three local files (WikiText-2's valid/test text as train/val/test)."""
    wiki = os.path.join(os.environ["LMKIT_DATA_DIR"], "wikitext-2")
    run_dir = tmp_path_factory.mktemp("training") / "run"
    cfg = compose_config(
        "data=text",
        f"data.train={wiki}/valid.txt",
        f"data.val={wiki}/test.txt",
        f"data.test={wiki}/test.txt",
        "tokenizer=bpe",
        "tokenizer.vocab_size=300",
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
        "trainer.limit_val_batches=2",
        "model/embedding=rope",
        run_dir=run_dir,
    )
    return cfg, train(cfg)


def test_results_json_has_val_and_test_metrics(small_run):
    cfg, results = small_run
    on_disk = json.loads((Path(cfg.run_dir) / "results.json").read_text())
    for key in (
        "val_loss",
        "val_ppl",
        "val_bpb",
        "test_loss",
        "test_ppl",
        "test_bpb",
        "params",
        "tokens_per_s",
        "wall_s",
        "peak_mem_mb",
    ):
        assert key in on_disk, key
    assert on_disk["config"]["tokenizer"]["kind"] == "bpe"
    # byte-level BPE tokens hold several bytes: bits per byte < bits per token
    assert results["val_bpb"] < results["val_loss"] / 0.6931
    # the n-gram baseline on the same splits, through the same summary names
    baseline = on_disk["baseline"]
    assert baseline["order"] == cfg.ngram.order and baseline["discount"] == cfg.ngram.discount
    for split in ("val", "test"):
        assert 1 < baseline[split]["ppl"] < float("inf"), baseline[split]
        assert set(baseline[split]) >= {"loss", "ppl", "bpb"}
    assert list(on_disk)[-1] == "config"


def test_results_split_the_run_by_phase(small_run):
    """phase_s covers the run from the first import: each phase is a non-negative share, fit's
    parts hold its steps, and the phases after the first import add up to more than wall_s
    (which starts when train() is called and leaves out the n-gram baselines)."""
    _, results = small_run
    phases = results["phase_s"]
    assert list(phases) == [
        "imports and config", "checks", "loggers", "trainer", "data", "model",
        "final checkpoint", "final evaluation", "n-gram baselines", "loggers' finish",
        "fit: training steps", "fit: validation", "fit: rest",
    ]
    assert all(v >= 0 for v in phases.values()), phases
    assert phases["fit: training steps"] > 0 and phases["final evaluation"] > 0
    assert phases["fit: validation"] == results["fit_val_s"]
    after_import = sum(phases.values()) - phases["imports and config"]
    assert after_import >= results["wall_s"] - 0.05
    # and nothing counted twice: beyond wall_s only the phases it leaves out
    outside_wall = phases["n-gram baselines"] + phases["loggers' finish"]
    assert after_import <= results["wall_s"] + outside_wall + 0.05
    assert phases["final evaluation"] == pytest.approx(results["final_eval_s"], abs=0.05)


def test_checkpoint_loads_weights_only_and_restores_the_model(small_run):
    cfg, results = small_run
    checkpoint = torch.load(results["checkpoint"], map_location="cpu", weights_only=True)
    assert checkpoint["lmkit"]["config"]["model"]["d_model"] == 32
    assert '"model"' in checkpoint["lmkit"]["tokenizer"]  # the tokenizer.json itself
    restored = restore(results["checkpoint"])
    assert restored.global_step == 6
    ids = torch.tensor([restored.tokenizer.encode(" The game began .")])
    state = {k[len("model.") :]: v for k, v in checkpoint["state_dict"].items()}
    assert torch.equal(restored.model.embedding.token.weight, state["embedding.token.weight"])
    assert restored.model(ids).shape == (1, ids.shape[1], restored.tokenizer.vocab_size)


def test_missing_and_corrupt_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.ckpt")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ValueError, match="corrupt or not a torch checkpoint"):
        load_checkpoint(bad)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="not written by lmkit"):
        load_checkpoint(foreign)


def fake_gemm_rates(monkeypatch, bf16: float, fp32: float) -> list:
    """torch.mm timings replaced: bf16 and fp32 reach these FLOP/s; returns the calls made."""
    from lmkit.run import cpu_precision

    calls = []

    def peak(shapes, dtype, seconds):
        calls.append((tuple(shapes), dtype))
        return {"flops_per_s": bf16 if dtype == torch.bfloat16 else fp32, "shape": shapes[0]}

    monkeypatch.setattr(cpu_precision, "matmul_peak", peak)
    return calls


@pytest.mark.parametrize(
    "bf16,fp32,expected",
    [
        (400e9, 190e9, "bf16-mixed"),  # AVX-512 BF16 without AMX (Zen 4): about 2x
        (2000e9, 200e9, "bf16-mixed"),  # AMX
        (220e9, 200e9, "32-true"),  # faster, but by less than the margin (1.2x)
        (40e9, 140e9, "32-true"),  # AVX2 only: bf16 emulated
    ],
)
def test_precision_auto_on_a_cpu_follows_measured_gemms(
    monkeypatch, tmp_path, bf16, fp32, expected
):
    from lmkit.run import runtime

    monkeypatch.setenv("LMKIT_CACHE_DIR", str(tmp_path))
    calls = fake_gemm_rates(monkeypatch, bf16, fp32)
    cfg = compose_config("trainer.accelerator=cpu", "data.batch_size=4", "data.block_size=32")
    assert runtime.resolve_precision("auto", cfg) == expected
    d = cfg.model.d_model
    assert calls == [(((128, d, d), (128, d, 4 * d)), dt) for dt in (torch.bfloat16, torch.float32)]
    assert runtime.resolve_precision("auto", cfg) == expected  # the second time from the cache
    assert len(calls) == 2 and (tmp_path / "cpu_precision.json").is_file()
    assert runtime.resolve_precision("32-true", cfg) == "32-true"  # explicit choices stay
    assert runtime.resolve_precision("bf16-mixed", cfg) == "bf16-mixed"


def test_precision_auto_measures_again_for_other_shapes_or_threads(monkeypatch, tmp_path):
    from lmkit.run import runtime

    monkeypatch.setenv("LMKIT_CACHE_DIR", str(tmp_path))
    calls = fake_gemm_rates(monkeypatch, 100e9, 100e9)
    cfg = compose_config("trainer.accelerator=cpu")
    runtime.resolve_precision("auto", cfg)
    wider = compose_config("trainer.accelerator=cpu", "model.d_model=48", "model.num_heads=4")
    runtime.resolve_precision("auto", wider)
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        runtime.resolve_precision("auto", cfg)
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 6


def test_a_time_budget_ends_the_run_at_the_lr_floor(tmp_path):
    import csv

    cfg = compose_config(
        "trainer.max_steps=-1",
        "trainer.max_time=00:00:00:04",
        "trainer.log_every_n_steps=1",
        "trainer.val_check_interval=50",
        "ngram.enabled=false",
        "optim.warmup_steps=2",
        run_dir=tmp_path,
    )
    results = train(cfg)
    with open(tmp_path / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("lr")]
    steps = int(rows[-1]["step"])
    assert steps >= 5  # max_steps=-1: only the clock stopped it
    peak, floor = cfg.optim.optimizer.lr, cfg.optim.min_lr
    lrs = [float(r["lr"]) for r in rows]
    assert max(lrs) > floor + 0.9 * (peak - floor)  # it went up ...
    assert lrs[-1] < floor + 0.1 * (peak - floor)  # ... and ended decayed to the floor
    assert results["fit_val_s"] > 0 and results["final_eval_s"] > 0 and "val_loss" in results


def test_the_progress_bar_of_a_time_budget_has_no_fake_end():
    from types import SimpleNamespace

    from lmkit.run.callbacks import TrainingProgressBar

    bar = TrainingProgressBar()
    bar._trainer = SimpleNamespace(max_steps=-1, max_epochs=-1, num_training_batches=2**40)
    assert bar.total_train_batches == float("inf")  # shown as "--", no days-long ETA
    assert bar._get_train_description(0) == "Epoch 0   "  # padded to "Validation"
    bar._trainer = SimpleNamespace(
        max_steps=50, max_epochs=-1, num_training_batches=50, global_step=20
    )
    assert bar.total_train_batches == 30  # a step limit keeps Lightning's count
    bar._trainer = SimpleNamespace(max_steps=-1, max_epochs=-1, num_training_batches=40)
    assert bar.total_train_batches == 40  # a finite loader (limit_train_batches) keeps its own


def test_the_progress_bar_redraws_a_few_times_a_second(monkeypatch):
    """Lightning's default (100 redraws a second) runs a busy render thread beside the math
    threads; the bar also re-reads the logged metrics only when a redraw can show them."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import RichProgressBar

    from lmkit.run import callbacks
    from lmkit.run.callbacks import TrainingProgressBar

    bar = TrainingProgressBar()
    assert bar.refresh_rate == 4
    reads = []
    monkeypatch.setattr(RichProgressBar, "_update_metrics", lambda self, t, m: reads.append(1))
    period = 1 / bar.refresh_rate
    now = [100.0]
    monkeypatch.setattr(callbacks, "time", SimpleNamespace(monotonic=lambda: now[0]))
    trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"))
    for offset in (0.0, 0.04, 0.4, 1.2):  # train steps, in redraw periods from the first
        now[0] = 100.0 + offset * period
        bar._update_metrics(trainer, None)
    assert len(reads) == 2  # the first step, and the one a whole period after it
    bar.on_validation_end(trainer, None)  # a new validation loss shows at once ...
    bar.on_train_epoch_end(trainer, None)  # ... and so do an epoch's last figures
    assert len(reads) == 4
    TrainingProgressBar(refresh_rate=0)._update_metrics(trainer, None)  # disabled: no 1 / 0
    assert len(reads) == 5  # and Lightning's own method decides what a disabled bar does


def test_no_step_limit_needs_a_time_budget(tmp_path):
    with pytest.raises(ValueError, match="max_steps=-1 sets no step limit"):
        train(compose_config("trainer.max_steps=-1", run_dir=tmp_path))


def test_precision_auto_on_gpus(monkeypatch):
    from lmkit.run import runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    gpu, auto = (compose_config(f"trainer.accelerator={a}") for a in ("gpu", "auto"))
    assert runtime.resolve_precision("auto", gpu) == "bf16-mixed"
    assert runtime.resolve_precision("auto", auto) == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert runtime.resolve_precision("auto", gpu) == "16-mixed"  # pre-Ampere


def test_runtime_settings_resolve_into_the_config(monkeypatch, tmp_path):
    from lmkit.run import runtime

    monkeypatch.setenv("LMKIT_CACHE_DIR", str(tmp_path))
    fake_gemm_rates(monkeypatch, 50e9, 100e9)
    before = torch.get_float32_matmul_precision()
    cfg = compose_config(
        "trainer.precision=auto", "trainer.accelerator=cpu", "runtime.float32_matmul_precision=high"
    )
    try:
        runtime.apply_runtime_settings(cfg)
        assert cfg.trainer.precision == "32-true"  # what ran is what the checkpoint records
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


def test_the_final_validation_reuses_fits_last_one(tmp_path, monkeypatch):
    from lmkit.task import LanguageModelTask

    passes = []
    original = LanguageModelTask.on_validation_epoch_end

    def counted(self):
        passes.append(self.trainer.state.fn)
        original(self)

    monkeypatch.setattr(LanguageModelTask, "on_validation_epoch_end", counted)
    # max_steps 20, validation every 10: fit validates at 10 and at 20, the final weights
    results = train(compose_config("ngram.enabled=false", run_dir=tmp_path))
    assert passes == ["fit", "fit"]  # no third pass over val after fit
    with open(tmp_path / "metrics.csv") as f:
        import csv

        logged = [float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")]
    assert results["val_loss"] == pytest.approx(logged[-1])


def test_word_normalized_perplexity_of_a_whole_split(tmp_path):
    """Total NLL per word: for the model when the whole split is scored, and for the n-gram."""
    import math

    from lmkit.evaluation import count_words
    from lmkit.ngram import baseline_metrics
    from lmkit.run.build import build_datamodule

    wiki = os.path.join(os.environ["LMKIT_DATA_DIR"], "wikitext-2")
    val_text = Path(f"{wiki}/test.txt").read_text()[:6000]
    (tmp_path / "val.txt").write_text(val_text)
    cfg = compose_config(
        "data=text",
        f"data.train={wiki}/valid.txt",
        f"data.val={tmp_path}/val.txt",
        "tokenizer=bpe",
        "tokenizer.vocab_size=300",
        "trainer.max_steps=3",
        "trainer.limit_val_batches=null",  # the whole split: word ppl is defined
        "ngram.order=3",
        "ngram.word_level=true",
        run_dir=tmp_path / "run",
    )
    results = train(cfg)
    dm = build_datamodule(cfg)
    dm.prepare()
    words, scored = count_words(val_text), dm.meta["tokens"]["val"] - 1
    assert dm.word_counts()["val"] == {"words": words, "scored_tokens": scored}
    nll_sum = results["val_loss"] * scored
    assert results["val_word_ppl"] == pytest.approx(math.exp(nll_sum / words), rel=1e-6)
    assert results["val_word_ppl"] > results["val_ppl"]  # BPE: more tokens than words
    base = results["baseline"]["val"]
    assert base["word_ppl"] == pytest.approx(math.exp(base["loss"] * base["tokens"] / words))
    # the word-level n-gram beside it: the same order fitted on the same files split into words
    word_cfg = compose_config(
        "data=text",
        f"data.train={wiki}/valid.txt",
        f"data.val={tmp_path}/val.txt",
        "tokenizer=word",
        run_dir=tmp_path / "words",
    )
    word_dm = build_datamodule(word_cfg)
    expected = baseline_metrics(word_dm, 3, "modified", use_cache=False)
    assert results["word_baseline"]["order"] == 3
    assert results["word_baseline"]["val"]["ppl"] == pytest.approx(expected["val"]["ppl"])
    assert expected["val"]["tokens"] == words - 1  # a word tokenizer scores every word but one


def test_no_word_perplexity_over_part_of_a_split(small_run):
    _, results = small_run  # limit_val_batches=2: a part of val
    assert "val_word_ppl" not in results


def test_the_word_level_baseline_ignores_the_runs_block_size(tmp_path):
    """A split long enough in characters for the run's windows may hold fewer words than a
    window: the n-gram reads no windows, so the word-level baseline still fits."""
    from lmkit.run.baselines import word_level_baseline

    wiki = os.path.join(os.environ["LMKIT_DATA_DIR"], "wikitext-2")
    val_text = Path(f"{wiki}/test.txt").read_text()[:6000]  # about 1,100 words
    (tmp_path / "val.txt").write_text(val_text)
    cfg = compose_config(
        "data=text",
        f"data.train={wiki}/valid.txt",
        f"data.val={tmp_path}/val.txt",
        "data.block_size=2048",
        "ngram.order=3",
        run_dir=tmp_path / "run",
    )
    baseline = word_level_baseline(cfg)
    assert baseline["order"] == 3 and baseline["val"]["ppl"] > 1
    assert cfg.tokenizer.kind == "char" and cfg.data.block_size == 2048  # the run's own config


def test_malloc_keeps_freed_memory_on_glibc():
    import platform

    from lmkit.run.runtime import keep_freed_memory

    assert keep_freed_memory() == (
        platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    )


def test_training_without_validation_still_writes_results(tmp_path):
    """trainer.limit_val_batches=0, Lightning's switch for no validation: the run trains, skips
    the final val evaluation and writes results.json (no val_* figures in it)."""
    cfg = compose_config("trainer.limit_val_batches=0", "ngram.enabled=false", run_dir=tmp_path)
    results = train(cfg)
    written = json.loads((tmp_path / "results.json").read_text())
    assert results["steps"] == written["steps"] == cfg.trainer.max_steps
    assert not any(key.startswith("val_") for key in written)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
