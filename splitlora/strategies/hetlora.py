"""`hetlora`: the HetLoRA-style baseline for heterogeneous clients: the clients, splits and ranks of
`hsplitlora`, with A and B averaged separately over zero-padded copies instead of stacked and folded."""

from __future__ import annotations

import torch

from .. import hetero
from ..errors import RunError
from .hsplitlora import HSplitLoRA, cut_to_rank
from .splitlora import SplitLoRA


class HetLoRA(HSplitLoRA):
    """The HetLoRA-style baseline: same clients, ranks and splits; A and B averaged separately over the
    zero-padded copies (`hetero.hetlora_average`, weighted by the samples of the clients that trained
    through each copy), each copy keeping its first r components. No folding: the base stays the
    pretrained one, and ranks and splits stay as first decided."""

    name = "hetlora"
    fold_modes = {}   # no folds: A and B averaged
    aggregations = ("zero_pad",)
    default_aggregation = "zero_pad"

    def __init__(self, setup, *args, **kwargs):
        self.average = None   # (PEFT key -> tensor at lora.rank): the last aggregate; None: the initial adapter
        super().__init__(setup, *args, **kwargs)

    def _start_adapter(self, cid):
        """A client given its layout starts from the last average, cut to its ranks."""
        if self.average is None:
            return super()._start_adapter(cid)
        out = {}
        for mod in self._client_mods(cid):
            p, r = self.prefix[mod], self.ranks[cid][mod]
            out[f"{p}.lora_A.weight"], out[f"{p}.lora_B.weight"] = cut_to_rank(
                self.average[f"{p}.lora_A.weight"], self.average[f"{p}.lora_B.weight"], r)
        return out

    def _average(self, states: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The zero-padded average of every module over the copies the clients in `states` trained through."""
        server, out = self._server_layers(), {}
        for mod, p in self.prefix.items():
            copies = [self._copy(cid, mod, states, server)[1:] for cid in states]
            got = hetero.hetlora_average([(a, b, self.scaling) for a, b in copies],
                                         [self.clients[cid].num_samples for cid in states])
            a, b = max(got, key=lambda ab: ab[0].shape[0])
            pad = self.max_rank - a.shape[0]
            out[f"{p}.lora_A.weight"] = torch.cat([a, a.new_zeros(pad, a.shape[1])])
            out[f"{p}.lora_B.weight"] = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
        return out

    def aggregate(self, t):
        self.average = avg = self._average(self._uploads(t))
        server = self.server.learners[0].part
        server.load_adapter_state({k: avg[k] for k in server.adapter})
        for c in self.clients:
            if not getattr(c, "connected", True):
                self.held[c.cid] = None
                continue
            if self._in_sync(c, self.splits[c.cid]):
                given = self._start_adapter(c.cid)
                ok = self.guarded(t, c, lambda c: c.load_adapter_state(given))[0]
                if ok:
                    self.given[c.cid] = given
                else:
                    self.held[c.cid] = None
            else:
                ok = self._set_layout(c)
            if ok:
                self.dropped.discard(c.cid)
        self.rounds += 1
        self.last_aggregation = t + 1
        return {}

    def global_adapter(self):
        self._sync()   # a deployed run evaluates before its first step: clients get their layouts first
        ready = [c for c in self.live() if self._in_sync(c, self.splits[c.cid])]
        peeks = [(c, s) for c in ready for ok, s in [self.guarded(self.t, c, lambda c: c.peek_adapter_state())] if ok]
        peeks = {c.cid: s for c, s in self._bounded(self.t, peeks, lambda c: self.given[c.cid])}
        if not peeks:
            raise RunError("no client left to evaluate")
        return self._average(peeks)

    def summary(self) -> dict:
        return {}

    def export_to(self, out_dir, template=None) -> dict:
        return SplitLoRA.export_to(self, out_dir, self.s.template)

    def state_dict(self):
        return {**super().state_dict(), "average": self.average}

    def load_state_dict(self, state):
        self.average = state.get("average")
        super().load_state_dict(state)
