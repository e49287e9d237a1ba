"""Tools around the op: the ``o2mag-kernels`` command (``cli``: ``check``, ``aot-check``,
``gpu-sweep``), the AOT compile check that writes ``aot_report.json`` (``aot``), the hardware sweep
that writes ``sweeps/<card>.json`` (``sweep``), the parity rule of the tests, the check command and
the sweep (``parity``), and synthetic mask sets (``synthetic``).

Tools import the runtime; the runtime never imports a tool. This file imports nothing, so that
``python -m o2mag_kernels.tools.aot --worker`` (and the sweep's workers) run their module once.
"""
