"""The fault soak, short: every fault kind, on both roles, under mixed load (benchmarks/soak.py)."""
import json
import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).parents[2] / "benchmarks" / "soak.py"
# every fault kind and both roles; two restarts (a node takes ~8 s to load), the rest in place;
# the faults, one after another, outlast --duration: they set the run's length
PLAN = "kill:decode,hang:prefill,drain:prefill,hang:decode"


def test_a_short_soak_loses_nothing_and_tears_nothing(tiny_dirs, tmp_path):
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, str(SOAK), "--model", str(tiny_dirs["qwen2_5_vl"]), "--duration", "12",
                           "--clients", "4", "--fault-interval", "1", "--faults", PLAN, "--deadline", "45",
                           "--json", str(out)], capture_output=True, text=True, timeout=400)
    print(proc.stdout[-4000:], proc.stderr[-3000:])
    result = json.loads(out.read_text())
    outcomes = result["outcomes"]
    assert not {"hung", "torn", "unclean"} & set(outcomes), result["examples"]
    assert outcomes["completed"] > 20 and outcomes["rejected (bad request)"] > 0
    assert result["faults"] == {f"{fault} {role}": 1 for fault, role in (f.split(":") for f in PLAN.split(","))}
    assert result["blocks"] and set(result["blocks"].values()) == {0}, result["blocks"]
    assert proc.returncode == 0
