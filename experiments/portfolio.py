"""portfolio: decision-focused learning with a QP layer.

A network predicts every asset's next-period return from its last ``window`` returns (one
small MLP shared by the assets). A QP layer (:func:`bilevel.qp`) turns the predictions
``mu`` into a long-only, fully invested portfolio under a risk penalty and per-asset caps:

    x*(mu) = argmax_x  mu'x - gamma/2 x' S x   s.t.  1'x = 1,  0 <= x <= cap

(``S``: the covariance of the training returns). Three strategies, evaluated on the last
part of the series (out of sample):

* ``decision-focused``: the network is trained end to end on the realised utility
  ``r'x*(mu) - gamma/2 x*' S x*`` of its portfolios, back-propagating through the QP's
  KKT conditions;
* ``predict-then-optimise``: the same network trained on the MSE of its predictions, then
  the same QP;
* ``equal weights``: ``x = 1/n``.

Data: synthetic correlated returns (a factor model with a slowly varying, partly
predictable drift) by default, or ``--csv`` with the tutorial's stock-price format (the
DJIA file: Close prices, one series per Name, aligned on their common last days).
Reported: out-of-sample mean return, volatility, Sharpe ratio (annualised, 252 periods)
and mean utility; plots of the wealth curves and of the training.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor, nn

import bilevel

from . import plot
from .argmin_timeseries import read_stock_csv
from .options import Option, positive_float, positive_int
from .run import Run, UsageError

DESCRIPTION = (
    "decision-focused learning: a network predicts returns, a QP layer allocates (long-only, "
    "capped, risk-penalised), trained end to end vs predict-then-optimise and equal weights"
)
DTYPE = "float64"
STRATEGIES = ("predict-then-optimise", "decision-focused")

OPTIONS = [
    Option("csv", "", type=str, help="stock CSV (tutorial format, .gz ok); empty: synthetic"),
    Option("assets", 10, quick=6, type=positive_int, help="synthetic assets (CSV: at most)"),
    Option("periods", 1500, quick=400, type=positive_int, help="synthetic periods"),
    Option("window", 10, type=positive_int, help="past returns seen by the network"),
    Option("gamma", 2.0, type=positive_float, help="risk penalty gamma"),
    Option("cap", 0.3, type=positive_float, help="per-asset weight cap"),
    Option("hidden", 32, type=positive_int, help="hidden units of the MLP"),
    Option("outer_steps", 300, quick=10, type=positive_int, help="Adam steps per strategy"),
    Option("batch_size", 64, quick=16, type=positive_int, help="periods per step"),
    Option("lr", 3e-3, type=positive_float, help="Adam step size"),
    Option("monitor_every", 25, quick=3, type=positive_int, help="validation utility every N"),
]


def validate(cfg: dict[str, Any]) -> None:
    if cfg["cap"] * cfg["assets"] < 1 and not cfg["csv"]:
        raise UsageError(
            f"--cap {cfg['cap']} x --assets {cfg['assets']} < 1: no fully invested portfolio "
            "respects the caps"
        )
    if cfg["csv"]:
        returns_from_csv(cfg["csv"], cfg["assets"])


def returns_from_csv(path: str, max_assets: int) -> Tensor:
    """Daily simple returns in percent, ``(periods, assets)``, of the longest series."""
    series = read_stock_csv(path)
    names = sorted(series, key=lambda k: -len(series[k]))[:max_assets]
    length = min(len(series[k]) for k in names)
    if len(names) < 2 or length < 100:
        raise UsageError(
            f"--csv {path}: need at least 2 series of 100 prices, got {len(names)} of {length}"
        )
    prices = torch.tensor([series[k][-length:] for k in names], dtype=torch.float64).T
    return 100 * (prices[1:] / prices[:-1] - 1)


def synthetic_returns(gen: torch.Generator, periods: int, assets: int) -> Tensor:
    """Percent returns: 2-factor covariance, plus a drift following an AR(1) per asset."""
    loadings = 0.8 * torch.randn(assets, 2, generator=gen, dtype=torch.float64)
    drift = torch.zeros(assets, dtype=torch.float64)
    out = []
    for _ in range(periods):
        drift = 0.97 * drift + 0.05 * torch.randn(assets, generator=gen, dtype=torch.float64)
        factors = torch.randn(2, generator=gen, dtype=torch.float64)
        noise = 0.7 * torch.randn(assets, generator=gen, dtype=torch.float64)
        out.append(drift + loadings @ factors + noise)
    return torch.stack(out)


class Predictor(nn.Module):
    """The same MLP for every asset: its last ``window`` returns -> its next return."""

    def __init__(self, window: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(window, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, x: Tensor) -> Tensor:  # (batch, assets, window) -> (batch, assets)
        return self.net(x).squeeze(-1)


class Market:
    """Windows, realised next returns, the covariance and the constraints of the QP."""

    def __init__(self, run: Run, cfg: dict[str, Any]) -> None:
        r = (
            returns_from_csv(cfg["csv"], cfg["assets"])
            if cfg["csv"]
            else synthetic_returns(run.rng("returns"), cfg["periods"], cfg["assets"])
        )
        r = r.to(run.device, run.dtype)
        w = cfg["window"]
        x = r.unfold(0, w, 1)[:-1]  # (T - w, assets, w): the window before each target
        y = r[w:]
        n = x.shape[0]
        cut1, cut2 = int(0.6 * n), int(0.8 * n)
        self.scale = r[:cut1].std()
        self.parts = {
            "train": (x[:cut1] / self.scale, y[:cut1]),
            "val": (x[cut1:cut2] / self.scale, y[cut1:cut2]),
            "test": (x[cut2:] / self.scale, y[cut2:]),
        }
        self.assets = r.shape[1]
        cap = max(cfg["cap"], 1.0 / self.assets)
        eye = torch.eye(self.assets, device=run.device, dtype=run.dtype)
        self.S = torch.cov(r[:cut1].T) + 1e-6 * eye
        self.Q = cfg["gamma"] * self.S
        self.A = torch.ones(1, self.assets, device=run.device, dtype=run.dtype)
        self.b = torch.ones(1, device=run.device, dtype=run.dtype)
        self.G = torch.cat([-eye, eye])
        self.h = torch.cat([torch.zeros_like(eye[0]), torch.full_like(eye[0], cap)])
        self.gamma, self.cap = cfg["gamma"], cap

    def allocate(self, mu: Tensor) -> Tensor:
        """The QP layer: long-only, fully invested, capped, risk-penalised weights."""
        x = bilevel.qp(self.Q, -mu, self.A, self.b, self.G, self.h)
        assert isinstance(x, Tensor)
        return x

    def utility(self, x: Tensor, r: Tensor) -> Tensor:
        risk = ((x @ self.S) * x).sum(-1)
        return (x * r).sum(-1) - 0.5 * self.gamma * risk

    def stats(self, x: Tensor, r: Tensor) -> dict[str, float]:
        ret = (x * r).sum(-1)
        mean, vol = float(ret.mean()), float(ret.std())
        return {
            "mean_return_pct": mean,
            "volatility_pct": vol,
            "sharpe": mean / vol * math.sqrt(252) if vol > 0 else 0.0,
            "utility": float(self.utility(x, r).mean()),
            "max_weight": float(x.max()),
        }


def _init_weights(model: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                bound = 1 / math.sqrt(m.in_features)
                for t in (m.weight, m.bias):
                    t.copy_(
                        (torch.rand(t.shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound
                    )


def _phase(run: Run, cfg: dict[str, Any], market: Market, strategy: str) -> dict[str, Any]:
    x_tr, y_tr = market.parts["train"]

    def evaluate(model: Predictor, part: str) -> tuple[Tensor, Tensor]:
        x, y = market.parts[part]
        with torch.no_grad():
            return market.allocate(model(x)), y

    def init() -> dict[str, Any]:
        model = Predictor(cfg["window"], cfg["hidden"]).to(run.device, run.dtype)
        _init_weights(model, run.rng("init"))
        return {
            "_model": model,
            "params": dict(model.named_parameters()),
            "outer": torch.optim.Adam(model.parameters(), lr=cfg["lr"]),
            "time": 0.0,
        }

    def step(state: dict[str, Any], k: int) -> dict[str, Any]:
        model: Predictor = state["_model"]
        idx = torch.randint(x_tr.shape[0], (cfg["batch_size"],), generator=run.rng("batch", k))
        idx = idx.to(x_tr.device)
        t0 = time.perf_counter()
        state["outer"].zero_grad()
        mu = model(x_tr[idx])
        if strategy == "decision-focused":
            loss = -market.utility(market.allocate(mu), y_tr[idx]).mean()
        else:
            loss = ((mu - y_tr[idx]) ** 2).mean()
        loss.backward()
        state["outer"].step()
        state["time"] += time.perf_counter() - t0
        out = {"train_loss": float(loss.detach())}
        if k % cfg["monitor_every"] == 0 or k == cfg["outer_steps"] - 1:
            out["outer_loss"] = -market.stats(*evaluate(model, "val"))["utility"]
        return out

    def finish(state: dict[str, Any]) -> dict[str, Any]:
        x, y = evaluate(state["_model"], "test")
        return {
            "test": market.stats(x, y),
            "val": market.stats(*evaluate(state["_model"], "val")),
            "step_ms": 1000 * state["time"] / cfg["outer_steps"],
            "test_weights": x,
            "test_returns": y,
        }

    return run.phase(strategy, cfg["outer_steps"], init, step, finish)


def run(run: Run, cfg: dict[str, Any]) -> dict[str, Any]:
    market = Market(run, cfg)
    run.plan(cfg["outer_steps"] * len(STRATEGIES))
    results, curves = {}, {}
    for strategy in STRATEGIES:
        res = _phase(run, cfg, market, strategy)
        results[strategy] = {k: v for k, v in res.items() if not k.startswith("test_")}
        curves[strategy] = (res["test_weights"] * res["test_returns"]).sum(-1)
    _, y_test = market.parts["test"]
    equal = torch.full_like(y_test, 1.0 / market.assets)
    results["equal weights"] = {"test": market.stats(equal, y_test)}
    curves["equal weights"] = (equal * y_test).sum(-1)
    rows = [
        {"strategy": s, **results[s]["test"], "step_ms": results[s].get("step_ms")}
        for s in (*STRATEGIES, "equal weights")
    ]
    _plot(run, curves)
    best = max(rows, key=lambda r: r["sharpe"])["strategy"]
    return {
        "table": rows,
        "results": results,
        "plots": ["portfolio.png"],
        "best_sharpe": best,
        "assets": market.assets,
        "test_periods": int(y_test.shape[0]),
        "data": cfg["csv"] or "synthetic",
    }


def _plot(run: Run, curves: dict[str, Tensor]) -> None:
    fig, ax = plot.figure(2, 1, size=(4.6, 3.2))
    wealth = {}
    for name, ret in curves.items():
        if ret.numel():
            w = torch.cumprod(1 + ret.detach().cpu() / 100, 0)
            wealth[name] = (list(range(1, w.numel() + 1)), w.tolist())
    plot.curves(
        ax[0], wealth, xlabel="test period", ylabel="wealth (start = 1)", title="out of sample"
    )
    train = {}
    for strategy in STRATEGIES:
        rows = [r for r in run.read_metrics(strategy) if r.get("outer_loss") is not None]
        train[strategy] = ([r["step"] for r in rows], [-r["outer_loss"] for r in rows])
    plot.curves(ax[1], train, xlabel="outer step", ylabel="validation utility", title="training")
    plot.save(fig, run.path("portfolio.png"))
