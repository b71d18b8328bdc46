"""Learning-rate ranges measured with the conformance kit, for the names whose rate is a multiplier.

``optitrainer check NAME --measure-lr`` (48 steps of the kit's tiny Llama at a constant rate, walking a
1-2-5 grid from ``recommended_lr`` until the loss stops falling), pytorch-optimizer 4.1.0, torch 2.13 CPU.
The comments give the nearest rates that did not learn. The Muon family is not listed: its 1-D weights
train with AdamW at their own rate, so the loss falls at any Muon rate.
"""

LEARNING_RATE_RANGES: dict[str, tuple[float, float]] = {
    "po_prodigy": (0.2, 50.0),  # not at 0.1 nor 100
    "po_dadaptadam": (0.5, 5.0),  # not at 0.2 nor 10
    "po_adadelta": (0.2, 50.0),  # not at 0.1 nor 100
    "po_adamg": (0.1, 10000.0),  # not at 0.05; the walk stopped learning nowhere above
    "po_lars": (1.0, 20.0),  # not at 0.5 nor 50
}
