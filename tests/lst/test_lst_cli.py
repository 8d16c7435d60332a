"""``kexue lst train`` end to end on a tiny TSV and a tiny saved model; usage errors."""

from __future__ import annotations

import json

import pytest

from kexue.cli import main
from kexue.lst import accuracy, encode, load_backbone, load_text_classifier, read_tsv


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


@pytest.fixture
def files(text_task):
    return text_task


@pytest.mark.parametrize("method", ["lst", "full", "lora"])
def test_train_writes_checkpoint_and_metrics(method, files, tmp_path, capsys):
    root, model = files
    out = tmp_path / "run"
    argv = ["lst", "train", "--backbone", str(model), "--data", str(root / "train.tsv")]
    argv += ["--eval", str(root / "dev.tsv"), "--out", str(out), "--method", method]
    argv += ["--epochs", "2", "--batch-size", "8", "--no-progress", "--fisher-samples", "16"]
    argv += ["--reduction-factor", "4"]
    code, stdout, stderr = run_cli(argv, capsys)
    assert code == 0, stderr
    last = stdout.strip().splitlines()[-1]
    assert last.startswith(f"{method}: eval_accuracy=") and "(8 examples)" in last
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == method and metrics["train_examples"] == 40
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    if method == "lst":
        assert {p.name for p in out.iterdir()} == {
            "side_network.safetensors",
            "config.json",
            "metrics.json",
        }
    # the checkpoint reloads (JSON + safetensors) and reproduces the reported accuracy
    backbone, tokenizer = load_backbone(model)
    texts, labels = read_tsv(root / "dev.tsv")
    loaded = load_text_classifier(out, backbone)
    acc = accuracy(loaded, encode(tokenizer, texts, labels, 128), progress=False)
    assert acc == pytest.approx(metrics["eval_accuracy"], abs=1e-9)


def test_cache_backbone_flag(files, tmp_path, capsys):
    root, model = files
    argv = ["lst", "train", "--backbone", str(model), "--data", str(root / "train.tsv")]
    argv += ["--eval", str(root / "dev.tsv"), "--out", str(tmp_path / "c"), "--epochs", "2"]
    argv += ["--no-progress", "--cache-backbone", "--init", "magnitude", "--reduction-factor", "4"]
    code, _stdout, stderr = run_cli(argv, capsys)
    assert code == 0, stderr
    metrics = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert metrics["cache_bytes"] > 0


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--method", "adapter"], "--method"),
        (["--lr", "-1"], "--lr"),
        (["--init", "l1"], "init must be one of"),
        (["--side-layers", "0,x"], "--side-layers"),
        (["--side-layers", "0,9"], "out of range"),
        (["--reduction-factor", "3"], "reduction_factor=3 must divide"),
        (["--method", "full", "--cache-backbone"], "--cache-backbone"),
    ],
)
def test_bad_options_exit_2_with_one_line(extra, fragment, files, tmp_path, capsys):
    root, model = files
    argv = ["lst", "train", "--backbone", str(model), "--data", str(root / "train.tsv")]
    argv += ["--eval", str(root / "dev.tsv"), "--out", str(tmp_path / "x"), "--no-progress"]
    code, _out, err = run_cli(argv + extra, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kexue: error:")
    assert fragment in lines[0]


def test_bad_files_exit_2_naming_the_problem(files, tmp_path, capsys):
    root, model = files
    bad = tmp_path / "bad.tsv"
    bad.write_text("label\tsentence\n1\tfine\nx\toops\n")
    base = ["lst", "train", "--eval", str(root / "dev.tsv"), "--out", str(tmp_path / "o")]
    cases = [
        (["--backbone", str(model), "--data", str(bad)], "bad.tsv:3"),
        (["--backbone", str(model), "--data", str(tmp_path / "none.tsv")], "is not a file"),
        (["--backbone", str(tmp_path), "--data", str(root / "train.tsv")], "config.json"),
    ]
    for extra, fragment in cases:
        code, _, err = run_cli(base + extra, capsys)
        assert code == 2 and fragment in err, err
        assert len(err.strip().splitlines()) == 1


def test_read_tsv_formats(tmp_path):
    p = tmp_path / "a.tsv"
    p.write_text("sentence\tlabel\nnice film\t1\nbad\t0\n")
    assert read_tsv(p) == (["nice film", "bad"], [1, 0])
    p.write_text("1\tnice film\n0\tbad\n\n")
    assert read_tsv(p) == (["nice film", "bad"], [1, 0])
    p.write_text("1 nice film\n")
    with pytest.raises(ValueError, match=r"a\.tsv:1"):
        read_tsv(p)
