"""scripts/train_liver.sh's run-folder name: an option given as 0, 0.0 or 0e0 is off and adds no suffix."""
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_liver.sh"


@pytest.mark.parametrize("value, is_off", [("0", True), ("0.0", True), ("0e0", True), ("15", False),
                                           ("0.5", False), ("-3", False)])
def test_off_reads_any_spelling_of_zero(value, is_off):
    line = next(ln for ln in SCRIPT.read_text().splitlines() if ln.startswith("off()"))
    rc = subprocess.run(["bash", "-c", f'{line}\noff "$1"', "off", value]).returncode
    assert (rc == 0) is is_off
