"""The ``o2mag`` command's sub-commands, one module each: :mod:`.generate`, :mod:`.dataset`,
:mod:`.evaluate`; what they share (value types, option groups, loading the model) is in
:mod:`.options`. :mod:`o2mag.cli` builds the parser from their ``add_parser`` functions and
dispatches to the handler each one sets."""
