"""lvz benchmark suite (``make bench``): lvz figures as ratios to a trio + msgpack floor.

Not part of ``make test``: it measures speed, which depends on the machine. Every figure is a
median of repeated runs, compared with a bare echo server measured in the same run, so a noisy
machine moves both sides together and the ratios stay meaningful.
"""
