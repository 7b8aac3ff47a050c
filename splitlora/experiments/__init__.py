"""Experiments: one file per benchmark writing JSON (CLI `splitlora bench NAME`: `overhead` split vs plain
PEFT step, `deploy` a deployment vs the simulator, `hetero` heterogeneous clients and Kill & Revive,
`noise` the defense's cost, `precision` fp32 vs bf16, `memory` peak memory of a part at large shapes,
`scale` one server against up to 16 client processes; `common` holds what they share), and the studies
behind the other commands: `compare` and `report` (strategies at equal samples), `calibrate` (device
profiles for the cost model), `attack` (inversion of smashed data). Nothing is imported here: each module
is loaded when its command runs."""
