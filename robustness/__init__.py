"""A standing adversary for modelfs (issue 22): fuzzed parsers (``parsers``, run by the suite
and by ``scripts/fuzz``) and a chaos run against real processes (``chaos``, ``scripts/chaos``).
"""
