"""Demo and test support, never imported by the production path: the demo sites
(:mod:`.demo_sites`), an in-process Flower grid with simulated dropouts (:mod:`.flower_grid`),
a whole deployment on loopback (:mod:`.local_deployment`) and the de-identification scan
(:mod:`.deid_scan`)."""
