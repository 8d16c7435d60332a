"""One run pipeline: ``RunSpec`` -> ``run`` -> ``RunResult``, the same for the CLI, the memory
probe and the Python API."""

from __future__ import annotations

import json

import pytest
import torch

from kexue.cli import main
from kexue.lst import RunSpec, load_inputs, right_pad, run
from kexue.lst.measure import measure

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")


def _spec(text_task, **kwargs) -> RunSpec:
    root, model = text_task
    options = {
        "backbone": model,
        "train": root / "train.tsv",
        "eval": root / "dev.tsv",
        "epochs": 1,
        "batch_size": 8,
        "fisher_samples": 16,
        "reduction_factor": 4,
    }
    return RunSpec(**{**options, **kwargs})


@pytest.mark.parametrize("method", ["lst", "full", "lora"])
def test_cli_probe_and_api_run_the_same_pipeline(method, text_task, tmp_path, capsys):
    """``kexue lst train``, ``measure`` (the memory probe) and ``run`` give the same numbers
    for the same options (also with a subset, which the CLI and the probe once drew
    differently)."""
    spec = _spec(text_task, method=method, train_size=30, seed=3)
    result = run(spec, progress=False)
    probed = measure(spec)
    root, model = text_task
    argv = ["lst", "train", "--backbone", str(model), "--data", str(root / "train.tsv")]
    argv += ["--eval", str(root / "dev.tsv"), "--out", str(tmp_path), "--method", method]
    argv += ["--epochs", "1", "--batch-size", "8", "--fisher-samples", "16"]
    argv += ["--reduction-factor", "4", "--limit", "30", "--seed", "3", "--no-progress"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["spec"] == spec.to_dict()
    for other in (probed, metrics):
        assert other["eval_accuracy"] == result.accuracy
        assert other["final_loss"] == result.to_dict()["final_loss"]
        assert other["trainable_parameters"] == result.trainable_parameters
    assert probed["losses"] == result.stats.losses
    assert probed["peak_train_mib"] >= 0 or not probed["peak_reset"]  # in-process: reused pages
    assert result.train_examples == 30 and result.eval_examples == 8


def test_result_and_spec_are_plain_json(text_task):
    spec = _spec(text_task, side_layers=[0, 2])
    assert RunSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    result = run(spec, progress=False)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["lst_config"]["side_layers"] == [0, 2] and len(data["gates"]["encoder"]) == 2
    assert data["num_labels"] == 2 and data["method"] == "lst"
    assert result.model is not None and not result.model.training


def test_the_subset_depends_on_subset_seed_only(text_task):
    a = load_inputs(_spec(text_task, train_size=10, seed=0))
    b = load_inputs(_spec(text_task, train_size=10, seed=7))
    c = load_inputs(_spec(text_task, train_size=10, subset_seed=1))
    assert a.train_set.ids == b.train_set.ids and a.train_set.ids != c.train_set.ids
    assert a.pad_id == a.tokenizer.pad_token_id


def test_run_leaves_the_global_generator_alone(text_task):
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    run(_spec(text_task, method="full"), progress=False)
    assert torch.equal(torch.rand(2), expected)


def test_progress_bars_only_when_asked(text_task, capsys):
    spec = _spec(text_task, init="fisher")
    run(spec, progress=False)
    assert capsys.readouterr().err == ""
    run(spec, progress=True)
    err = capsys.readouterr().err
    assert "Fisher pass" in err and "training" in err and "evaluating" in err


@pytest.mark.parametrize(
    "kwargs, error, fragment",
    [
        ({"method": "adapter"}, ValueError, "method"),
        ({"reduction_factor": 0}, ValueError, "reduction_factor"),
        ({"init": "l1"}, ValueError, "init"),
        ({"side_layers": [1, 0]}, ValueError, "side_layers"),
        ({"lr": 0.0}, ValueError, "lr"),
        ({"epochs": 0}, ValueError, "epochs"),
        ({"batch_size": 2.5}, TypeError, "batch_size"),
        ({"train_size": 0}, ValueError, "train_size"),
        ({"cache_dtype": "int8"}, ValueError, "cache_dtype"),
        ({"method": "full", "cache_backbone": True}, ValueError, "cache_backbone"),
        ({"backbone": 3}, TypeError, "backbone"),
    ],
)
def test_bad_spec_values_name_the_field(kwargs, error, fragment):
    base = {"backbone": "m", "train": "t.tsv", "eval": "e.tsv"}
    with pytest.raises(error, match=fragment):
        RunSpec(**{**base, **kwargs})
    with pytest.raises(ValueError, match="reduction"):
        RunSpec.from_dict({**base, "reduction": 4})


def test_eval_labels_must_occur_in_training(text_task, tmp_path):
    bad = tmp_path / "dev.tsv"
    bad.write_text("2\tthe movie was good\n")
    with pytest.raises(ValueError, match=r"label 2 never occurs.*0\.\.1"):
        load_inputs(_spec(text_task, eval=bad))


def test_right_pad_stacks_along_any_axis():
    a, b = torch.arange(6.0).view(2, 3, 1), torch.arange(4.0).view(2, 2, 1)
    out, mask = right_pad([a, b], dim=1, value=-1.0)
    assert out.shape == (2, 2, 3, 1) and mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert torch.equal(out[:, 0], a) and torch.equal(out[:, 1, :2], b)
    assert (out[:, 1, 2] == -1).all()
    ids, mask = right_pad([torch.tensor([5, 6, 7]), torch.tensor([8])], value=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.dtype == torch.long
