"""The argmin-timeseries CSV reader and window normalization on hostile input: huge values,
spikes, unquoted decimal commas, mixed or ambiguous dates, constant and duplicated series.
Property tests (hypothesis) check that any well-formed file reads back exactly."""

from __future__ import annotations

import datetime
import gzip
import itertools
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from experiments.__main__ import main
from experiments.argmin_timeseries import read_stock_csv, windows
from experiments.run import UsageError

_NAMES = itertools.count()
HEADER = "Date,Open,High,Low,Close,Volume,Name\n"
START = datetime.date(2001, 1, 1)


def write(tmp_path, rows: list[str], name: str = "d.csv"):
    path = tmp_path / f"{next(_NAMES)}_{name}"  # new file each time: the reader caches
    path.write_text(HEADER + "".join(r + "\n" for r in rows))
    return str(path)


def row(date, close, name="A") -> str:
    return f"{date},1,1,1,{close},5,{name}"


def days(n: int, fmt: str = "%Y-%m-%d") -> list[str]:
    return [(START + datetime.timedelta(days=i)).strftime(fmt) for i in range(n)]


def wave(n: int, level: float = 10.0) -> list[float]:
    return [level * (1 + 0.1 * ((i * 7) % 11) / 11) for i in range(n)]


def test_prices_near_1e306_give_the_windows_of_the_same_prices_at_scale_1(tmp_path):
    values = wave(400)
    small = windows({"A": values}, 30, 5, 2)
    huge = windows({"A": [v * 1e306 for v in values]}, 30, 5, 2)
    for part in small:
        for a, b in zip(small[part], huge[part]):
            assert torch.isfinite(b).all()
            assert b.abs().max() > 0.1  # not collapsed to zeros
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(exponent=st.integers(-300, 300), seed=st.integers(0, 2**16))
def test_window_normalization_is_scale_free(exponent, seed):
    g = random.Random(seed)
    values = [1 + g.random() for _ in range(60)]
    ref = windows({"A": values}, 10, 3, 3)
    got = windows({"A": [v * 10.0**exponent for v in values]}, 10, 3, 3)
    for part in ref:
        for a, b in zip(ref[part], got[part]):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


def test_a_1e300_spike_is_an_error_naming_the_line(tmp_path):
    values = wave(80)
    values[40] = 1e300
    path = write(tmp_path, [row(d, v) for d, v in zip(days(80), values)])
    with pytest.raises(UsageError, match=r"line 42: Close value 1e\+300 of series 'A'"):
        read_stock_csv(path)


def test_an_unquoted_decimal_comma_is_an_error(tmp_path):
    rows = [row(d, v) for d, v in zip(days(5), wave(5))]
    rows[2] = "2001-01-03,1,1,1,12,5,5,A"
    path = write(tmp_path, rows)
    with pytest.raises(UsageError, match="line 4 has 8 fields, expected 7 .*decimal comma"):
        read_stock_csv(path)


def test_mixed_date_formats_are_an_error(tmp_path):
    dates = days(20)
    dates[7] = (START + datetime.timedelta(days=7)).strftime("%m/%d/%Y")
    path = write(tmp_path, [row(d, v) for d, v in zip(dates, wave(20))])
    with pytest.raises(UsageError, match="mixes formats .*line 9: '01/08/2001'"):
        read_stock_csv(path)


def test_ambiguous_day_month_dates_are_an_error(tmp_path):
    # every day <= 12: reads as day/month and as month/day, in different orders
    dates = ["01/02/2001", "02/01/2001", "03/01/2001"]
    path = write(tmp_path, [row(d, v) for d, v in zip(dates, [1.0, 2.0, 3.0])])
    with pytest.raises(UsageError, match="ambiguous"):
        read_stock_csv(path)


def test_month_first_dates_are_ordered_by_date_not_by_text(tmp_path):
    dates = ["12/31/2000", "01/15/2001", "02/13/2001"]  # as text, 12/31 would sort last
    path = write(tmp_path, [row(d, v) for d, v in zip(reversed(dates), [3.0, 2.0, 1.0])])
    assert read_stock_csv(path) == {"A": [1.0, 2.0, 3.0]}


def test_two_rows_of_one_series_on_one_date_are_an_error(tmp_path):
    path = write(tmp_path, [row("2001-01-01", 1.0), row("2001-01-02", 2.0), row("2001-01-01", 3)])
    with pytest.raises(UsageError, match="two rows for 2001-01-01 .lines 2 and 4"):
        read_stock_csv(path)


def test_a_constant_series_warns_and_only_constant_series_are_refused(tmp_path, capsys):
    rows = [row(d, 5.0, "FLAT") for d in days(10)] + [
        row(d, v, "B") for d, v in zip(days(10), wave(10))
    ]
    assert read_stock_csv(write(tmp_path, rows))["FLAT"] == [5.0] * 10
    err = capsys.readouterr().err
    assert "warning:" in err and "'FLAT' is constant" in err
    with pytest.raises(UsageError, match="every series is constant"):
        read_stock_csv(write(tmp_path, [row(d, 5.0) for d in days(10)], "flat.csv"))


def test_the_cli_refuses_a_spike_with_one_line(tmp_path, capsys):
    values = wave(400)
    values[300] = 1e300
    path = tmp_path / "d.csv.gz"
    path.write_bytes(
        gzip.compress(
            (HEADER + "".join(row(d, v) + "\n" for d, v in zip(days(400), values))).encode()
        )
    )
    code = main(
        [
            "argmin-timeseries",
            "--quick",
            "--csv",
            str(path),
            "--out",
            str(tmp_path / "r"),
            "--threads",
            "1",
            "--progress",
            "off",
        ]
    )
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert code == 2 and len(err) == 1 and "line 302" in err[0] and "data error" in err[0]


FORMATS = ["%Y-%m-%d", "%Y/%m/%d", "%Y%m%d", "%d.%m.%Y"]
series_strategy = st.dictionaries(
    st.text("ABCXYZ", min_size=1, max_size=3),
    st.lists(
        st.tuples(st.integers(0, 4000), st.floats(1.0, 1000.0, allow_nan=False)),
        min_size=2,
        max_size=12,
        unique_by=lambda t: t[0],
    ),
    min_size=1,
    max_size=3,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(series=series_strategy, fmt=st.sampled_from(FORMATS), seed=st.integers(0, 1000))
def test_any_well_formed_file_reads_back_exactly(tmp_path, series, fmt, seed):
    rows = []
    for name, points in series.items():
        for day, value in points:
            date = (START + datetime.timedelta(days=day)).strftime(fmt)
            rows.append(row(date, repr(value), name))
    random.Random(seed).shuffle(rows)
    expected = {name: [v for _, v in sorted(points)] for name, points in sorted(series.items())}
    path = write(tmp_path, rows, f"p{seed}.csv")
    if all(len(set(v)) == 1 for v in expected.values()):
        with pytest.raises(UsageError, match="constant"):
            read_stock_csv(path)
        return
    assert read_stock_csv(path) == expected


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(n=st.integers(3, 15), at=st.integers(0, 14), extra=st.booleans(), seed=st.integers(0, 99))
def test_a_row_with_a_wrong_field_count_is_named(tmp_path, n, at, extra, seed):
    at = at % n
    rows = [row(d, v) for d, v in zip(days(n), wave(n))]
    rows[at] = rows[at] + ",7" if extra else rows[at].rsplit(",", 1)[0]
    path = write(tmp_path, rows, f"f{seed}_{n}_{at}_{extra}.csv")
    with pytest.raises(UsageError, match=f"line {at + 2} has {8 if extra else 6} fields"):
        read_stock_csv(path)
