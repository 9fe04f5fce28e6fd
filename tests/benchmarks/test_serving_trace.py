import pytest

from benchmarks.serving_trace import tenths


def test_tenths_average_each_tenth_of_the_steps():
    # 20 steps, 10 ms apart for the first 10 and 30 ms apart after; running = step index; the run ends 30 ms
    # after the last step
    times = [0.01 * i for i in range(10)] + [0.1 + 0.03 * i for i in range(10)]
    steps = [(t, i, 20 - i, 2 * i, i / 20) for i, t in enumerate(times)]
    rows = tenths(steps, end=times[-1] + 0.03)
    assert [r["tenth"] for r in rows] == list(range(10))
    assert rows[0]["running"] == pytest.approx(0.5) and rows[9]["running"] == pytest.approx(18.5)
    assert rows[3]["waiting"] == pytest.approx(20 - 6.5) and rows[3]["scheduled_tokens"] == pytest.approx(13.0)
    assert rows[9]["cache_usage"] == pytest.approx(18.5 / 20)
    assert rows[0]["ms_per_step"] == pytest.approx(10.0) and rows[9]["ms_per_step"] == pytest.approx(30.0)
    assert rows[4]["ms_per_step"] == pytest.approx(10.0)  # steps 8, 9 and the 10 ms to step 10
    assert rows[4]["start_s"] == pytest.approx(0.08)


def test_tenths_needs_ten_steps():
    with pytest.raises(ValueError, match="steps: 9 steps"):
        tenths([(0.1 * i, 1, 0, 1, 0.5) for i in range(9)], end=1.0)
