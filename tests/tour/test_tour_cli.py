"""The `kexue` command: version, usage errors (exit 2, one line), and a real tour run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kexue import __version__
from kexue.cli import main


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_version(capsys):
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0
    assert out.strip() == f"kexue {__version__}"


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["tour", "nope"], "unknown section 'nope'"),
        (["--bogus"], "No such option: --bogus"),
        (["tour", "--seed", "x"], "--seed"),
        (["frobnicate"], "frobnicate"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, fragment, capsys):
    code, out, err = run_cli(argv, capsys)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("kexue: error:")
    assert fragment in lines[0]


def test_out_must_be_a_folder(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    code, _, err = run_cli(["tour", "ops", "--out", str(blocker)], capsys)
    assert code == 2
    assert "--out" in err and "not a folder" in err


def test_module_entry_point_has_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "kexue.cli", "tour", "nope"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_list_sections(capsys):
    from kexue.tour import SECTIONS

    code, out, _ = run_cli(["tour", "--list"], capsys)
    assert code == 0
    assert out.split() == list(SECTIONS)
    assert {"ops", "losses", "diffusion"} <= set(SECTIONS)


def test_tour_ops_writes_report_json_and_figures(tmp_path: Path, capsys):
    out = tmp_path / "report"
    code, stdout, _ = run_cli(["tour", "ops", "--out", str(out), "--no-progress"], capsys)
    assert code == 0
    assert "report:" in stdout
    html = (out / "report.html").read_text()
    data = json.loads((out / "results.json").read_text())
    section = data["sections"]["ops"]
    assert "machine" in data and data["machine"]["torch"]
    # every inequality held: the smallest slack is >= -1e-9 in each row
    ineq = section["tables"][0]["rows"]
    assert len(ineq) >= 6
    assert all(row[3] == "holds" for row in ineq), ineq
    # every figure exists as a PNG and is referenced by the HTML
    assert section["figures"]
    for fig in section["figures"]:
        png = out / fig["path"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert fig["path"] in html
    # every table cell shown in the HTML is in the JSON
    for table in section["tables"]:
        assert table["caption"] in html


@pytest.mark.slow
def test_full_tour_runs(tmp_path: Path, capsys):
    code, _, _ = run_cli(["tour", "--out", str(tmp_path), "--no-progress"], capsys)
    assert code == 0
    from kexue.tour import SECTIONS

    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data["sections"]) == set(SECTIONS)
