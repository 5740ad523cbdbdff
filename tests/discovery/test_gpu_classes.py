"""GPU class table: documented order, loose name matching, memory fallback, overrides."""

import pytest

from agent.config import DEFAULT_GPU_SCORES
from agent.discovery.gpu_classes import GpuScorer, memory_score

ORDER = ["H200", "H100", "A100", "L40S", "A10", "V100", "RTX 4090", "RTX 3090", "T4", "CPU"]


def test_default_order_is_the_documented_one():
    s = GpuScorer()
    scores = [s.score(name) for name in ORDER]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)
    assert set(DEFAULT_GPU_SCORES) == set(ORDER)


@pytest.mark.parametrize("raw,cls", [
    ("NVIDIA A100-SXM4-80GB", "A100"), ("a100", "A100"), ("NVIDIA GeForce RTX 4090", "RTX 4090"),
    ("rtx  4090", "RTX 4090"), ("Tesla T4", "T4"), ("NVIDIA H100 PCIe", "H100"),
    ("A10", "A10"), ("A10G", None), ("A1000", None), ("", None), ("Radeon", None),
])
def test_loose_matching(raw, cls):
    assert GpuScorer().classify(raw) == cls


def test_unknown_names_score_by_memory_below_the_best_class():
    s = GpuScorer()
    assert s.score("MysteryCard", 48.0) == pytest.approx(0.48 * 0.9)
    assert s.score("MysteryCard", 500.0) == pytest.approx(0.9)
    assert s.score("MysteryCard", 500.0) < s.score("H200")
    assert s.score("MysteryCard", 0.0) == 0.0 == memory_score(float("nan")) == memory_score(-3)
    assert s.score("A10G", 24.0) < s.score("A10", 24.0)


def test_overrides_merge_over_defaults_and_clamp():
    s = GpuScorer({"A10G": 0.65, "T4": 2.0})
    assert s.score("A10G") == 0.65 and s.score("nvidia a10g") == 0.65
    assert s.score("T4") == 1.0                 # clamped to [0, 1]
    assert s.score("H100") == DEFAULT_GPU_SCORES["H100"]
    with pytest.raises(ValueError):
        GpuScorer({"X": float("nan")})


def test_gpu_filter_matches_by_class():
    s = GpuScorer()
    assert s.matches("NVIDIA A100-SXM4-80GB", "a100")
    assert not s.matches("A10", "A100") and not s.matches("A100", "A10")
    assert s.matches("Weird X", "weird  x") and not s.matches("Weird X", "Weird Y")
