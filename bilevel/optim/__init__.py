"""Differentiable functional optimizers (``init`` / ``step`` pure functions).

Every optimizer has the semantics of its :mod:`torch.optim` namesake, step for step,
and is differentiable w.r.t. params, grads, state and every hyperparameter::

    opt = bilevel.optim.adam(lr=1e-3)
    state = opt.init(params)
    params, state = opt.step(params, grads, state, hparams)

A hyperparameter value can be a number or a 0-d tensor, a per-step schedule (a 1-D tensor
or a callable of the step), or a mapping from parameter names to such values or to
per-element tensors; the full rules are in the docstring of ``bilevel.optim.base``.
"""

from bilevel.optim.adagrad import Adagrad, adagrad
from bilevel.optim.adam import Adam, AdamW, adam, adamw
from bilevel.optim.base import HParams, HyperParameter, Optimizer, Params, State
from bilevel.optim.hd import SGDHD, AdamHD, AdamHDFunctional, SGDHDFunctional, adam_hd, sgd_hd
from bilevel.optim.rmsprop import RMSprop, rmsprop
from bilevel.optim.sgd import SGD, sgd

__all__ = [
    "Adagrad",
    "Adam",
    "AdamHD",
    "AdamHDFunctional",
    "AdamW",
    "HParams",
    "HyperParameter",
    "Optimizer",
    "Params",
    "RMSprop",
    "SGD",
    "SGDHD",
    "SGDHDFunctional",
    "State",
    "adagrad",
    "adam",
    "adam_hd",
    "adamw",
    "rmsprop",
    "sgd",
    "sgd_hd",
]
