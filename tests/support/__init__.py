"""What the tests build on, imported as modules (never `conftest`, which only declares
fixtures):

- `net`: free ports, the next edge address 127.0.0.N;
- `pebble`: the one way a test starts a Pebble (the session fixture and the tests that
  need their own CA: short validity, a crash, a fallback CA);
- `edge`: an edge worker a test starts (`EdgeHandle`, `make_config`, `new_edge`), its
  admin listener, TLS clients trusting Pebble, registering a host, `FakeClock`;
- `clicks`: getting a certificate and clicking (`certify`, `get_status`, raw hellos);
- `renewal`: edges on a controllable clock with no background loop;
- `proxy_protocol`: PROXY headers built independently of the edge, an L4 relay.

The DNS server, Pebble runner and backend themselves are the demo stack's
(`proxy/demo/`), which tests and `linkedge demo` share; what only tests need stays here,
outside the installed package.
"""
