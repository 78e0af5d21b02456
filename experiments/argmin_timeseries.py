"""argmin-timeseries: the course tutorial's encoder / ridge-argmin predictor / decoder.

A window of ``--base`` past values is encoded by a 1-D CNN into C channels. The predictor
is an optimization layer (``bilevel.nn.RidgeArgMin``): inside each window it fits, by ridge
regression over the C channels, the linear map that "post-dicts" the last ``--horizon`` steps
of the embedding from the ``base - horizon`` steps before them,

    W* = argmin_W  ||X_e W - Y_e||^2 + lam ||W||^2,

applies it to the most recent ``base - horizon`` steps to predict the next ``--horizon``
embedding steps, and a 1-D CNN decoder maps them back to values. The forward pass solves the
small ridge systems exactly; the backward pass is implicit differentiation (conjugate
gradients on X^T X + lam I), so the encoder, the decoder and the regularization weight
``lam = exp(log_l2)`` train end to end with Adam. (The tutorial ran L-BFGS in the forward pass
and formed the full Hessian in the backward pass.)

Data: synthetic series (sums of sinusoids, a random-walk trend and noise) by default, or
``--csv PATH``: the tutorial's stock-price format (columns Date, Open, High, Low, Close,
Volume, Name; gzip allowed; one series of Close prices per Name, ordered by Date). Each
window is normalized by its last value and its standard deviation; each series is split in
time into train / validation / test windows. Reported: test MSE (normalized units) of the
argmin model, of the same network with a learned linear head instead of the argmin layer,
and of the naive last-value forecast.
"""

from __future__ import annotations

import csv
import datetime
import gzip
import io
import math
import os
import statistics
import time
import zlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bilevel

from . import plot
from .options import Option, choice, positive_float, positive_int
from .run import Run, UsageError, warn

DESCRIPTION = (
    "the tutorial's CNN encoder / ridge-regression argmin layer (learned regularization) / "
    "decoder trained end to end on time series (synthetic, or --csv stock prices)"
)
DTYPE = "float32"
COLUMNS = ("Date", "Open", "High", "Low", "Close", "Volume", "Name")
PREDICTORS = ("argmin", "linear")


def _path(text: str) -> str:
    return text


OPTIONS = [
    Option(
        "csv",
        "",
        type=_path,
        help="stock CSV (Date,Open,High,Low,Close,Volume,Name; .gz ok); empty: synthetic series",
    ),
    Option("series", 24, quick=6, type=positive_int, help="synthetic series"),
    Option("length", 600, quick=300, type=positive_int, help="length of each synthetic series"),
    Option("base", 30, type=positive_int, help="input window length"),
    Option("horizon", 5, type=positive_int, help="values predicted after each window"),
    Option("stride", 2, quick=4, type=positive_int, help="step between consecutive windows"),
    Option(
        "channels",
        [4, 8, 16],
        type=lambda t: [positive_int(x) for x in t.split(",")],
        help="encoder channels (the decoder mirrors them)",
    ),
    Option("outer_steps", 1500, quick=12, type=positive_int, help="Adam steps per model"),
    Option("batch_size", 32, quick=16, type=positive_int, help="windows per step"),
    Option("lr", 1e-3, quick=3e-3, type=positive_float, help="Adam step size"),
    Option("init_lambda", 1.0, type=positive_float, help="initial ridge weight lam"),
    Option(
        "backward",
        "exact",
        type=choice(["exact", "cg"]),
        help="the argmin layer's backward linear solve: exact (batched Cholesky of each "
        "window's Gram matrix, the layer's default) or cg on all the unknowns at once",
    ),
    Option(
        "cg_tol", 1e-6, type=positive_float, help="CG tolerance of the backward (--backward cg)"
    ),
    Option("monitor_every", 50, quick=3, type=positive_int, help="validation MSE every N steps"),
    Option(
        "max_eval",
        2000,
        quick=300,
        type=positive_int,
        help="at most this many validation / test windows",
    ),
]


# -- data ----------------------------------------------------------------------------------


_CSV_CACHE: dict[tuple[str, float, int], dict[str, list[float]]] = {}
# the date formats accepted; one file uses one of them throughout
DATE_FORMATS = ("%Y-%m-%d", "%Y/%m/%d", "%Y%m%d", "%d.%m.%Y", "%m/%d/%Y", "%d/%m/%Y")
# a Close value farther than this from its series' median, in units of the series' median
# absolute deviation (at least 1e-3 of the median), is a data error, not a price
OUTLIER_DEVIATIONS = 1e6


def _parse_dates(path: str, dates: list[tuple[int, str]]) -> list[datetime.date]:
    """``dates`` (line, text) parsed in the one format that reads them all."""
    texts = [t for _, t in dates]
    try:  # ISO dates: the common case, fast
        return [datetime.date.fromisoformat(t) for t in texts]
    except ValueError:
        pass
    readers = []
    for fmt in DATE_FORMATS:
        try:
            readers.append((fmt, [datetime.datetime.strptime(t, fmt).date() for t in texts]))
        except ValueError:
            continue
    if len(readers) > 1 and any(r[1] != readers[0][1] for r in readers[1:]):
        raise UsageError(
            f"--csv {path}: the Date column is ambiguous (it reads as "
            f"{' and as '.join(f for f, _ in readers)}); write dates as YYYY-MM-DD"
        )
    if readers:
        return readers[0][1]
    # no single format reads every date: name a line of each format met
    first_fmt = next((f for f in DATE_FORMATS if _reads(dates[0][1], f)), None)
    if first_fmt is None:
        line, text = dates[0]
        raise UsageError(f"--csv {path}: line {line}: Date {text!r} is not a date (YYYY-MM-DD)")
    line, text = next((ln, t) for ln, t in dates if not _reads(t, first_fmt))
    raise UsageError(
        f"--csv {path}: the Date column mixes formats (line {dates[0][0]}: {dates[0][1]!r}, "
        f"line {line}: {text!r}); write every date in one format, e.g. YYYY-MM-DD"
    )


def _reads(text: str, fmt: str) -> bool:
    try:
        datetime.datetime.strptime(text, fmt)
    except ValueError:
        return False
    return True


def _check_series(path: str, name: str, rows: list[tuple[datetime.date, float, int]]) -> None:
    """A duplicated date or an impossible outlier is an error; a constant series a warning."""
    seen: dict[datetime.date, int] = {}
    for date, _, line in rows:
        if date in seen:
            raise UsageError(
                f"--csv {path}: series {name!r} has two rows for {date} (lines {seen[date]} and "
                f"{line}); keep one"
            )
        seen[date] = line
    values = torch.tensor([v for _, v, _ in rows], dtype=torch.float64)
    median = values.median()
    spread = (values - median).abs()
    floor = (1e-3 * median.abs()).clamp_min(torch.finfo(torch.float64).tiny)
    mad = torch.maximum(spread.median(), floor)
    worst = int(spread.argmax())
    if float(spread[worst] / mad) > OUTLIER_DEVIATIONS:
        date, value, line = rows[worst]
        raise UsageError(
            f"--csv {path}: line {line}: Close value {value:g} of series {name!r} ({date}) is "
            f"off its series' median {float(median):g} by {float(spread[worst] / mad):.1e} "
            "median deviations: a data error; fix or remove the row"
        )
    if bool((values == values[0]).all()) and len(rows) > 1:
        warn(
            f"--csv {path}: series {name!r} is constant ({float(values[0]):g}): every window of "
            "it normalizes to zeros and teaches nothing"
        )


def read_stock_csv(path: str) -> dict[str, list[float]]:
    """Close prices per Name, ordered by Date, from the tutorial's CSV format (gzip allowed).

    Empty Close cells are skipped. A missing column, a row with too many or too few fields
    (an unquoted decimal comma such as ``12,5`` adds one), a non-numeric or non-finite value,
    dates in more than one format (or ambiguous between day-first and month-first), two rows
    of one series on one date, a value impossibly far from the rest of its series, or an
    unreadable file raises :class:`UsageError` with a one-line message naming the problem;
    a constant series is kept with a warning, and a file of constant series only is refused.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        raise UsageError(f"--csv {path}: cannot read it ({exc.strerror})") from None
    key = (os.path.abspath(path), st.st_mtime, st.st_size)
    if key in _CSV_CACHE:
        return _CSV_CACHE[key]
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        text = raw.decode("utf-8-sig")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise UsageError(f"--csv {path}: cannot read it as (gzipped) UTF-8 CSV ({exc})") from None
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None:
        raise UsageError(f"--csv {path}: the file is empty")
    header = [h.strip() for h in header]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise UsageError(
            f"--csv {path}: missing column(s) {', '.join(missing)}; expected {', '.join(COLUMNS)}"
        )
    i_date, i_close, i_name = header.index("Date"), header.index("Close"), header.index("Name")
    records: list[tuple[int, str, str, float]] = []
    for line, rec in enumerate(reader, start=2):
        if not rec:
            continue
        if len(rec) != len(header):
            hint = (
                " (an unquoted decimal comma such as 12,5? quote the field or write 12.5)"
                if len(rec) > len(header)
                else ""
            )
            raise UsageError(
                f"--csv {path}: line {line} has {len(rec)} fields, expected {len(header)}{hint}"
            )
        close = rec[i_close].strip()
        if close == "":
            continue
        try:
            value = float(close)
        except ValueError:
            raise UsageError(
                f"--csv {path}: line {line}: Close value {close!r} is not a number"
            ) from None
        if not math.isfinite(value):
            raise UsageError(f"--csv {path}: line {line}: Close value {close!r} is not finite")
        records.append((line, rec[i_name].strip(), rec[i_date].strip(), value))
    if not records:
        raise UsageError(f"--csv {path}: no rows with a Close value")
    dates = _parse_dates(path, [(line, d) for line, _, d, _ in records])
    rows: dict[str, list[tuple[datetime.date, float, int]]] = {}
    for (line, name, _, value), date in zip(records, dates):
        rows.setdefault(name, []).append((date, value, line))
    series = {}
    for name, vals in sorted(rows.items()):
        vals.sort(key=lambda r: r[0])
        _check_series(path, name, vals)
        series[name] = [v for _, v, _ in vals]
    if all(len(set(v)) <= 1 for v in series.values()):
        raise UsageError(f"--csv {path}: every series is constant: there is nothing to learn")
    _CSV_CACHE[key] = series
    return series


def synthetic_series(gen: torch.Generator, n: int, length: int) -> dict[str, list[float]]:
    """Sums of 3 sinusoids (periods 6-60 steps) + a random-walk trend + noise."""
    t = torch.arange(length, dtype=torch.float64)
    out = {}
    for i in range(n):
        periods = 6 + 54 * torch.rand(3, generator=gen, dtype=torch.float64)
        amps = 0.5 + torch.rand(3, generator=gen, dtype=torch.float64)
        phases = 2 * math.pi * torch.rand(3, generator=gen, dtype=torch.float64)
        waves = (
            amps[:, None] * torch.sin(2 * math.pi * t[None] / periods[:, None] + phases[:, None])
        ).sum(0)
        trend = 0.05 * torch.randn(length, generator=gen, dtype=torch.float64).cumsum(0)
        noise = 0.1 * torch.randn(length, generator=gen, dtype=torch.float64)
        out[f"s{i}"] = (10 + waves + trend + noise).tolist()
    return out


def windows(
    series: dict[str, list[float]], base: int, horizon: int, stride: int
) -> dict[str, tuple[Tensor, Tensor]]:
    """Normalized (input, target) windows, split in time: train 70%, validation 15%, test 15%."""
    parts: dict[str, tuple[list[Tensor], list[Tensor]]] = {
        "train": ([], []),
        "val": ([], []),
        "test": ([], []),
    }
    size = base + horizon
    for values in series.values():
        v = torch.tensor(values, dtype=torch.float64)
        n = v.numel()
        if n < size:
            continue
        segs = v.unfold(0, size, stride)  # (num, size)
        starts = torch.arange(segs.shape[0]) * stride
        ends = starts + size
        # divide by the window's largest magnitude first: the statistics below are
        # scale-free, and prices near 1e306 would overflow the squares of the std
        big = segs.abs().amax(1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        segs = segs / big
        x, y = segs[:, :base], segs[:, base:]
        last = x[:, -1:]
        scale = (
            x.std(1, keepdim=True)
            .clamp_min(1e-6 * last.abs())
            .clamp_min(torch.finfo(torch.float64).tiny)
        )
        x, y = (x - last) / scale, (y - last) / scale
        for name, mask in (
            ("train", ends <= int(0.7 * n)),
            ("val", (starts >= int(0.7 * n)) & (ends <= int(0.85 * n))),
            ("test", starts >= int(0.85 * n)),
        ):
            parts[name][0].append(x[mask])
            parts[name][1].append(y[mask])
    out = {}
    for name, (xs, ys) in parts.items():
        x = torch.cat(xs) if xs else torch.zeros(0, base, dtype=torch.float64)
        y = torch.cat(ys) if ys else torch.zeros(0, horizon, dtype=torch.float64)
        out[name] = (x[:, None, :], y[:, None, :])
    return out


def load_data(cfg: dict[str, Any], gen: torch.Generator) -> dict[str, tuple[Tensor, Tensor]]:
    series = (
        read_stock_csv(cfg["csv"])
        if cfg["csv"]
        else synthetic_series(gen, cfg["series"], cfg["length"])
    )
    data = windows(series, cfg["base"], cfg["horizon"], cfg["stride"])
    short = [k for k, (x, _) in data.items() if x.shape[0] == 0]
    if short:
        source = f"--csv {cfg['csv']}" if cfg["csv"] else "the synthetic series"
        raise UsageError(
            f"{source}: too short for --base {cfg['base']} + --horizon {cfg['horizon']}: no "
            f"{'/'.join(short)} windows (a series needs about {int((cfg['base'] + cfg['horizon']) / 0.15) + 1} values)"
        )
    return data


def validate(cfg: dict[str, Any]) -> None:
    if cfg["horizon"] >= cfg["base"]:
        raise UsageError(f"--horizon {cfg['horizon']} must be below --base {cfg['base']}")
    load_data(cfg, torch.Generator().manual_seed(0))  # checks the file and the window counts


# -- model ---------------------------------------------------------------------------------


def cnn(channels: list[int], last_activation: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        layers += [nn.Conv1d(c_in, c_out, kernel_size=5, padding=2), nn.ELU(alpha=0.5)]
    if not last_activation:
        layers = layers[:-1]
    return nn.Sequential(*layers)


class Forecaster(nn.Module):
    """Encoder -> predictor (ridge argmin layer or a learned linear head) -> decoder."""

    def __init__(self, cfg: dict[str, Any], predictor: str) -> None:
        super().__init__()
        ch = [1, *cfg["channels"]]
        self.encoder = cnn(ch, last_activation=True)
        self.decoder = cnn(ch[::-1], last_activation=False)
        self.horizon, self.past = cfg["horizon"], cfg["base"] - cfg["horizon"]
        self.predictor = predictor
        if predictor == "argmin":
            # one ridge problem per window: rows = the C channels, features = past steps
            cg = cfg["backward"] == "cg"
            self.ridge = bilevel.nn.RidgeArgMin(
                l2=cfg["init_lambda"],
                linear_solver=bilevel.linalg.cg(tol=cfg["cg_tol"], maxiter=500) if cg else None,
            )
        else:
            self.w = nn.Parameter(torch.randn(self.horizon, self.past) / math.sqrt(self.past))

    def forward(self, x: Tensor) -> Tensor:
        emb = self.encoder(x)  # (B, C, base)
        z = emb[..., -self.past :]
        if self.predictor == "argmin":
            # W* = argmin ||X_e W - Y_e||^2 + lam ||W||^2, shape (B, past, horizon); exact
            # forward solve, implicit backward (CG), so lam, the encoder and decoder all learn
            w = self.ridge(emb[..., : self.past], emb[..., self.past :])
            pred = z @ w
        else:
            pred = z @ self.w.T
        return self.decoder(pred)


def init_weights(model: Forecaster, gen: torch.Generator) -> None:
    """PyTorch's default Conv1d initialization (and a scaled normal head), drawn from ``gen``."""

    def draw(shape: torch.Size, bound: float) -> Tensor:
        return (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv1d):
                bound = 1.0 / math.sqrt(m.in_channels * m.kernel_size[0])
                m.weight.copy_(draw(m.weight.shape, bound))
                if m.bias is not None:
                    m.bias.copy_(draw(m.bias.shape, bound))
        if model.predictor == "linear":
            model.w.copy_(draw(model.w.shape, 1.0 / math.sqrt(model.past)))


# -- the experiment ------------------------------------------------------------------------


def run(run: Run, cfg: dict[str, Any]) -> dict[str, Any]:
    data = {
        k: (x.to(run.device, run.dtype), y.to(run.device, run.dtype))
        for k, (x, y) in load_data(cfg, run.rng("series")).items()
    }
    for part in ("val", "test"):  # a fixed subsample keeps evaluation cheap on long CSVs
        x, y = data[part]
        if x.shape[0] > cfg["max_eval"]:
            keep = torch.randperm(x.shape[0], generator=run.rng("subsample", part))[
                : cfg["max_eval"]
            ]
            data[part] = (x[keep.to(x.device)], y[keep.to(x.device)])
    x_tr, y_tr = data["train"]
    run.plan(cfg["outer_steps"] * len(PREDICTORS))

    def mse(model: Forecaster, part: str) -> float:
        x, y = data[part]
        with torch.no_grad():
            return float(
                sum(
                    F.mse_loss(model(xb), yb, reduction="sum")
                    for xb, yb in zip(x.split(512), y.split(512))
                )
                / y.numel()
            )

    results = {}
    for predictor in PREDICTORS:

        def init(predictor: str = predictor) -> dict[str, Any]:
            model = Forecaster(cfg, predictor).to(device=run.device, dtype=run.dtype)
            init_weights(model, run.rng("init"))
            return {
                "_model": model,
                "params": dict(model.named_parameters()),
                "outer": torch.optim.Adam(model.parameters(), lr=cfg["lr"]),
                "time": 0.0,
                "times": [],
            }

        def step(state: dict[str, Any], k: int, predictor: str = predictor) -> dict[str, Any]:
            model: Forecaster = state["_model"]
            idx = torch.randint(
                x_tr.shape[0], (cfg["batch_size"],), generator=run.rng("batch", k)
            ).to(x_tr.device)
            t0 = time.perf_counter()
            state["outer"].zero_grad()
            loss = F.mse_loss(model(x_tr[idx]), y_tr[idx])
            loss.backward()
            state["outer"].step()
            state["time"] += time.perf_counter() - t0
            state["times"].append(time.perf_counter() - t0)
            out = {"train_loss": float(loss.detach())}
            if predictor == "argmin":
                out["lambda"] = float(model.ridge.l2.detach())
            if k % cfg["monitor_every"] == 0 or k == cfg["outer_steps"] - 1:
                out["outer_loss"] = mse(model, "val")
            return out

        def finish(state: dict[str, Any], predictor: str = predictor) -> dict[str, Any]:
            model = state["_model"]
            res = {
                "val_mse": mse(model, "val"),
                "test_mse": mse(model, "test"),
                "step_ms": 1000 * statistics.median(state["times"]),  # median: robust to stalls
            }
            if predictor == "argmin":
                res["lambda"] = float(model.ridge.l2.detach())
            with torch.no_grad():
                res["example"] = model(data["test"][0][:1])[0, 0].cpu().tolist()
            return res

        results[predictor] = run.phase(predictor, cfg["outer_steps"], init, step, finish)

    naive = {part: float((data[part][1] ** 2).mean()) for part in ("val", "test")}
    rows = [
        {
            "model": "encoder / ridge argmin / decoder",
            "val_mse": results["argmin"]["val_mse"],
            "test_mse": results["argmin"]["test_mse"],
            "lambda": results["argmin"]["lambda"],
            "step_ms": results["argmin"]["step_ms"],
        },
        {
            "model": "encoder / linear head / decoder",
            "val_mse": results["linear"]["val_mse"],
            "test_mse": results["linear"]["test_mse"],
            "lambda": None,
            "step_ms": results["linear"]["step_ms"],
        },
        {
            "model": "naive last value",
            "val_mse": naive["val"],
            "test_mse": naive["test"],
            "lambda": None,
            "step_ms": None,
        },
    ]
    _plot(run, cfg, data, results)
    return {
        "table": rows,
        "results": results,
        "naive": naive,
        "windows": {k: int(x.shape[0]) for k, (x, _) in data.items()},
        "data": cfg["csv"] or "synthetic",
        "beats_naive": results["argmin"]["test_mse"] < naive["test"],
        "beats_linear_head": results["argmin"]["test_mse"] < results["linear"]["test_mse"],
        "plots": ["argmin_timeseries.png"],
    }


def _plot(run: Run, cfg: dict[str, Any], data: dict[str, Any], results: dict[str, Any]) -> None:
    fig, ax = plot.figure(2, 1, size=(4.6, 3.2))
    series = {}
    for name in PREDICTORS:
        rows = [r for r in run.read_metrics(name) if "outer_loss" in r]
        series[name] = ([r["step"] for r in rows], [r["outer_loss"] for r in rows])
    plot.curves(
        ax[0],
        series,
        xlabel="Adam step",
        ylabel="validation MSE (normalized)",
        title="training",
        logy=True,
    )
    ax[0].axhline(
        float((data["val"][1] ** 2).mean()), color="gray", ls=":", lw=1, label="last value"
    )
    plot.legend(ax[0])
    x, y = data["test"]
    b = cfg["base"]
    ax[1].plot(range(b), x[0, 0].cpu(), color="k", lw=1.2, label="input window")
    ax[1].plot(
        range(b, b + cfg["horizon"]), y[0, 0].cpu(), color="k", ls="--", lw=1.2, label="truth"
    )
    for name in PREDICTORS:
        ax[1].plot(range(b, b + cfg["horizon"]), results[name]["example"], lw=1.2, label=name)
    ax[1].set_xlabel("time step (normalized window)")
    ax[1].set_title("a test window", fontsize=10)
    ax[1].grid(alpha=0.3)
    plot.legend(ax[1])
    plot.save(fig, run.path("argmin_timeseries.png"))
