"""The joint-attention benchmark (``benchmarks/joint_attention.py``) as CI runs it: ``--quick``, a real subprocess on
the real CheXmask example's masks. It proves the script runs every case at both grids and both text layouts and
writes its JSON and table; the timings themselves are the full run's (docs/performance.md), not checked here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "joint_attention.py"


def test_quick_run_writes_every_case_and_the_claims_terms(tmp_path):
    out = tmp_path / "joint.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["quick"] is True
    rows = report["rows"]
    # 8×8 and 16×16 patch grids × SD3.5's two chunks (8 + 8 in quick) and Flux's one (12)
    assert [(r["family"], r["image_len"], r["text_len"]) for r in rows] == [
        ("sd35", 64, 16), ("flux", 64, 12), ("sd35", 256, 16), ("flux", 256, 12)]
    for r in rows:
        assert set(report["fields"]) <= set(r), set(report["fields"]) - set(r)
        assert set(r["median_ms"]) == set(report["cases"])
        assert all(ms > 0 for ms in r["median_ms"].values())
        assert set(r["ratio_vs_stock"]) == {"hard", "hard_boosted", "soft"}
        # each of the three is rounded to 3 decimals from unrounded terms: they agree within 3 half-units
        assert abs(r["claim_bound"] - (r["unet_hard_ratio"] + r["text_share"])) <= 0.0015
        margin = r["claim_bound"] - r["ratio_vs_stock"]["hard"]
        if abs(margin) > 0.0015:  # the verdict agrees with the printed figures unless they are a rounding apart
            assert r["claim_holds"] is (margin > 0)
        t, n = r["text_len"], r["image_len"]
        assert r["text_share_flops"] == (t * (t + n) + n * t) / (t + n) ** 2
        # the regions are the CheXmask example's at the patch grid: background and all three organs hold tokens,
        # so the image-only hard gate's work share Σnᵣ²/N² is well below 1 (about a third)
        assert list(r["regions"]) == ["background", "right_lung", "left_lung", "heart"]
        assert all(c > 0 for c in r["regions"].values()) and sum(r["regions"].values()) == n
        assert 0.25 < r["floor"] < 0.5
    table = proc.stdout[proc.stdout.index("| family |"):]
    assert len(table.strip().splitlines()) == 2 + len(rows)  # header, rule, one line per row


def test_word_positions_follow_each_familys_chunks():
    """SD3.5's context is 77 CLIP tokens then 77 T5 tokens (T5 without a start token); Flux's is T5 alone."""
    from cxr_counterfactual.benchmarks.joint_attention import TEXTS, positions

    assert positions("sd35", TEXTS) == {"left lung": (1, 2, 77, 78), "heart": (3, 79), "effusion": (4, 80)}
    assert positions("flux", TEXTS) == {"left lung": (0, 1), "heart": (2,), "effusion": (3,)}
