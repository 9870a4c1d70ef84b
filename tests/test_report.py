"""`srel-fast report`: result files -> one Markdown table (+ PNG)."""
import json

import pytest

from srel_fast.cli import main


def _train_result(path, syn, student, acc, label_mode="soft"):
    path.mkdir(parents=True)
    (path / "train_results.json").write_text(json.dumps({
        "config": {"syn": syn, "label_mode": label_mode}, "model": {"arch": student},
        "results": {"test_accuracy": acc, "seconds": 1.0}, "num_images": 100}))
    return path / "train_results.json"


def test_report_table(tmp_path, capsys):
    a = _train_result(tmp_path / "r" / "a", "/gone/syn-convnet3", "convnet3", 71.234)
    _train_result(tmp_path / "r" / "b", "/gone/syn-convnet3", "resnet18-small", 65.0)
    _train_result(tmp_path / "r" / "c", "/gone/syn-bn-vit-tiny-small", "convnet3", 60.5)
    out = tmp_path / "rep" / "table.md"
    assert main(["report", "--inputs", f"{tmp_path / 'r'}", "--out", str(out)]) == 0
    md = out.read_text()
    assert "| recovery model / synthetic set | convnet3 | resnet18-small |" in md
    assert "| convnet3 | 71.23 | 65.00 |" in md
    assert "| bn-vit-tiny-small | 60.50 | - |" in md
    assert (tmp_path / "rep" / "table.png").stat().st_size > 1000
    # two explicit files, one of them a hard-label run
    h = _train_result(tmp_path / "h", "/gone/syn-convnet3", "convnet3", 50.0, label_mode="hard")
    out2 = tmp_path / "t2.md"
    assert main(["report", "--inputs", f"{a},{h}", "--out", str(out2)]) == 0
    lines = out2.read_text().splitlines()
    assert "| convnet3 | 71.23 |" in lines and "| convnet3, hard labels | 50.00 |" in lines


def test_report_reads_recover_config_and_continual(tmp_path):
    syn = tmp_path / "mysyn"
    syn.mkdir()
    (syn / "recover_config.json").write_text(json.dumps({"model": {"arch": "resnet18-small"}, "config": {"ipc": 10},
                                                      "teacher_test_accuracy": 80.123}))
    _train_result(tmp_path / "r" / "x", str(syn), "convnet3", 42.0)
    (tmp_path / "r" / "cl").mkdir()
    (tmp_path / "r" / "cl" / "continual_results.json").write_text(json.dumps({
        "memory_per_class": 10, "splits": {"2": [[0], [1]]},
        "results": {"2": {"synthetic-soft": [100.0, 90.0], "real-hard": [100.0, 80.0]}}}))
    out = tmp_path / "t.md"
    assert main(["report", "--inputs", str(tmp_path / "r"), "--out", str(out)]) == 0
    md = out.read_text()
    assert "| resnet18-small (IPC 10, teacher 80.1%) | 42.00 |" in md
    assert "| srel-fast synthetic, soft labels | 100.00 | 90.00 |" in md
    assert "| random real, hard labels (GDumb) | 100.00 | 80.00 |" in md


@pytest.mark.parametrize("args,msg", [
    (["--inputs", "/nonexistent", "--out", "x.md"], "does not exist"),
    (["--inputs", ".", "--out", "x.txt"], "Markdown"),
])
def test_report_errors(tmp_path, capsys, args, msg):
    assert main(["report"] + args) == 2
    assert msg in capsys.readouterr().err


def test_report_no_results(tmp_path, capsys):
    assert main(["report", "--inputs", str(tmp_path), "--out", str(tmp_path / "x.md")]) == 2
    assert "no train_results.json" in capsys.readouterr().err
