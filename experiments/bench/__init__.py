"""``python -m experiments bench [unroll|memory|implicit|maml|all]``: bilevel against the peers.

Answers "is bilevel as fast as what I use now, and how much memory does each mode need?"
with tables measured on this machine, bilevel and the peer libraries (higher, TorchOpt,
JAXopt) on identical problems in one run:

``unroll``    learning-rate hypergradient through T steps of SGD (momentum 0.9) and Adam, an
              MLP 64-128-10 on digits: bilevel ``reverse`` against a hand-written PyTorch loop
              (the compute floor), higher, TorchOpt (functional API and MetaSGD/MetaAdam).
``memory``    bilevel's ``reverse``, ``checkpoint``, ``forward`` and ``truncated`` modes: time,
              bytes saved for backward, peak RSS of a fresh process (CPU), allocator peak (GPU).
``implicit``  L2-regularised logistic regression (one weight, one per feature), breast cancer
              and a sparse synthetic design up to p = 1e6: bilevel's linear solvers, TorchOpt's
              and JAXopt's (jitted, x64) implicit differentiation, the course tutorial's
              dense Hessian, finite differences; error against the exact hypergradient.
              Then small problems (ridge with 3, 30, 300 unknowns against the closed form;
              digits logistic regression, 640 unknowns, against JAXopt), and an outer loop:
              20 Adam steps on per-feature weights (breast cancer, p >= 1e4 of --features),
              bilevel cg cold / warm-started / warm + Jacobi-preconditioned against TorchOpt
              and JAXopt, total hypergradient time (target <= 0.8x TorchOpt).
``maml``      one sinusoid MAML meta-gradient: bilevel batched with ``vmap`` against per-task
              loops (higher, TorchOpt, plain PyTorch).

Every hypergradient is checked against a reference before any timing is reported; a
disagreement is printed in the table and makes the command exit with status 1. Timings are
medians of ``--repeats`` interleaved repeats after a warm-up; ratios are bilevel's time over
each implementation's, from the same run; threads are pinned with ``torch.set_num_threads``.
"""

# The modules: core (the measuring harness), settings (the command line), report (rows,
# targets, tables), one module per problem (unroll, memory, implicit, maml), children (fresh
# processes for peak RSS), main (the entry point). optim is a separate micro-benchmark of
# the functional optimizers' kernels: python -m experiments.bench.optim; qp is the QP layer
# against qpth and cvxpylayers: python -m experiments.bench.qp; stateful_memory the memory of
# a long higher-style inner loop, bilevel.stateful against higher:
# python -m experiments.bench.stateful_memory; fixed_point_vmap a stack of fixed-point
# problems under vmap against a loop: python -m experiments.bench.fixed_point_vmap

from __future__ import annotations

from .main import child_main, main

__all__ = ["child_main", "main"]
