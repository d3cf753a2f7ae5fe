"""The rules of docs/method.md as pure integers."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from graphopt.plan import SitePlan, Skipped, interleave_permutation, max_groups, plan_site


def test_paper_worked_example_1024_to_512():
    plan = plan_site("m", 1024, 512, use_bias=False)
    assert isinstance(plan, SitePlan)
    assert plan.groups == 64
    assert plan.k_params == 8192
    assert plan.l_params == 4096
    assert plan.params_after == 12288
    assert plan.params_before == 524288
    assert plan.interleave_step == 8 and plan.has_interleave and plan.has_l


@given(cin=st.integers(1, 2048), filters=st.integers(1, 2048), m=st.integers(1, 64))
def test_groups_are_the_largest_admissible_common_divisor(cin, filters, m):
    n = max_groups(cin, filters, m)
    assert cin % n == 0 and filters % n == 0
    if n > 1:
        assert cin // n >= m
    larger = [d for d in range(n + 1, cin // m + 1) if cin % d == 0 and filters % d == 0]
    assert larger == []


@given(groups=st.integers(1, 40), step=st.integers(1, 40))
def test_interleave_is_the_papers_direction_and_a_permutation(groups, step):
    perm = interleave_permutation(groups * step, groups)
    assert sorted(perm) == list(range(groups * step))
    for i in range(groups):
        for j in range(step):
            assert perm[j * groups + i] == i * step + j


def test_interleave_small_example():
    assert interleave_permutation(6, 2) == [0, 3, 1, 4, 2, 5]


def test_one_group_is_skipped_with_a_reason():
    result = plan_site("se_expand", 8, 32, use_bias=True)
    assert isinstance(result, Skipped)
    assert "only one group" in result.reason


def test_no_l_when_the_conv_widens():
    plan = plan_site("expand", 40, 240, use_bias=False)
    assert plan.groups == 2 and not plan.has_l and plan.l_params == 0
    assert plan.params_after == 40 * 240 // 2


def test_bias_and_paper_mode_norm_are_counted():
    plan = plan_site("se_reduce", 96, 4, use_bias=True, l_norm_per_channel=(4, 2))
    assert plan.groups == 4 and plan.interleave_step == 1 and plan.has_l
    assert plan.k_params == 96 + 4 and plan.l_params == 4 + 4
    assert plan.params_after == 108 + 16 and plan.trainable_after == 108 + 8


def test_macs_follow_positions():
    plan = plan_site("p", 1152, 192, use_bias=False, positions=49)
    assert plan.groups == 64
    assert plan.macs_before == 49 * 1152 * 192
    assert plan.macs_after == 49 * (1152 * 192 // 64 + 192 * 192 // 64)
    assert plan_site("p", 1152, 192, use_bias=False).macs_before is None


def test_min_channels_per_group_changes_the_plan():
    assert plan_site("p", 1024, 512, use_bias=False, min_channels_per_group=32).groups == 32
    assert isinstance(plan_site("p", 32, 32, use_bias=False, min_channels_per_group=32), Skipped)
