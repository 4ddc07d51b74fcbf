"""Application code built on the molora library: the command line (``molora``), the demo, the
label-prototype text classifier, text-task data helpers and the clbench continual-learning
benchmark harness.

Nothing in the core (``molora.*`` outside ``apps``, ``molora.routers``, ``molora.kernels``,
``molora.continual``) imports this package, so ``import molora`` loads none of it, nor tqdm,
datasets or matplotlib; tests/test_packaging.py checks both.
"""
