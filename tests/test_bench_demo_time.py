"""bench/demo_time.py: stages from the demo's output, medians, and a demo run in a fresh clone."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import demo_time  # noqa: E402


def test_stage_times_worked_example():
    lines = [(0.5, "setting up"), (1.0, "== [0 s] 1/2 phantoms"), (3.0, "a table"),
             (4.0, "== [3 s] 2/2 train"), (4.5, "  == [0 s] nested step  "), (6.0, "done")]
    assert demo_time.stage_times(lines, end=10.0) == [("1/2 phantoms", 3.0), ("2/2 train", 0.5),
                                                      ("nested step", 5.5)]


@pytest.mark.parametrize("lines,end,msg", [
    ([(0.0, "no stage here")], 1.0, "no '== \\[N s\\]"),
    ([(2.0, "== [0 s] a"), (1.0, "== [1 s] b")], 3.0, "backwards"),
    ([(2.0, "== [0 s] a")], 1.0, "before the last"),
])
def test_stage_times_rejects_bad_output(lines, end, msg):
    with pytest.raises(ValueError, match=msg):
        demo_time.stage_times(lines, end)


def test_medians_and_table():
    runs = [(10.0, [("a", 4.0), ("b", 6.0)]), (14.0, [("a", 2.0), ("b", 12.0)]), (12.0, [("a", 3.0), ("b", 9.0)])]
    total, per = demo_time.medians(runs)
    assert total == 12.0 and per == [("a", 3.0), ("b", 9.0)]
    lines = demo_time.table(runs, (total, per))
    assert lines[2] == "| a | 3 | 4 | 2 | 3 |" and lines[-1] == "| **total** | **12** | 10 | 14 | 12 |"
    with pytest.raises(ValueError, match="different stages"):
        demo_time.medians([(1.0, [("a", 1.0)]), (1.0, [("b", 1.0)])])


def _repo(tmp_path: Path, script: str) -> Path:
    """A git repository holding only scripts/demo.sh."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    (repo / "scripts" / "demo.sh").write_text(script)
    for cmd in (["init", "-q"], ["add", "-A"],
                ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "demo"]):
        subprocess.run(["git", *cmd], cwd=repo, check=True)
    return repo


def test_run_demo_times_a_fresh_clone_with_this_python(tmp_path, monkeypatch):
    # the fake demo proves it ran in a clone (no output folder in the source repository), with
    # PY set to the given interpreter and the caller's DEMO_* settings removed, and that the
    # time between its two stages is measured
    repo = _repo(tmp_path, '[ "$PY" = /some/python ] && [ -z "${DEMO_ITERS:-}" ] && mkdir out\n'
                           'echo "== [0 s] one"; sleep 0.3; echo "== [0 s] two"; sleep 0.1\n')
    monkeypatch.setattr(demo_time, "ROOT", repo)
    monkeypatch.setenv("DEMO_ITERS", "5")
    work = tmp_path / "work"
    work.mkdir()
    total, stages = demo_time.run_demo("/some/python", work)
    assert [s for s, _ in stages] == ["one", "two"]
    assert stages[0][1] >= 0.3 and stages[1][1] >= 0.1 and total < 10
    assert (work / "clone" / "out").is_dir() and not (repo / "out").exists()


def test_run_demo_failure_names_the_exit_code_and_the_error(tmp_path, monkeypatch):
    repo = _repo(tmp_path, 'echo "== [0 s] one"; echo "boom: no data" >&2; exit 3\n')
    monkeypatch.setattr(demo_time, "ROOT", repo)
    with pytest.raises(RuntimeError, match="exit code 3.*demo_stderr.log.*boom: no data"):
        demo_time.run_demo(sys.executable, tmp_path)
    assert "boom: no data" in (tmp_path / "demo_stderr.log").read_text()


def test_main_refuses_an_existing_record_before_running(monkeypatch, tmp_path, capsys):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "old.json").write_text("{}")
    monkeypatch.setattr(demo_time, "ROOT", tmp_path)
    monkeypatch.setattr(demo_time, "run_demo", lambda *a: pytest.fail("the demo must not run"))
    with pytest.raises(SystemExit) as e:
        demo_time.main(["--record", "old", "--runs", "1"])
    assert e.value.code == 2 and "results/old.json exists" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["a b", "../x"])
def test_main_refuses_a_bad_record_name_before_running(monkeypatch, tmp_path, capsys, name):
    monkeypatch.setattr(demo_time, "ROOT", tmp_path)
    monkeypatch.setattr(demo_time, "run_demo", lambda *a: pytest.fail("the demo must not run"))
    with pytest.raises(SystemExit) as e:
        demo_time.main(["--record", name])
    assert e.value.code == 2 and "record name" in capsys.readouterr().err


def test_main_records_the_medians(monkeypatch, tmp_path):
    runs = iter([(10.0, [("a", 4.0), ("b", 6.0)]), (14.0, [("a", 2.0), ("b", 12.0)]), (12.0, [("a", 3.0), ("b", 9.0)])])
    (tmp_path / "results").mkdir()
    monkeypatch.setattr(demo_time, "ROOT", tmp_path)
    # uncommitted changes here: the clones time HEAD, and the record names HEAD, not "-dirty"
    monkeypatch.setattr(demo_time, "version_of", lambda root: "abc123-dirty")
    monkeypatch.setattr(demo_time.tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(demo_time, "run_demo", lambda python, work: next(runs))
    assert demo_time.main(["--runs", "3", "--record", "t"]) == 0
    doc = json.loads((tmp_path / "results" / "t.json").read_text())
    assert doc["numbers"]["total_s"] == 12.0 and doc["numbers"]["runs_total_s"] == [10.0, 14.0, 12.0]
    assert doc["numbers"]["stages"] == [{"stage": "a", "median_s": 3.0}, {"stage": "b", "median_s": 9.0}]
    assert doc["inputs"] == {"runs": 3, "commit": "abc123"} and doc["code_version"] == "abc123"


def test_main_fails_in_one_line_when_the_demo_prints_no_stage(monkeypatch, tmp_path, capsys):
    def no_stage(python, work):
        return 1.0, demo_time.stage_times([(0.0, "nothing")], 1.0)
    monkeypatch.setattr(demo_time, "ROOT", tmp_path)
    monkeypatch.setattr(demo_time.tempfile, "tempdir", str(tmp_path))  # the kept work folder lands here
    monkeypatch.setattr(demo_time, "run_demo", no_stage)
    assert demo_time.main(["--runs", "1"]) == 1
    assert "no '== [N s] <stage>' line" in capsys.readouterr().err
