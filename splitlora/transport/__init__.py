"""How roles reach each other. `local`: the simulator's in-process link (every message really serialized);
`codec`: the bytes of a message; `checks` and `limits`: what a reply must look like; `server`, `client`:
the gRPC deployment (a session per client, the commands of `contract.COMMANDS`); `certs`: mutual TLS;
`deploy`: the `serve` and `client` entry points."""
