"""Runs that write datasets: the output store and its manifest (:mod:`.store`), leases on the
filesystem (:mod:`.claims`), which process this is (:mod:`.processes`), the work split
(:mod:`.plan`), the multi-process runner (:mod:`.runner`) and contact sheets (:mod:`.contact_sheet`)."""
