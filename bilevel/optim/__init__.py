"""Differentiable functional optimizers (``init`` / ``step`` pure functions)."""

from bilevel.optim.base import SGD, HParams, HyperParameter, Optimizer, Params, State, sgd

__all__ = ["SGD", "HParams", "HyperParameter", "Optimizer", "Params", "State", "sgd"]
