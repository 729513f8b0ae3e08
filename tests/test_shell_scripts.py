"""Every shell script the docs point users to parses (``bash -n``): the long ones (make demo, the
training scripts) run for minutes and are not run by the suite, so a syntax slip would only show
on a user's machine."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "scripts").glob("*.sh")) + sorted((ROOT / "pretrained").glob("*.sh"))


def test_there_are_scripts_to_check():
    assert any(p.name == "demo.sh" for p in SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script, tmp_path):
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    # and the check itself catches a slip: the same script with an unclosed 'if' fails
    broken = tmp_path / script.name
    broken.write_text(script.read_text() + "\nif true; then\n")
    assert subprocess.run(["bash", "-n", str(broken)], capture_output=True).returncode != 0


def test_ablation_backbones_gives_a_plugin_the_model_kw_asked_for():
    # the script's own kw_for: built-ins get a CPU width (their defaults with FULL_SIZE), any other
    # backbone MODEL_KW, which the script used to overwrite with nothing
    script = (ROOT / "scripts" / "ablation_backbones.sh").read_text()
    start = script.index("USER_KW=")
    body = script[start:script.index("\n}\n", start) + 3]

    def kw(name: str, full: bool) -> str:
        env = {"PATH": os.environ["PATH"], "MODEL_KW": '{"width": 8}', **({"FULL_SIZE": "1"} if full else {})}
        out = subprocess.run(["bash", "-c", body + f'\nkw_for "{name}"'], env=env, capture_output=True, text=True,
                             check=True)
        return out.stdout.strip()

    assert kw("unet", False) == '{"base_channels": 16}' and kw("unet", True) == ""
    assert kw("my_net", False) == kw("my_net", True) == '{"width": 8}'
