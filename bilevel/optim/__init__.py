"""Differentiable functional optimizers (``init`` / ``step`` pure functions).

Every optimizer has the semantics of its :mod:`torch.optim` namesake, step for step
(a parameter whose gradient is ``None`` is skipped and its state does not advance),
and is differentiable w.r.t. params, grads, state and every hyperparameter::

    opt = bilevel.optim.adam(lr=1e-3)
    state = opt.init(params)
    params, state = opt.step(params, grads, state, hparams)

The protocol is described in ``bilevel.optim.base``, the kinds of hyperparameter
values (and :func:`schedule` / :func:`per_element`) in ``bilevel.optim.hparams``,
the valid ranges (each optimizer's ``ranges``) in ``bilevel.optim.validation``.
"""

from bilevel.optim.adadelta import Adadelta, adadelta
from bilevel.optim.adagrad import Adagrad, adagrad
from bilevel.optim.adam import Adam, AdamW, adam, adamw
from bilevel.optim.adamax import Adamax, adamax
from bilevel.optim.asgd import ASGD, asgd
from bilevel.optim.base import HParams, HyperParameter, Optimizer, Params, State
from bilevel.optim.hd import AdamHDFunctional, SGDHDFunctional, adam_hd, sgd_hd
from bilevel.optim.hd_torch import SGDHD, AdamHD
from bilevel.optim.hparams import PerElement, Schedule, per_element, schedule
from bilevel.optim.nadam import NAdam, nadam
from bilevel.optim.radam import RAdam, radam
from bilevel.optim.rmsprop import RMSprop, rmsprop
from bilevel.optim.rprop import Rprop, rprop
from bilevel.optim.sgd import SGD, sgd
from bilevel.optim.validation import Range

__all__ = [
    "ASGD",
    "Adadelta",
    "Adagrad",
    "Adam",
    "AdamHD",
    "AdamHDFunctional",
    "AdamW",
    "Adamax",
    "HParams",
    "HyperParameter",
    "NAdam",
    "Optimizer",
    "Params",
    "PerElement",
    "RAdam",
    "RMSprop",
    "Range",
    "Rprop",
    "SGD",
    "SGDHD",
    "SGDHDFunctional",
    "Schedule",
    "State",
    "adadelta",
    "adagrad",
    "adam",
    "adam_hd",
    "adamax",
    "adamw",
    "asgd",
    "nadam",
    "per_element",
    "radam",
    "rmsprop",
    "rprop",
    "schedule",
    "sgd",
    "sgd_hd",
]
