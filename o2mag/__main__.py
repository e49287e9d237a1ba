"""``python -m o2mag ...`` is the ``o2mag`` command (what ``torchrun -m o2mag`` and
``accelerate launch -m o2mag`` start on every process)."""
import sys

from .cli import main

sys.exit(main())
