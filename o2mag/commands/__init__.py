"""The ``o2mag`` command's sub-commands: ``generate`` (in :mod:`o2mag.cli` for now), ``dataset``
(:mod:`.dataset`), ``evaluate`` (:mod:`.evaluate`); argparse value types in :mod:`.options`."""
