"""The runtime every recipe runs inside (DESIGN.md Sec. 2): the run directory, config saved and compared,
checkpoints committed atomically with every rank's files verified, metrics exactly once per iteration,
resume, recovery from dead or hung actors, and the non-finite guard."""
