"""Pure functions from a model to a model, each tested by the function it preserves.

    upcycle.py       dense -> MoE: every FFN copied into experts (Komatsuzaki et al. 2023),
                     or split into virtual groups of a finer granularity
    grow.py          a small model -> a wider / deeper one (the seeds' Scale-Up)
    grow_experts.py  more experts per MoE layer (copies with split router mass)
    extract.py       fewer experts: a sub-model (a tag's experts, a top-N by usage)
    calibrate.py     what merge and prune measure on calibration tokens
    prune.py         drop experts (by usage, or NAEE's reconstruction search)
    merge.py         merge experts (HC-SMoE: cluster by output, align, average)
    quantize.py      int8 / int4 weight-only experts (and attention)
    lora.py          LoRA adapters on the experts and attention (add, merge)

None of them reads or writes a directory (moekit.store does) or trains (moekit.train does).
"""

from moekit.transform.upcycle import upcycle

__all__ = ["upcycle"]
