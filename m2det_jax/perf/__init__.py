"""Measuring: `stats` (parameters, MACs), `costs` (compiled train-step FLOPs and memory),
`benchmark` (`m2det benchmark`: the paper's speed protocol and throughput), `verify`
(parity with the official fixture), `runtime` (XLA:CPU flags and the CPU model)."""
