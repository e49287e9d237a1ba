"""Curating a generated folder: a quality record per sample (:mod:`.quality`), review decisions kept
in the manifest (:mod:`.decisions`), rescoring old folders (:mod:`.rescore`) and the review web page
(:mod:`.server`). README "Curating a generated folder" is the user's guide."""
