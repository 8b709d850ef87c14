"""
The peers twistnet is measured against, each a minimal faithful program.

Every Python peer takes the port as its only argument (0 picks a free one) and prints
``NAME listening on 127.0.0.1:PORT`` once it listens, as the twistnet services log it.
"""
