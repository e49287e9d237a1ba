"""Runs that write datasets: the output store and its manifest (:mod:`.store`), leases on the
filesystem (:mod:`.claims`), the work split over processes (:mod:`.parallel`) and contact sheets
(:mod:`.contact_sheet`)."""
