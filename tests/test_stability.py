"""When a run has collapsed (`stability.collapse`): diverged, never left chance, or fell back,
on synthetic curves whose verdicts follow by hand from the rule's shares."""

from fedhpro_lab.stability import KEPT, LAST, LEARNT, collapse

NAN = float("nan")


def test_the_rule_is_the_documented_one():
    assert (LEARNT, KEPT, LAST) == (0.05, 0.5, 5)


def test_a_diverged_run_collapsed_whatever_its_curve():
    assert collapse([0.9] * 10, 10, 7) == "training diverged in round 7"
    assert collapse([], 10, 3) == "training diverged in round 3"  # before it scored a round


def test_a_run_that_scored_no_round_collapsed():
    assert collapse([], 10) == "no round scored"
    assert collapse([NAN, NAN], 10) == "no round scored"


def test_a_run_that_never_left_chance_collapsed():
    # 10 classes: chance 0.1; a best of 0.149 is within 0.05 of it
    assert collapse([0.1, 0.12, 0.149, 0.13], 10) == \
        "never left chance (best 0.149, chance 0.100)"
    # 4 classes: chance 0.25, so 0.29 is still chance there, while with 10 classes it learnt
    assert collapse([0.29] * 6, 4) == "never left chance (best 0.290, chance 0.250)"
    assert collapse([0.29] * 6, 10) is None


def test_the_chance_boundary_is_the_rules_not_rounding():
    # exactly chance + 0.05 is chance, whatever the float arithmetic of 0.1 + 0.05 gives
    assert collapse([0.15] * 5, 10) == "never left chance (best 0.150, chance 0.100)"
    assert collapse([0.3] * 5, 4) == "never left chance (best 0.300, chance 0.250)"
    assert collapse([0.151] * 5, 10) is None
    assert collapse([0.301] * 5, 4) is None


def test_a_curve_still_rising_has_not_fallen_however_steep():
    # its last window is its best: 5 rounds of a steep rise, at 10 and at 100 classes
    assert collapse([0.1, 0.2, 0.3, 0.5, 0.9], 10) is None
    assert collapse([0.02, 0.05, 0.1, 0.2, 0.4], 100) is None
    assert collapse([0.1, 0.1, 0.12, 0.2, 0.3, 0.4, 0.5, 0.6], 10) is None


def test_a_run_that_fell_back_collapsed():
    # chance 0.1; windows of 5: the best is rounds 1-5, (0.9 x 5) / 5 = 0.9, a gain of 0.8;
    # the last, rounds 4-8, is (0.9, 0.9, 0.1, 0.1, 0.1) = 0.42, which keeps 0.32 < 0.4
    curve = [0.9, 0.9, 0.9, 0.9, 0.9, 0.1, 0.1, 0.1]
    assert collapse(curve, 10) == "its 5-round mean fell from 0.900 to 0.420"
    # a curve of 3 rounds is one window: it cannot fall, only stay at chance
    assert collapse([0.9, 0.2, 0.2], 10) is None
    # a collapse to chance after 20 good rounds
    assert collapse([0.95] * 20 + [0.1] * 5, 10) == "its 5-round mean fell from 0.950 to 0.100"


def test_the_fall_back_boundary():
    # 4 classes, chance 0.25. Best window (0.75 x 5) = 0.75, a gain of 0.5: the last window
    # must average 0.5 or more. Exact binary numbers: the boundary is the rule's.
    assert collapse([0.75] * 5 + [0.5] * 5, 4) is None  # keeps exactly half
    assert collapse([0.75] * 5 + [0.5] * 4 + [0.49], 4) == \
        "its 5-round mean fell from 0.750 to 0.498"
    # only the last window counts as the end: an early fall that recovered is none
    assert collapse([0.75] * 5 + [0.25] * 3 + [0.75] * 5, 4) is None


def test_a_noisy_but_stable_curve_did_not_collapse():
    # one bad round among the last five moves their mean by a fifth of its drop
    curve = [0.2, 0.5, 0.7, 0.3, 0.85, 0.6, 0.8, 0.2, 0.8, 0.8, 0.8]
    assert collapse(curve, 10) is None
    # a missing (NaN) round is left out, not counted as zero
    assert collapse([0.2, 0.5, NAN, 0.8, 0.75, NAN, 0.8, 0.78, 0.8], 10) is None
    # but NaN rounds do not hide a fall: scored 0.9, 0.8, 0.8, 0.8, 0.8, then 0.1 x 5
    assert collapse([0.9, 0.8, 0.8, NAN, 0.8, 0.8] + [0.1, NAN] * 5, 10) == \
        "its 5-round mean fell from 0.820 to 0.100"
