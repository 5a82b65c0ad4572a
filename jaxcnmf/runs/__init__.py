"""The application: the end-to-end job and what it writes.

- :mod:`jaxcnmf.runs.rundir`: the run directory (atomic writes, ``COMPLETE``, loading a
  saved run, progress bars).
- :mod:`jaxcnmf.runs.pipeline`: train / probe / fit / analyse / TCAV as one job.
- :mod:`jaxcnmf.runs.figures` and :mod:`jaxcnmf.runs.report`: matplotlib figures and the
  self-contained ``report.html``.
- :mod:`jaxcnmf.runs.cli`: the ``jaxcnmf`` command.
"""
