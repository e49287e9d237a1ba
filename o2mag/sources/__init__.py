"""Where inputs come from: MVTec-AD trees (:mod:`.mvtec`), the built-in sample (:mod:`.sample`) and
the tiny seeded models (:mod:`.tiny`)."""
