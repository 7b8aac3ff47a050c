"""A rogue client process for the robustness tests: a valid certificate and the real client role, answering
the server honestly except for one attack.

    python tests/rogue_client.py CONFIG CLIENT_ID PORT CERTS ATTACK[,ATTACK...]

Replies to `forward`, one per command in the order given (then honest):
- honest: an honest reply (replay needs one to replay)
- act-extreme: smashed activations of ±3e38 with random signs (finite; their loss gradient is not)
- act-1e38, act-1e20: every activation that value
- mask-false: an attention mask that selects no token
- replay: the first honest smashed reply sent again
- compute: an absurd compute_s (1e12 s)
- header: a reply with a ~100 KB header (hundreds of metadata keys), under the message limit
- oversize: a reply with a 2 MB header, over the message limit
Every command:
- adapter-1e30: adapter uploads (and evaluation reads) of 1e30 values
At the door:
- samples: a hello that claims 2**31 - 1 training examples
The process ends when the server says done (exit 0), or when refused at the door (exit 2).
"""

from __future__ import annotations

import json
import sys

import grpc
import torch

from splitlora.transport import client as remote
from splitlora.transport.certs import client_credentials
from splitlora.transport.codec import encode, pack
from splitlora.config import load_config
from splitlora.roles import Client
from splitlora.train import client_role


def main(config: str, cid: int, port: int, certs: str, attacks: str) -> int:
    cfg = load_config(config)
    role = client_role(cfg, cid)
    honest = remote.answer
    pending = attacks.split(",")
    forward_attacks = [a for a in pending if a not in ("adapter-1e30", "samples")]
    state = {"first_smashed": None}
    gen = torch.Generator().manual_seed(0)

    def smashed(tensors: dict, meta: dict, reply_meta: dict | None = None) -> bytes:
        return pack("smashed", tensors, {"n": int(tensors["activations"].shape[0]), "compute_s": 0.0,
                                                "nonce": meta.get("nonce"), **(reply_meta or {})})

    def padded(msg: dict, meta: dict, keys: int) -> bytes:
        return encode(msg, "fp32", {"kind": "smashed", **{f"k{i}": "x" * 200 for i in range(keys)},
                                           "meta": json.dumps({"n": int(msg["activations"].shape[0]),
                                                               "compute_s": 0.0, "nonce": meta.get("nonce")})})

    def rogue(client, kind, tensors, meta, precision, initial=None):
        if kind == "forward" and forward_attacks:
            attack = forward_attacks.pop(0)
            if attack == "honest":
                reply = honest(client, kind, tensors, meta, precision, initial)
                state["first_smashed"] = state["first_smashed"] or reply
                return reply
            if attack == "replay":
                client.forward()   # a batch is drawn, as an honest client would
                return state["first_smashed"]
            msg, _ = client.forward()
            msg = {k: v.detach() for k, v in msg.items()}
            a = msg["activations"]
            if attack == "act-extreme":
                signs = torch.randint(0, 2, a.shape, generator=gen).float() * 2 - 1
                return smashed({**msg, "activations": signs * 3e38}, meta)
            if attack in ("act-1e38", "act-1e20"):
                return smashed({**msg, "activations": torch.full_like(a, float(attack[4:]))}, meta)
            if attack == "mask-false":
                return smashed({**msg, "attention_mask": torch.zeros_like(msg["attention_mask"])}, meta)
            if attack == "compute":
                return smashed(msg, meta, {"compute_s": 1e12})
            if attack in ("header", "oversize"):
                return padded(msg, meta, 500 if attack == "header" else 10_000)
            raise ValueError(f"unknown attack {attack!r}")
        if kind == "adapter_state" and "adapter-1e30" in pending:
            return pack("adapter", {k: torch.full_like(v, 1e30) for k, v in client.adapter_state().items()},
                               {"compute_s": client.compute_s, "nonce": meta.get("nonce")})
        return honest(client, kind, tensors, meta, precision, initial)

    remote.answer = rogue
    if "samples" in pending:
        Client.num_samples = property(lambda self: 2 ** 31 - 1)
    creds = client_credentials(certs, cid)
    try:
        remote.serve_client(role, lambda: grpc.secure_channel(f"127.0.0.1:{port}", creds,
                                                              options=[("grpc.enable_http_proxy", 0)]),
                            cid, retries=20, backoff_s=0.1, max_bytes=64 << 20, max_header=64 << 20,
                            log=lambda m: print(f"rogue: {m}", file=sys.stderr, flush=True))
    except ConnectionRefusedError as e:
        print(f"rogue: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]))
