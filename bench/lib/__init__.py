"""What every benchmark family shares: processes, daemons, measurements, reports, figures.

Nothing in procs, daemons or measure imports torch or matplotlib: the client processes the
benchmarks spawn import these modules, so they must stay cheap to import.
"""
