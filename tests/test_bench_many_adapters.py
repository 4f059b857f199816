"""The many-adapter benchmark runs end to end on CPU (tiny shape): every metric it reports is computed."""
from __future__ import annotations

import json
import math


def test_many_adapter_bench_smoke(tmp_path):
    from loramux.loadtest.bench.bench_many_adapters import main

    out = main(["--shape", "tiny", "--adapters", "20", "--ranks", "4,8", "--max-loras", "3", "--max-cpu-loras", "5",
                "--duration", "1.5", "--saturation-seconds", "1", "--max-num-seqs", "6", "--new-tokens", "6",
                "--prompt-len", "8", "--rate", "20", "--device", "cpu", "--json", str(tmp_path / "m.json")])
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["adapters"] == 20 and saved["closed_loop_tok_s"]["single"] > 0
    many = out["many"]
    assert out["single"]["requests"] == many["requests"] > 0
    assert many["cold_requests"] == many["cold_from_cpu"] + many["cold_from_disk"] > 0  # 20 ids on 3 slots
    assert math.isfinite(out["closed_loop_ratio"]) and out["counters"]["loads_total"]["disk"] > 0
    phases = out["counters"]["disk_load_phase_seconds"]  # first loads read folders (and save), later ones map
    assert set(phases) == {"read", "decode", "alloc", "pack", "check", "save", "map"} and phases["map"] > 0


def test_closed_loop_reports_launches_by_path(capsys):
    """The closed loop prints how its steps ran (decode graph / mixed graph / eager): on CPU every one is eager
    (steps with no runnable request launch nothing)."""
    import ast

    from loramux.loadtest.bench.bench_many_adapters import main

    main(["--shape", "tiny", "--adapters", "6", "--ranks", "4", "--max-loras", "2", "--max-cpu-loras", "3",
          "--saturation-seconds", "0.3", "--max-num-seqs", "4", "--new-tokens", "4", "--prompt-len", "6",
          "--closed-loop-only", "--device", "cpu"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "launches by path" in ln]
    assert len(lines) == 2
    for ln in lines:
        steps = int(ln.split(": ")[1].split(" steps")[0])
        empty = int(ln.split(" steps (")[1].split(" with")[0])
        kinds = ast.literal_eval(ln.split("launches by path ")[1].split("; ")[0])
        assert steps > 0 and kinds == {"decode_graph": 0, "mixed_graph": 0, "eager": steps - empty}
