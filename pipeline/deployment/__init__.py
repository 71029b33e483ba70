"""Running fedrad on Flower's deployment engine: certificates, coordinator and site launch."""
