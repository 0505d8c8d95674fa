"""The sweep report on a synthetic sweep dir: numbers in the table, failures listed, PNGs."""

import json
import subprocess
import sys

import yaml
from support import REPO

from lmkit.report import collect_runs, val_curves, write_report

BASELINE = {"order": 5, "val": {"loss": 1.5, "ppl": 4.4817, "bpb": 2.164}}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_job(folder, mixer, *, results=None, error=None, d_model=64, mqar=False, extra=()):
    (folder / ".hydra").mkdir(parents=True)
    overrides = [f"model/mixer={mixer}", *extra]
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    choices = {"model/mixer": mixer, "data": "mqar" if mqar else "tinyshakespeare"}
    (folder / ".hydra" / "hydra.yaml").write_text(
        yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}})
    )
    target = "lmkit.data.mqar.MQARDataModule" if mqar else "lmkit.data.datamodule.TextDataModule"
    if results is not None:
        config = {"model": {"d_model": d_model}, "data": {"_target_": target}}
        (folder / "results.json").write_text(json.dumps({**results, "config": config}))
        rows = ["step,train/loss,val/loss,val/elapsed_s", "49,2.5,,", "49,,2.6,5.0"]
        rows += ["99,2.0,,", "99,,2.1,10.0", "100,,2.1,"]  # the last: validate() after fit
        (folder / "metrics.csv").write_text("\n".join(rows) + "\n")
        bench = {
            "layer": [
                {"T": t, "ms": t**1.5 / 1e3, "peak_mb": 1.0, "batch_size": 1} for t in (256, 1024)
            ]
        }
        (folder / "bench.json").write_text(json.dumps(bench))
    if error is not None:
        (folder / "error.json").write_text(json.dumps(error))


def text_results(val_loss, params):
    return {
        "val_loss": val_loss,
        "val_ppl": 2.718281828**val_loss,
        "val_bpb": 2.5,
        "val_acc": 0.4,
        "params": params,
        "tokens_per_s": 12345.6,
        "peak_mem_mb": 512.4,
        "wall_s": 61.7,
        "baseline": BASELINE,
    }


def test_report_table_failures_and_plots(tmp_path):
    make_job(tmp_path / "0", "softmax", results=text_results(1.9, 812_345))
    make_job(tmp_path / "1", "linear", results=text_results(2.0, 800_000))
    make_job(tmp_path / "2", "mamba", error={"type": "ValueError", "message": "d_model=30 | bad"})
    make_job(tmp_path / "3", "sparse")  # started, never finished
    report = write_report(tmp_path)
    text = report.read_text()
    assert report == tmp_path / "report.md"
    assert "4 runs: 2 finished, 2 failed or unfinished." in text
    table = [line for line in text.splitlines() if line.startswith("| mixer=")]
    softmax = [c.strip() for c in table[0].strip("|").split("|")]
    # run, mixer, params, val loss, val ppl, val bpb, tokens/s, peak mem, wall, val acc
    assert softmax == [
        "mixer=softmax",
        "softmax",
        "812,345",
        "1.9000",
        "6.69",
        "2.500",
        "12,346",
        "512",
        "62",
        "40.0",
    ]
    assert "| KN5 n-gram baseline | - | - | 1.5000 | 4.48 | - | 2.164 |" not in text  # no test col
    assert "| KN5 n-gram baseline | - | - | 1.5000 | 4.48 | 2.164 | - | - | - | - |" in text
    # failures are listed with their error (pipes escaped), unfinished runs said so
    assert "| mixer=mamba | 2 | failed | ValueError: d_model=30 \\| bad |" in text
    assert "| mixer=sparse | 3 | unfinished | no results.json or error.json" in text
    for name in ("val_loss.png", "throughput.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
        assert f"![{name}]({name})" in text
    assert not (tmp_path / "accuracy_vs_width.png").exists()  # not an MQAR sweep
    # every plot has a one-line caption in italics right after it
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("!["):
            assert lines[i + 2].startswith("*") and lines[i + 2].endswith("*")


def test_runs_are_read_in_job_order_with_metrics(tmp_path):
    for i, mixer in enumerate(["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k"]):
        make_job(tmp_path / str(i), mixer, results=text_results(2.0, 10))
    runs = collect_runs(tmp_path)
    assert [r.path.name for r in runs] == [str(i) for i in range(11)]
    assert [m["val/loss"] for m in runs[0].metrics if "val/loss" in m] == [2.6, 2.1, 2.1]
    assert runs[0].label == "mixer=a"
    by_step, by_time = val_curves(runs[0])
    assert by_step == [(49, 2.6), (99, 2.1), (100, 2.1)]
    assert by_time == [(5.0, 2.6), (10.0, 2.1)]  # the validation after fit has no clock


def test_mqar_sweep_plots_accuracy_against_width(tmp_path):
    job = 0
    for mixer, accs in (("softmax", [0.99, 1.0]), ("linear", [0.1, 0.5])):
        for width, acc in zip((32, 64), accs, strict=True):
            results = {"val_loss": 1.0, "val_acc": acc, "params": 1, "wall_s": 1.0}
            make_job(
                tmp_path / str(job),
                mixer,
                results=results,
                d_model=width,
                mqar=True,
                extra=[f"model.d_model={width}"],
            )
            job += 1
    text = write_report(tmp_path).read_text()
    assert (tmp_path / "accuracy_vs_width.png").read_bytes()[:8] == PNG_MAGIC
    assert "| mixer=softmax d_model=32 | softmax |" in text and "| 99.0 |" in text
    # not text: answer accuracy, no perplexity, bits per byte or n-gram row
    assert "val acc on answers (%)" in text and "ppl" not in text and "bpb" not in text


def test_compare_script(tmp_path):
    make_job(tmp_path / "0", "softmax", results=text_results(1.9, 100))
    done = subprocess.run(
        [sys.executable, "scripts/compare.py", f"sweep_dir={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "| mixer=softmax | softmax |" not in done.stdout  # one run: labelled by its folder
    assert "| 0 | softmax | 100 |" in done.stdout and (tmp_path / "report.md").is_file()
    missing = subprocess.run(
        [sys.executable, "scripts/compare.py", f"sweep_dir={tmp_path / 'nope'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_word_normalized_perplexity_column_beside_the_baseline(tmp_path):
    words = {**text_results(1.9, 812_345), "val_word_ppl": 123.4}
    make_job(tmp_path / "0", "softmax", results=words)
    make_job(tmp_path / "1", "linear", results=text_results(2.0, 800_000))  # no word count
    baseline = {**BASELINE, "val": {**BASELINE["val"], "word_ppl": 150.0}}
    for folder in ("0", "1"):
        path = tmp_path / folder / "results.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "baseline": baseline}))
    text = write_report(tmp_path).read_text()
    assert "val ppl per word" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("|")}
    cells = [c.strip() for c in rows["mixer=softmax"].strip("|").split("|")]
    assert cells[6] == "123.40" and "| 150.00 |" in rows["KN5 n-gram baseline"]
    assert [c.strip() for c in rows["mixer=linear"].strip("|").split("|")][6] == "-"


def test_word_level_baseline_row_and_word_perplexity_plot(tmp_path):
    """ngram.word_level=true: the word-level n-gram gets a row (per-word column only) and the
    per-word perplexity is drawn against wall time with both baselines."""
    words = {
        **text_results(1.9, 812_345),
        "val_word_ppl": 300.0,
        "word_baseline": {"order": 5, "val": {"loss": 5.45, "ppl": 232.5, "bpb": 1.5}},
    }
    make_job(tmp_path / "0", "softmax", results=words)
    rows = ["step,val/loss,val/word_ppl,val/elapsed_s", "49,2.6,900.0,5.0", "99,2.1,400.0,10.0"]
    (tmp_path / "0" / "metrics.csv").write_text("\n".join(rows) + "\n")
    text = write_report(tmp_path).read_text()
    row = next(line for line in text.splitlines() if line.startswith("| KN5 word-level"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[6] == "232.50" and set(cells[2:6]) == {"-"}  # no per-token figures
    assert (tmp_path / "word_ppl.png").read_bytes().startswith(PNG_MAGIC)
    assert "![word_ppl.png](word_ppl.png)" in text


def test_no_word_perplexity_plot_without_the_word_level_baseline(tmp_path):
    make_job(tmp_path / "0", "softmax", results={**text_results(1.9, 1), "val_word_ppl": 3.0})
    rows = ["step,val/loss,val/word_ppl,val/elapsed_s", "49,2.6,900.0,5.0"]
    (tmp_path / "0" / "metrics.csv").write_text("\n".join(rows) + "\n")  # curves, no baseline
    write_report(tmp_path)
    assert not (tmp_path / "word_ppl.png").exists()


def test_labels_never_start_with_an_underscore(tmp_path):
    """matplotlib leaves labels that start with '_' out of the legend."""
    make_job(tmp_path / "0", "softmax", results=text_results(1.9, 1))
    make_job(tmp_path / "1", "softmax", results=text_results(2.0, 1), extra=["model._target_=x"])
    labels = [run.label for run in collect_runs(tmp_path)]
    assert labels == ["0", "model._target_=x"]
