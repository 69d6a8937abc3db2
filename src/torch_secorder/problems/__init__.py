"""One batch as a problem of the engine: a model (or a function) and its loss at a point.

The floor between the functional engine (:mod:`torch_secorder.func`) and everything
that users call: the one model-to-pure-function adapter
(:mod:`~torch_secorder.problems._model_function`), the one problem object
(:class:`~torch_secorder.problems._problem.LossProblem`: products by ``strategy``,
the autograd-graph fallback, state preservation and random-draw replay), the exact
per-batch kernels built on it (Hessian diagonal, GGN products and diagonal,
per-sample gradients, the Fisher's sampled rows) and the input checks.  The
operators (:mod:`torch_secorder.operators`) and the documented functions
(:mod:`torch_secorder.core`, :mod:`torch_secorder.approximations`,
:mod:`torch_secorder.analysis`) stand on it; it imports nothing above
:mod:`torch_secorder.func`.
"""
