"""The documentation is part of the product: rendered from records, short where users start, linked."""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import re
import sys
from pathlib import Path
from typing import Iterator

import pytest

from utils.records import RECORD_FORMAT, RESULTS_DIR, read_record, write_record

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("render_docs", ROOT / "scripts" / "render_docs.py")
render_docs = importlib.util.module_from_spec(_spec)
sys.modules["render_docs"] = render_docs
_spec.loader.exec_module(render_docs)


@pytest.mark.parametrize("doc", render_docs.DOCUMENTS)
def test_committed_documents_equal_what_the_records_render(doc):
    path = ROOT / doc
    assert path.is_file(), doc
    text = path.read_text()
    assert render_docs.render_text(text, doc) == text, f"{doc} is stale: run python scripts/render_docs.py"


def test_every_rendered_block_is_known_and_every_record_reads():
    for doc in render_docs.DOCUMENTS:
        for m in render_docs.BLOCK.finditer((ROOT / doc).read_text()):
            name = m.group(2)
            assert name in render_docs.RENDERERS or (RESULTS_DIR / f"{name[len('table-'):]}.json").is_file(), (doc, name)
    records = sorted(RESULTS_DIR.glob("*.json"))
    assert records
    for path in records:
        r = read_record(path)
        assert r["name"] == path.stem and r["code_version"] and r["machine"]["cpu_count"] and r["numbers"]


def test_readme_is_short_and_reaches_predict_early():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 210
    first = next(i for i, line in enumerate(lines) if "python predict.py" in line)
    assert first < 100


def test_local_links_resolve():
    for doc in render_docs.DOCUMENTS:
        path = ROOT / doc
        for target in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", path.read_text()):
            if "://" in target:
                continue
            assert (path.parent / target).exists(), f"{doc}: link to {target} does not resolve"


def test_unknown_block_and_stale_text_are_reported(tmp_path):
    with pytest.raises(ValueError, match="unknown rendered block 'nope'"):
        render_docs.render_text("<!-- render:nope -->\nx\n<!-- /render:nope -->", "t.md")
    stale = "<!-- render:flags-predict -->\nold\n<!-- /render:flags-predict -->"
    fresh = render_docs.render_text(stale)
    assert fresh != stale and "| `--model` | required |" in fresh


def test_record_round_trip_and_bad_records(tmp_path):
    path = write_record("x", {"dice": 0.5}, description="a test", inputs={"n": 1}, command="cmd", folder=tmp_path)
    r = read_record(path)
    assert r["format"] == RECORD_FORMAT and r["numbers"] == {"dice": 0.5} and r["command"] == "cmd"
    assert r["machine"]["cpu_count"] >= 1 and r["date"][:2] == "20"
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="bad.json: not a livervessel-record-v1 record"):
        read_record(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json: not a readable JSON record"):
        read_record(tmp_path / "broken.json")


def test_record_report_publishes_a_test_report(tiny_dataset, tmp_path, one_thread):
    """scripts/record_report.py: the record holds the report's summary, the model's hash and
    iterations and the code version of the report's provenance, not of the publishing run."""
    from evaluation.runner import run_evaluation
    from trainer import TrainConfig, train

    spec = importlib.util.spec_from_file_location("record_report", ROOT / "scripts" / "record_report.py")
    record_report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(record_report)
    ds = tiny_dataset
    train(TrainConfig(dataset=ds.dataset, root_path=str(ds.root_path), list_dir=str(ds.list_dir),
                      output_root=str(tmp_path / "ckpt"), model_kwargs={"base_channels": 4, "depth": 2},
                      img_size=(32, 32), batch_size=2, num_workers=0, max_epochs=1, max_iterations=2, salience="none"))
    rep = run_evaluation(dataset=ds.dataset, backbone="unet", root_path=ds.root_path, list_dir=ds.list_dir,
                         checkpoint_root=tmp_path / "ckpt", device="cpu")
    summary = json.loads((rep.output / "summary.json").read_text())
    summary["meta"]["provenance"]["code_version"] = "abc123"
    (rep.output / "summary.json").write_text(json.dumps(summary))
    path = record_report.record_report("tiny_test", rep.output, "pytest", folder=tmp_path / "results")
    r = read_record(path)
    assert r["code_version"] == "abc123" and r["command"] == "pytest"
    assert r["numbers"]["metrics"]["dice"] == summary["metrics"]["dice"] and r["numbers"]["iterations"] == 2
    assert r["inputs"]["model_sha256"] == summary["meta"]["model_sha256"] and r["numbers"]["salience"] == "none"
    with pytest.raises(FileExistsError, match="tiny_test.json: exists"):
        record_report.record_report("tiny_test", rep.output, "pytest", folder=tmp_path / "results")


def test_run_recorded_keeps_what_a_bench_script_printed(tmp_path, capsys):
    import utils.records as records

    seen = {}

    def bench_main(argv):
        seen["argv"] = argv
        print("machine: test\n| size | seconds |\n|---|---|\n| 64 | 0.25 |")
        return 0

    assert records.run_recorded(bench_main, "a bench", ["--size", "64", "--record", "b1"], tmp_path) == 0
    assert seen["argv"] == ["--size", "64"]  # --record is not the script's own flag
    r = read_record(tmp_path / "b1.json")
    assert r["numbers"]["table_markdown"] == ["| size | seconds |", "|---|---|", "| 64 | 0.25 |"]
    assert r["numbers"]["printed"][0] == "machine: test" and r["inputs"]["argv"] == ["--size", "64"]
    assert "| 64 | 0.25 |" in capsys.readouterr().out  # still printed
    # a failing run, or one without a table, records nothing
    assert records.run_recorded(lambda argv: 1, "x", ["--record", "b2"], tmp_path) == 1
    assert records.run_recorded(lambda argv: print("no table"), "x", ["--record", "b3"], tmp_path) == 1
    assert not (tmp_path / "b2.json").exists() and not (tmp_path / "b3.json").exists()
    with pytest.raises(ValueError, match="record name '../x'"):
        records.write_record("../x", {}, description="d", folder=tmp_path)


def test_option_tables_show_flags_as_off_and_values_as_their_defaults():
    """preprocess.py's --no-masks is a store_false flag whose dest defaults to True: the table must
    not say `True` (it reads as "images only by default"); a store_true flag and a value keep
    their true defaults."""
    rows = {r.split(" | ")[0].strip("| `").split(" ")[0]: r for r in render_docs._flag_table("preprocess").splitlines()}
    assert rows["--no-masks"].split(" | ")[1] == ""
    assert rows["--overwrite"].split(" | ")[1] == ""
    assert rows["--crop"].split(" | ")[1] == "`liver_z`"


def test_demo_time_sentence_from_a_record(tmp_path, monkeypatch):
    numbers = {"total_s": 330.0, "runs_total_s": [320.0, 330.0, 345.0], "stages": [], "table_markdown": []}
    write_record(render_docs.DEMO_TIME_RECORD, numbers, description="d", folder=tmp_path, code="0123456789ab-dirty",
                 inputs={"runs": 3, "commit": "abcdef1234567"})
    monkeypatch.setattr(render_docs, "RESULTS_DIR", tmp_path)
    text = render_docs.demo_time()
    assert text.startswith(f"Measured: 5.5 minutes on {os.cpu_count()} CPU cores") and "median of 3 runs" in text
    assert "commit `abcdef1234`" in text and f"(results/{render_docs.DEMO_TIME_RECORD}.json)" in text


# a command line: an interpreter (python, $PY, torchrun, $TORCHRUN, -m torch.distributed.run and its
# options) then a script; or, in Markdown, a script named in backticks with its flags. Its flags run
# to the end of the line or of the backticks, a comment, or the next command (; | &&)
_RUNNER = r"(?:python3?|\$PY|\$TORCHRUN|torchrun|-m torch\.distributed\.run)(?:\s+--?[\w-]+(?:[= ]\S+)?)*?\s+"
_COMMAND = re.compile(_RUNNER + r"((?:bench/|scripts/)?\w+)\.py\b([^`\n#;|&]*)")
_BACKTICKED = re.compile(r"`((?:bench/|scripts/)?\w+)\.py\s+(--[^`\n]*)`")
_FLAG = re.compile(r"(?<![\w-])(--[A-Za-z][\w-]*)")


def _commands(text: str, markdown: bool) -> Iterator[tuple[int, str, str]]:
    """(line, script, its flags' text) of every command line in ``text`` (one continued with a
    backslash is read as one; lines are those of ``text``). In Markdown also the scripts named in
    backticks with flags, except on the rendered "*Measured:" lines, which quote the commands that
    made a record, whatever their flags were then."""
    joined = text.replace("\\\n", "  ")  # the same length: offsets, and so line numbers, stay
    patterns = (_COMMAND, _BACKTICKED) if markdown else (_COMMAND,)
    seen = set()
    for pattern in patterns:
        for m in pattern.finditer(joined):
            start = joined.rfind("\n", 0, m.start()) + 1
            if markdown and joined.startswith("*Measured:", start) or m.start(1) in seen:
                continue
            seen.add(m.start(1))
            yield text.count("\n", 0, m.start(1)) + 1, m.group(1), m.group(2)


def _unknown_flags(text: str, known: dict[str, set[str]], markdown: bool = True) -> list[tuple[int, str, str]]:
    """(line, command, flag) for every ``--flag`` given to one of ``known``'s commands in ``text``
    that its parser does not have."""
    return sorted((n, name, f) for n, name, flags in _commands(text, markdown) if name in known
                  for f in _FLAG.findall(flags) if f not in known[name])


class _Parsed(Exception):
    """Raised in place of parsing: carries the parser a script built."""


def _script_flags(path: Path, monkeypatch) -> set[str]:
    """The options of the parser a bench or helper script's ``main`` builds; ``main`` stops at
    its first parse, so nothing of the script runs."""
    spec = importlib.util.spec_from_file_location(f"_flags_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def parsed(parser, *args, **kwargs):
        raise _Parsed(parser)

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", parsed)
        m.setattr(argparse.ArgumentParser, "parse_known_args", parsed)
        m.setattr(sys, "argv", [str(path)])
        with pytest.raises(_Parsed) as e:
            module.main([]) if inspect.signature(module.main).parameters else module.main()
    return {o for a in e.value.args[0]._actions for o in a.option_strings}


def test_documented_command_lines_use_existing_flags(monkeypatch):
    known = {}
    for module in render_docs.COMMANDS:
        parser = importlib.import_module(module).build_parser()
        known[module] = {o for a in parser._actions for o in a.option_strings}
    sample = ("run `python predict.py --model M \\\n    --bogus 1` then `$PY test.py --dataset x` and\n"
              "`main.py --nope` # not --a_comment\n$TORCHRUN --nproc_per_node 2 main.py --nope2 | tee x --no\n"
              "*Measured: (`test.py --old_flag`)*")
    assert _unknown_flags(sample, known) == [(1, "predict", "--bogus"), (3, "main", "--nope"), (4, "main", "--nope2")]
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "scripts").glob("*.sh")),
            ROOT / "Makefile"]
    scripts = {name for doc in docs for _, name, _ in _commands(doc.read_text(), doc.suffix == ".md") if "/" in name}
    for name in scripts:
        assert (ROOT / f"{name}.py").is_file(), f"{name}.py is named in the docs and does not exist"
        known[name] = _script_flags(ROOT / f"{name}.py", monkeypatch)
        assert known[name] - {"-h", "--help"}, name
    checked = 0
    for doc in docs:
        md = doc.suffix == ".md"
        assert _unknown_flags(doc.read_text(), known, md) == [], doc.name
        checked += sum(len(_FLAG.findall(f)) for _, name, f in _commands(doc.read_text(), md) if name in known)
    # the patterns still find the docs' command lines (flags in bash arrays are not read)
    assert checked > 400, checked


def test_records_are_never_overwritten(tmp_path, capsys, monkeypatch):
    """A taken record name is refused: by write_record (unless the user asked to overwrite), by a
    bench run through run_recorded before the bench runs, and by a bench script's own --record
    when its arguments are parsed (results/demo_time.json is in the repository)."""
    import utils.records as records

    write_record("x", {"dice": 0.5}, description="first", folder=tmp_path)
    with pytest.raises(ValueError, match="x.json exists: records are never overwritten"):
        write_record("x", {"dice": 0.6}, description="second", folder=tmp_path)
    assert read_record(tmp_path / "x.json")["numbers"] == {"dice": 0.5}
    write_record("x", {"dice": 0.7}, description="asked", folder=tmp_path, overwrite=True)
    assert read_record(tmp_path / "x.json")["numbers"] == {"dice": 0.7}
    ran = []
    with pytest.raises(SystemExit, match="--record: .*x.json exists"):
        records.run_recorded(lambda argv: ran.append(argv), "x", ["--record", "x"], tmp_path)
    assert ran == []  # refused before measuring
    assert (RESULTS_DIR / "demo_time.json").is_file()
    spec = importlib.util.spec_from_file_location("bench_tree_scores", ROOT / "bench" / "tree_scores.py")
    tree_scores = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tree_scores)
    monkeypatch.setattr(sys, "argv", ["tree_scores.py", "--binary", str(tmp_path), "--trees", str(tmp_path),
                                      "--record", "demo_time"])
    with pytest.raises(SystemExit) as e:
        tree_scores.main()
    assert e.value.code == 2 and "demo_time.json exists" in capsys.readouterr().err


def test_tree_headline_spans_the_sets_and_names_a_missing_row(tmp_path, monkeypatch):
    monkeypatch.setattr(render_docs, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(render_docs, "TREE_RECIPE_ROWS", (("trees_a", "recipe", "seed 0"),))

    def row(wrong, dice, portal, hepatic):
        return {"wrong_tree_share": wrong, "dice": dice, "portal_dice": portal, "hepatic_dice": hepatic}

    rows = {"recipe (seed-400 phantoms)": row(0.10, 0.60, 0.50, 0.55),
            "recipe (seed-300 phantoms)": row(0.05, 0.70, 0.68, 0.66),
            "recipe (seed-500 phantoms)": row(0.20, 0.65, 0.60, 0.62),
            "recipe (real patients 1 and 7)": row(0.30, 0.61, 0.41, 0.51)}
    write_record("trees_a", {"rows": rows}, description="d", inputs={}, command="c", folder=tmp_path)
    text = render_docs.tree_headline()
    # wrong tree 5-20% over the sets; each tree under the union by 0.02 (0.70 - 0.68) to 0.10 (0.60 - 0.50)
    assert "| seed 0 | 5.0-20.0% | 0.02-0.10 | 30.0% | 0.10-0.20 |" in text
    assert "results/trees_a.json" in text
    del rows["recipe (seed-300 phantoms)"]
    write_record("trees_b", {"rows": rows}, description="d", inputs={}, command="c", folder=tmp_path)
    monkeypatch.setattr(render_docs, "TREE_RECIPE_ROWS", (("trees_b", "recipe", "seed 0"),))
    with pytest.raises(ValueError, match=r"trees_b.json: no row 'recipe \(seed-300 phantoms\)'"):
        render_docs.tree_headline()


def test_liver_recipes_table_takes_each_seeds_record_and_the_lowest_patient(tmp_path, monkeypatch):
    monkeypatch.setattr(render_docs, "RESULTS_DIR", tmp_path)

    def patients(d1, d7, m1, m7):
        return {"patients": {"3Dircadb1.1": {"liver_dice": d1, "liver_dice_model_mask": m1},
                             "3Dircadb1.7": {"liver_dice": d7, "liver_dice_model_mask": m7}}}

    write_record("la", patients(0.9204, 0.9316, 0.91, 0.89), description="d", inputs={}, command="c0",
                 folder=tmp_path)
    write_record("lb", patients(0.9412, 0.9351, 0.93, 0.92), description="d", inputs={}, command="c1",
                 folder=tmp_path)
    monkeypatch.setattr(render_docs, "LIVER_RECIPE_ROWS", (("bent", (("0", "la"), ("1", "lb"))),))
    text = render_docs.liver_recipes()
    assert "| bent | 0 | 0.920 | 0.932 | 0.920 | 0.910 | 0.890 |" in text
    assert "| bent | 1 | 0.941 | 0.935 | 0.935 | 0.930 | 0.920 |" in text
    assert "results/la.json" in text and "`c1`" in text
    write_record("lc", {"patients": {"3Dircadb1.1": {"liver_dice": 0.9, "liver_dice_model_mask": 0.9}}},
                 description="d", inputs={}, command="c", folder=tmp_path)
    monkeypatch.setattr(render_docs, "LIVER_RECIPE_ROWS", (("one", (("0", "lc"),)),))
    with pytest.raises(ValueError, match=r"lc.json: no patient 3Dircadb1.7; it has 3Dircadb1.1"):
        render_docs.liver_recipes()


def test_flag_tables_drop_the_help_texts_own_defaults():
    # --help shows "default 5" in the text; the rendered table has a default column instead
    for module in render_docs.COMMANDS:
        assert "%(default" not in render_docs._flag_table(module), module
    table = render_docs._flag_table("predict")
    row = next(line for line in table.splitlines() if line.startswith("| `--liver_margin`"))
    assert row.startswith("| `--liver_margin` | `5.0` |") and row.endswith("outside the liver (the hilum) |")
    assert "%(default" not in table
    import predict
    assert "(the hilum; default 5)" in " ".join(predict.build_parser().format_help().split())
