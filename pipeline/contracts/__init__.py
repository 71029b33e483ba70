"""What every layer shares (the bottom layer): where files live (:mod:`.layout`), the cache
format (:mod:`.cache`), class labels (:mod:`.labels`), the experiment a site accepts and its
serialisation (:mod:`.experiment`), Flower message and node-config keys (:mod:`.messages`), how a
deployed message travels (:mod:`.transfer`, :mod:`.packing`),
atomic, formula-safe file writing (:mod:`.files`) and the console configuration (:mod:`.console`)."""
