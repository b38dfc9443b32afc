"""The load generator: drive orders through the msgpack gateway, report throughput, latency
and the audit (DESIGN.md sections 6 and 7).

    python loadtest.py [--orders 1000] [--concurrency 100 | --rate R] [--connections 4]
                       [--host H --port P | --targets H:P[,H:P...] | --spawn ...]
                       [--mix tok_visa=90,tok_timeout=10] [--scarce N [--scarce-share 0.2]]
                       [--lines L] [--seed S] [--json PATH] [--plot PATH.png] [--no-progress]

Modules: plan (the mix, the orders, the arrival times), drive (the clients and the orders in
flight), progress (the stderr progress line), stock (stock before, the scarce check after),
spawn (a private run.py), report (percentiles, summary, text report), plot (the chart),
options (the command line) and cli (main).
"""
