"""What the tests (and the bench) start and fake: daemons, proxies, registries, fake servers."""
