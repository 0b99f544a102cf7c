"""The fuzzers behind ``make test`` (short, hypothesis) and ``make fuzz`` (long, seeded).

``chips``: the chip fuzzer over the VM model with invariants after every step; ``wire``: what
the daemon may answer to anything sent on its socket; ``watcher``: a VM whose state the wire
fuzzers must leave untouched. Not in the wheel; imported by tests/ and bench/, which import
nothing from each other.
"""
