"""The recommended forecaster beats the naive forecast on a held-out horizon it never trained on.

``vqext backtest --data bundled:airline --horizon 24 --season 12 --seed 0`` with the default
model (vqpatch, its recommended training): the last 24 months are forecast from the 120 before
them, scaled with those 120 only, and scored against naive's forecast of the same window in the
same run. MARGIN is the ratio of MASEs that held on every seed measured for docs/results.md,
with room for drift; about a minute on a quiet 2-core machine.
"""
import glob
import os

import pandas as pd
import pytest
from click.testing import CliRunner

from vqext.cli import main

#: vqext's MASE must be below this fraction of naive's (measured: see docs/results.md).
MARGIN = 0.5


@pytest.mark.slow
def test_default_forecaster_beats_naive_on_a_holdout(tmp_path):
    r = CliRunner().invoke(main, ["backtest", "--data", "bundled:airline", "--horizon", "24", "--season", "12",
                                  "--seed", "0", "--baselines", "naive", "--device", "cpu", "--quiet",
                                  "--out", str(tmp_path)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    (summary,) = glob.glob(os.path.join(str(tmp_path), "*", "*", "summary.csv"))
    mase = pd.read_csv(summary).set_index("model").mase
    assert "vqpatch/rope" in r.output  # the default forecaster, not another architecture
    assert mase["vqext"] < MARGIN * mase["naive"], mase.to_dict()
