"""The recommended configuration (``vqext run`` without hyper-parameters) meets its quality bar.

Trains it with one seed on ``<repo>/../shared/data/y+w.csv`` (override the folder with
``VQEXT_SHARED_DATA``) exactly as ``vqext run --data ../shared/data/y+w.csv --seed 0`` does, and
checks the validation loss and the regressive error. The thresholds are loose enough to pass on
every seed measured for docs/results.md (seeds 0-2: val loss 0.0142-0.0149, regressive MSE
1,140-1,210 (ug/m³)²; with one pushforward pass 0.0137-0.0139 and 1,380-1,880); they catch a
recommendation that silently stopped working, not a small drift. About 95 CPU seconds (training,
the forecasts and plots); 1.5-2 minutes on a quiet 2-core machine.
"""
import glob
import json
import os
import time

import pytest
from click.testing import CliRunner

from vqext.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.environ.get("VQEXT_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data"))
MAX_VAL_LOSS = 0.0165          # target (median of 3 seeds): 0.0150
MAX_REGRESSIVE_MSE = 2_500.0   # target (median of 3 seeds): 1,200 (ug/m³)²; seed's best 19,314


@pytest.mark.slow
def test_recommended_configuration_reaches_the_quality_bar(tmp_path):
    data = os.path.join(DATA_DIR, "y+w.csv")
    if not os.path.exists(data):
        pytest.skip(f"the formaldehyde series is missing: {data} (shared/ must sit beside the clone, "
                    f"or set VQEXT_SHARED_DATA)")
    t0 = time.process_time()
    r = CliRunner().invoke(main, ["run", "--data", data, "--seed", "0", "--quiet", "--device", "cpu",
                                  "--out", str(tmp_path)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    (run_dir,) = glob.glob(str(tmp_path / "*" / "*"))
    m = json.load(open(os.path.join(run_dir, "metrics.json")))
    assert (m["arch"], m["pe"], m["time_steps"]) == ("vqformer", "rope", 96)
    reg = m["forecast"]["regressive"]["mse"]
    print(f"\nrecommended config, seed 0: val loss {m['val_loss']:.5f}, regressive MSE {reg:.0f}, "
          f"{time.process_time() - t0:.0f} CPU s")
    assert m["val_loss"] <= MAX_VAL_LOSS
    assert reg <= MAX_REGRESSIVE_MSE
